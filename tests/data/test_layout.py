"""nnU-Net's folders and dataset IDs: a dataset is found by its ID, and unset variables are named as such."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import DATASET
from nnfiltermatch.data.layout import dataset_name_from_id
from nnfiltermatch.errors import PreparationError


def test_dataset_id_resolution(prepared: Path) -> None:
    assert dataset_name_from_id(901) == DATASET
    assert dataset_name_from_id("901") == DATASET
    with pytest.raises(PreparationError, match="Dataset999_"):
        dataset_name_from_id(999)


def test_unset_nnunet_variables_are_named_as_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Not "looked in nnUNet_raw=None": the message says which variable is not set and how to set it."""
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(PreparationError) as exc:
        dataset_name_from_id(901)
    msg = str(exc.value)
    assert "=None" not in msg and "none of the environment variables nnUNet_raw" in msg
    assert "export nnUNet_raw=" in msg and "setting_up_paths.md" in msg

    monkeypatch.setenv("nnUNet_raw", str(tmp_path))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "gone"))
    with pytest.raises(PreparationError) as exc:
        dataset_name_from_id(901)
    msg = str(exc.value)
    assert "=None" not in msg
    assert (
        f"looked in nnUNet_raw={tmp_path}, nnUNet_preprocessed (not set), nnUNet_results={tmp_path / 'gone'} (missing)"
        in msg
    )
    assert "nnUNet_preprocessed is not set: export" in msg and "export nnUNet_preprocessed=" in msg
