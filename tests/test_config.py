"""Training options: impossible values are refused before any work starts, each named with the value given."""

from __future__ import annotations

import pytest

from nnfiltermatch.cli import main
from nnfiltermatch.config import resolve_config


def test_invalid_options_are_listed_together() -> None:
    with pytest.raises(ValueError) as info:
        resolve_config({"epochs": 0, "tau": 1.5, "lr": 0.0, "filter_drop": 1.0, "teacher": "teacherless"})
    message = str(info.value)
    for expected in (
        "--epochs must be >= 1, got 0",
        "--tau must be in [0, 1), got 1.5",
        "--lr must be > 0, got 0.0",
        "--filter-drop must be in [0, 1), got 1.0",
        "--teacher 'teacherless': choose one of",
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
