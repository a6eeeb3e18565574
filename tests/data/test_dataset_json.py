"""dataset.json: missing, invalid, or with label values nnU-Net cannot train with."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from test_inventory import (
    _copy_geometry_to,
    build,
    build_error,
    case_ids,
    lab,
    rewrite_dataset_json,
)


def test_dataset_json_missing_or_invalid(raw: Path) -> None:
    (raw / "dataset.json").write_text("{not json")
    assert "dataset.json is not valid JSON" in build_error(raw, allow_empty_unlabeled=True)
    (raw / "dataset.json").write_text(json.dumps({"name": "x"}))
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert "'channel_names'" in msg and "'labels'" in msg and "'file_ending'" in msg and "3 problems" in msg
    (raw / "dataset.json").unlink()
    assert "dataset.json is missing" in build_error(raw, allow_empty_unlabeled=True)


def test_label_values_with_a_gap_are_refused(raw: Path) -> None:
    """{0, 1, 2, 5} with a 5 in a label passed prepare, and training crashed with 'index 5 is out of bounds'."""
    labels = {"background": 0, "Anterior": 1, "Posterior": 2, "Tail": 5}
    rewrite_dataset_json(raw, labels=labels)
    c = case_ids(raw)[0]
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(lab(raw, c))))
    arr[0, 0, 0] = 5
    _copy_geometry_to(lab(raw, c), arr, lab(raw, c))
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert "label values must be consecutive, 0, 1, 2, ..." in msg and "'index 5 is out of bounds'" in msg
    assert "'Tail': 5" in msg and "which skips 3, 4" in msg and "renumber ('Tail': 5 -> 3)" in msg
    assert "in every label file" in msg

    # Renumbered, the same dataset is accepted; regions count their member labels, 'ignore' must come last.
    _copy_geometry_to(lab(raw, c), np.where(arr == 5, 3, arr).astype(arr.dtype), lab(raw, c))
    rewrite_dataset_json(raw, labels={**labels, "Tail": 3})
    build(raw, allow_empty_unlabeled=True)
    rewrite_dataset_json(raw, labels={"background": 0, "whole": [1, 2, 3], "core": [2, 3], "ignore": 4})
    build(raw, allow_empty_unlabeled=True)
    rewrite_dataset_json(raw, labels={"background": 0, "ignore": 1, "Anterior": 2, "Posterior": 3})
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert "which skips 1; renumber ('Anterior': 2 -> 1, 'Posterior': 3 -> 2)" in msg
    assert "the 'ignore' label has value 1" in msg and 'set "ignore": 3' in msg
    rewrite_dataset_json(raw, labels={"Anterior": 1, "Posterior": 2})
    assert "'labels' has no value 0" in build_error(raw, allow_empty_unlabeled=True)
