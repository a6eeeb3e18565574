"""Training options: impossible values are refused before any work starts, each named with the value given."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nnfiltermatch.cli import main
from nnfiltermatch.config import TrainConfig, resolve_config


def test_invalid_options_are_listed_together() -> None:
    with pytest.raises(ValueError) as info:
        resolve_config(
            {
                "epochs": 0,
                "tau": 1.5,
                "lr": 0.0,
                "filter_drop": 1.0,
                "teacher": "teacherless",
                "copy_paste_p": 2.0,
                "seed": -1,
            }
        )
    message = str(info.value)
    for expected in (
        "--epochs must be >= 1, got 0",
        "--tau must be in [0, 1), got 1.5",
        "--lr must be > 0, got 0.0",
        "--filter-drop must be in [0, 1), got 1.0",
        "--teacher 'teacherless': choose one of",
        "--copy-paste-p is a probability in [0, 1], got 2.0",
        "--seed must be >= 0, got -1",
    ):
        assert expected in message


def test_impossible_filter_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="--filter-start must be >= 1, got 0"):
        resolve_config({"mode": "filtermatch", "epochs": 10, "filter_start": 0})
    with pytest.raises(ValueError, match="--filter-every must be >= 1, got -2"):
        resolve_config({"mode": "filtermatch", "epochs": 10, "filter_every": -2})
    with pytest.raises(ValueError, match="--preset 'fancy'"):
        resolve_config({}, preset="fancy")


def test_unknown_choice_is_refused_by_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "-d", "901", "-c", "3d_fullres_cpu", "-f", "all", "--mode", "fancy"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --mode: invalid choice: 'fancy'" in err and "supervised" in err and "filtermatch" in err


def test_removed_filter_scoring_is_refused_but_older_configurations_load(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--filter-scoring running ranked about as well as chance (BENCHMARKS.md s.5) and was removed; a configuration
    file written before still loads, and scores by window, the one scoring left."""
    with pytest.raises(SystemExit) as info:
        main(["train", "-d", "901", "-c", "3d_fullres_cpu", "-f", "all", "--filter-scoring", "running"])
    assert info.value.code == 2 and "unrecognized arguments: --filter-scoring running" in capsys.readouterr().err
    old = {**resolve_config({"mode": "filtermatch"}).to_dict(), "filter_scoring": "running"}
    (tmp_path / "nnfiltermatch_config.json").write_text(json.dumps(old))
    loaded = TrainConfig.from_dict(json.loads((tmp_path / "nnfiltermatch_config.json").read_text()))
    assert not hasattr(loaded, "filter_scoring") and "filter_scoring" not in loaded.to_dict()
    loaded.validate()
    assert loaded.mode == "filtermatch"


def test_deterministic_is_a_train_option_that_forces_in_process_augmentation(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from nnfiltermatch.cli import build_parser
    from nnfiltermatch.commands.training import configure_runtime, make_repeatable

    base = ["train", "-d", "901", "-c", "3d_fullres_cpu", "-f", "all"]
    assert build_parser().parse_args([*base, "--deterministic"]).deterministic is True
    assert build_parser().parse_args(base).deterministic is None  # not given: --continue keeps the stored value
    monkeypatch.delenv("nnUNet_n_proc_DA", raising=False)
    configure_runtime("cpu")
    assert os.environ["nnUNet_n_proc_DA"] == "0"  # the CPU default: repeatable
    monkeypatch.setenv("nnUNet_n_proc_DA", "6")
    configure_runtime("cpu")
    make_repeatable(False, torch.device("cpu"))
    assert os.environ["nnUNet_n_proc_DA"] == "6"  # the user's choice stands without --deterministic
    make_repeatable(True, torch.device("cpu"))
    assert os.environ["nnUNet_n_proc_DA"] == "0"


def test_importing_the_package_asks_mkl_for_alignment_independent_results() -> None:
    """Without it an ssl run that followed an evaluation in the same process left its supervised twin (BENCHMARKS
    s.6); MKL reads the variable at its first call, so the package sets it before torch is imported through it."""
    import nnfiltermatch

    assert nnfiltermatch.__version__ and os.environ.get("MKL_CBWR") == "AUTO,STRICT"
