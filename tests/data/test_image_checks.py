"""The image and label checks prepare runs, through the inventory of a working copy of the hippocampus subset."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_inventory import (
    GARBAGE,
    _copy_geometry_to,
    build,
    build_error,
    case_ids,
    img,
    lab,
    make_unlabeled,
    rewrite_dataset_json,
)

from nnfiltermatch.data import image_checks


def test_image_label_shape_mismatch(raw: Path) -> None:
    c = case_ids(raw)[5]
    _copy_geometry_to(img(raw, c), np.zeros((7, 8, 9), dtype=np.uint8), lab(raw, c))
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert f"labelsTr/{c}.nii.gz" in msg and f"imagesTr/{c}_0000.nii.gz" in msg
    assert "size" in msg and "(9, 8, 7)" in msg


@pytest.mark.parametrize("what", ["spacing", "origin", "direction"])
def test_image_label_geometry_mismatch(raw: Path, what: str) -> None:
    c = case_ids(raw)[6]
    label = sitk.ReadImage(str(lab(raw, c)))
    values = {
        "spacing": (1.0, 1.0, 1.5),
        "origin": (-1.0, -1.0, 11.0),
        "direction": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    }
    _copy_geometry_to(lab(raw, c), sitk.GetArrayFromImage(label), lab(raw, c), **{what: values[what]})
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert f"labelsTr/{c}.nii.gz" in msg and f"imagesTr/{c}_0000.nii.gz" in msg and what in msg
    # Tiny differences (float round-off) are tolerated.
    _copy_geometry_to(img(raw, c), sitk.GetArrayFromImage(label), lab(raw, c), spacing=(1.0, 1.0, 1.0 + 1e-6))
    build(raw, allow_empty_unlabeled=True)


def test_channel_geometry_mismatch(raw: Path) -> None:
    rewrite_dataset_json(raw, channel_names={"0": "MRI", "1": "MRI2"})
    ids = case_ids(raw)
    for c in ids:
        shutil.copy(img(raw, c), img(raw, c, 1))
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(img(raw, ids[0]))))
    _copy_geometry_to(img(raw, ids[0]), arr, img(raw, ids[0], 1), spacing=(2.0, 1.0, 1.0))
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert f"imagesTr/{ids[0]}_0001.nii.gz does not match imagesTr/{ids[0]}_0000.nii.gz" in msg and "spacing" in msg


def test_label_value_not_in_dataset_json(raw: Path) -> None:
    c = case_ids(raw)[7]
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(lab(raw, c))))
    arr[0, 0, 0] = 5
    _copy_geometry_to(lab(raw, c), arr, lab(raw, c))
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert f"labelsTr/{c}.nii.gz contains value(s) 5 not declared" in msg


def test_float_label_with_nan_is_refused(raw: Path) -> None:
    """A float label map with NaN must not read as background (nnU-Net would cast NaN to 0)."""
    c = case_ids(raw)[7]
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(lab(raw, c)))).astype(np.float32)
    arr[0, 0, 0] = np.nan
    _copy_geometry_to(lab(raw, c), arr, lab(raw, c))
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert f"labelsTr/{c}.nii.gz contains value(s) nan not declared" in msg


@pytest.mark.parametrize("where", ["labelled image", "unlabelled image", "label"])
def test_truncated_file(raw: Path, where: str) -> None:
    moved = make_unlabeled(raw, 3)
    c = case_ids(raw)[0]
    target = {
        "labelled image": img(raw, c),
        "unlabelled image": raw / "imagesUnlabeled" / f"{moved[0]}_0000.nii.gz",
        "label": lab(raw, c),
    }[where]
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    msg = build_error(raw)
    assert target.relative_to(raw).as_posix() in msg
    assert "truncated" in msg


@pytest.mark.parametrize("where", ["image", "label"])
def test_garbage_file(raw: Path, where: str) -> None:
    c = case_ids(raw)[1]
    target = img(raw, c) if where == "image" else lab(raw, c)
    target.write_bytes(GARBAGE)
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert f"{target.relative_to(raw).as_posix()} cannot be read" in msg


def test_4d_image(raw: Path) -> None:
    c = case_ids(raw)[8]
    vol = sitk.ReadImage(str(img(raw, c)))
    sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(img(raw, c)))
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert f"imagesTr/{c}_0000.nii.gz is 4D" in msg


def test_mixed_dimensionality(raw: Path) -> None:
    moved = make_unlabeled(raw, 2)
    target = raw / "imagesUnlabeled" / f"{moved[0]}_0000.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), dtype=np.float32)), str(target))
    msg = build_error(raw)
    assert "mixed dimensionality" in msg and f"imagesUnlabeled/{moved[0]}_0000.nii.gz" in msg


@pytest.mark.parametrize("where", ["labelled", "imagesUnlabeled", "unlabelled by the list"])
def test_nan_and_infinite_voxels(raw: Path, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN, +inf and -inf are each refused, in labelled and unlabelled images alike (ITK would read them as 0)."""
    ids = case_ids(raw)
    labeled_ids = None
    if where == "imagesUnlabeled":
        targets = [raw / "imagesUnlabeled" / f"{c}_0000.nii.gz" for c in make_unlabeled(raw, 4)]
    elif where == "unlabelled by the list":
        labeled_ids = ids[:4]
        targets = [img(raw, c) for c in ids[4:8]]
    else:
        targets = [img(raw, c) for c in ids[:4]]
    for target, value, count in zip(targets, (np.nan, np.inf, -np.inf), (3, 2, 1)):
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(target))).astype(np.float32)
        arr.flat[:count] = value
        _copy_geometry_to(target, arr, target)
    integer_typed = targets[3]  # stored as int16: cannot hold NaN/inf
    _copy_geometry_to(
        integer_typed, sitk.GetArrayFromImage(sitk.ReadImage(str(integer_typed))).astype(np.int16), integer_typed
    )
    read_fully: list[str] = []
    count_nonfinite = image_checks._count_nonfinite
    monkeypatch.setattr(
        image_checks,
        "_count_nonfinite",
        lambda path, problems, root: read_fully.append(path.name) or count_nonfinite(path, problems, root),
    )
    msg = build_error(raw, labeled_ids=labeled_ids, allow_empty_unlabeled=True)
    rel = [t.relative_to(raw).as_posix() for t in targets]
    assert f"{rel[0]} contains 3 NaN and 0 infinite voxel(s)" in msg
    assert f"{rel[1]} contains 0 NaN and 2 infinite voxel(s)" in msg
    assert f"{rel[2]} contains 0 NaN and 1 infinite voxel(s)" in msg
    assert "replace them" in msg and "3 problems found" in msg
    assert {t.name for t in targets[:3]} <= set(read_fully)
    # Labelled images are read in full anyway; unlabelled integer-typed ones are not (pools can be large).
    assert (integer_typed.name in read_fully) == (where == "labelled")


def test_multi_member_gzip_is_not_mistaken_for_truncation(raw: Path) -> None:
    import gzip

    c = case_ids(raw)[4]
    data = gzip.decompress(img(raw, c).read_bytes())
    img(raw, c).write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    build(raw, allow_empty_unlabeled=True)


def test_float_label_that_is_not_an_integer_is_named_as_such(raw: Path) -> None:
    """1.0000001 was reported as "value 1 not declared"; it is a non-integer, shown as stored."""
    c = case_ids(raw)[7]
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(lab(raw, c)))).astype(np.float32)
    _copy_geometry_to(lab(raw, c), arr, lab(raw, c))
    build(raw, allow_empty_unlabeled=True)  # whole numbers stored as float are fine
    arr[arr == 1] = np.float32(1.0000001)
    _copy_geometry_to(lab(raw, c), arr, lab(raw, c))
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert f"label labelsTr/{c}.nii.gz contains value(s) that are not integers: 1.0000001 (stored as float32)" in msg
    assert "not declared" not in msg and "round them" in msg
