"""The run folder: names, fold lookup, filter-round records, and the trainer class each mode names.

The safe loader's tests on a real trained checkpoint (code refused, numpy data allowed, digests) stay in
test_inference.py and test_trainer.py, beside the model their fixtures train.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import CONFIG
from nnfiltermatch.config import MODES
from nnfiltermatch.method.pool_filter import FilterRound
from nnfiltermatch.runs import (
    RESUME_ORDER,
    STATE_KEY,
    TRAINER_NAMES,
    RunFolderError,
    collect_filter_rounds,
    current_checkpoint,
    resolve_fold_dir,
    resolve_model_dir,
)


def _round(epoch: int, **extra: object) -> dict:
    cases = [{"case": "a", "score": 0.5, "kept": True}]
    return {
        "epoch": epoch,
        "score": "mean",
        "mirroring": False,
        "tile_step": 1.0,
        "seconds": 1.0,
        "cases": cases,
        **extra,
    }


def test_rounds_from_checkpoint_and_later_round_files(tmp_path: Path) -> None:
    (tmp_path / "filter_rounds").mkdir()
    (tmp_path / "filter_rounds" / "epoch_0001.json").write_text(json.dumps(_round(1, seconds=99)))
    (tmp_path / "filter_rounds" / "epoch_0002.json").write_text(json.dumps(_round(2)))
    (tmp_path / "filter_rounds" / "epoch_0003.json").write_text("{truncated")
    damaged = {k: v for k, v in _round(4).items() if k != "cases"}
    (tmp_path / "filter_rounds" / "epoch_0004.json").write_text(json.dumps(damaged))
    ckpt = {"init_args": {STATE_KEY: {"filter_rounds": [_round(1)]}}}
    rounds = collect_filter_rounds(tmp_path, ckpt)
    # the checkpoint's round wins over the file of its epoch; damaged files are not read
    assert rounds == [FilterRound.from_json(_round(1)), FilterRound.from_json(_round(2))]


def test_fold_folder_from_the_model_folder(tmp_path: Path) -> None:
    two = tmp_path / "two"
    for fold in ("fold_0", "fold_1"):
        (two / fold).mkdir(parents=True)
        (two / fold / "checkpoint_final.pth").touch()
    with pytest.raises(RunFolderError, match="choose one with -f"):
        resolve_fold_dir(two)
    assert resolve_fold_dir(two, 1) == two / "fold_1"


def test_the_current_checkpoint_is_the_one_continue_resumes_from(tmp_path: Path) -> None:
    assert current_checkpoint(tmp_path) is None
    for name in reversed(RESUME_ORDER):
        (tmp_path / name).touch()
        assert current_checkpoint(tmp_path) == tmp_path / name  # final before latest before best


def test_an_unknown_mode_has_no_model_folder() -> None:
    with pytest.raises(RunFolderError, match="--mode 'fancy'"):
        resolve_model_dir(901, CONFIG, "fancy")


def test_every_mode_names_its_trainer_class() -> None:
    from nnfiltermatch.nnunet.trainers import trainer_class

    assert set(TRAINER_NAMES) == set(MODES)
    for mode, name in TRAINER_NAMES.items():
        cls = trainer_class(mode)
        assert cls.__name__ == name and cls.mode == mode
