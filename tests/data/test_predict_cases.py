"""The output folder of a prediction run: which existing outputs count as a finished case."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import SUBSET
from nnfiltermatch.data import predict_cases

CASES = ["hippocampus_065"]  # a shipped test case with its label


@pytest.mark.parametrize("keep", [0, 10, 200, 0.5, 0.99])
def test_a_cut_off_segmentation_is_not_complete(tmp_path: Path, keep: float) -> None:
    """--continue_prediction must not keep a file that a killed in-place writer left, however short."""
    source = SUBSET / "labelsTs" / f"{CASES[0]}.nii.gz"
    whole = source.read_bytes()
    cut = tmp_path / source.name
    cut.write_bytes(whole[: int(keep * len(whole)) if isinstance(keep, float) else keep])
    assert (
        predict_cases._complete_output_problem([cut], tmp_path, ".nii.gz") == f"{cut.name} is unreadable or truncated"
    )
    cut.write_bytes(whole)
    assert predict_cases._complete_output_problem([cut], tmp_path, ".nii.gz") is None
    assert predict_cases._complete_output_problem([tmp_path / "x.npz", cut], tmp_path, ".nii.gz") == "x.npz missing"
