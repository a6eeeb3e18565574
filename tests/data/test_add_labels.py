"""prepare --add-labels: what it refuses before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import DATASET, LABELED, SUBSET
from nnfiltermatch.data.add_labels import add_labels
from nnfiltermatch.data.layout import MANIFEST_NAME
from nnfiltermatch.errors import DataValidationError


def test_add_labels_names_a_dangling_link(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A label link that leads nowhere is not skipped as "not a file": it is named (checked before any work)."""
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    shutil.copytree(SUBSET, tmp_path / "raw" / DATASET, ignore=shutil.ignore_patterns("imagesTs", "labelsTs"))
    manifest = {"plans_name": "nnUNetPlans", "labeled_ids": LABELED, "unlabeled_ids": ["hippocampus_007"]}
    (tmp_path / "preprocessed" / DATASET).mkdir(parents=True)
    (tmp_path / "preprocessed" / DATASET / MANIFEST_NAME).write_text(json.dumps(manifest))
    new = tmp_path / "annotated"
    new.mkdir()
    (new / "hippocampus_007.nii.gz").symlink_to(tmp_path / "unmounted" / "hippocampus_007.nii.gz")
    with pytest.raises(DataValidationError) as exc:
        add_labels(DATASET, new)
    msg = str(exc.value)
    assert "hippocampus_007.nii.gz is a symbolic link to" in msg and "which does not exist" in msg
    assert "no CASE.nii.gz label files" not in msg
