"""Tests for dataset discovery and validation on a working copy of the shipped hippocampus subset."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnfiltermatch.inventory import (
    Case,
    DatasetInventory,
    DataValidationError,
    build_inventory,
    read_labeled_list,
    sample_labeled_ids,
    write_labeled_list,
)

SOURCE = Path(__file__).resolve().parents[1] / "data" / "Dataset901_HippocampusSubset"
GARBAGE = b"this is not an image \x00\xff\x13" * 50


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """Writable copy of the subset (training part only; imagesTs/labelsTs are ignored by the inventory anyway)."""
    dst = tmp_path / "Dataset901_HippocampusSubset"
    shutil.copytree(SOURCE, dst, ignore=shutil.ignore_patterns("imagesTs", "labelsTs"))
    return dst


def case_ids(raw: Path) -> list[str]:
    return sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))


def img(raw: Path, case_id: str, channel: int = 0) -> Path:
    return raw / "imagesTr" / f"{case_id}_{channel:04d}.nii.gz"


def lab(raw: Path, case_id: str) -> Path:
    return raw / "labelsTr" / f"{case_id}.nii.gz"


def make_unlabeled(raw: Path, n: int = 4) -> list[str]:
    """Move the last n imagesTr cases to imagesUnlabeled/ and delete their labels."""
    moved = case_ids(raw)[-n:]
    (raw / "imagesUnlabeled").mkdir()
    for c in moved:
        shutil.move(img(raw, c), raw / "imagesUnlabeled" / img(raw, c).name)
        lab(raw, c).unlink()
    return moved


def build(raw: Path, **kw) -> DatasetInventory:
    kw.setdefault("progress", False)
    return build_inventory(raw, **kw)


def build_error(raw: Path, **kw) -> str:
    with pytest.raises(DataValidationError) as exc:
        build(raw, **kw)
    return str(exc.value)


def rewrite_dataset_json(raw: Path, **changes) -> None:
    dj = json.loads((raw / "dataset.json").read_text())
    dj.update(changes)
    (raw / "dataset.json").write_text(json.dumps(dj))


# ---------------------------------------------------------------------------------------------- happy paths


def test_happy_path_with_imagesunlabeled(raw: Path) -> None:
    moved = make_unlabeled(raw, 4)
    inv = build(raw, progress=True)
    assert inv.num_channels == 1 and inv.file_ending == ".nii.gz"
    assert len(inv.labeled) == 36 and inv.unlabeled_ids == moved
    assert set(inv.labeled_ids).isdisjoint(moved)
    for c in inv.labeled:
        assert c.label_file == lab(raw, c.case_id) and c.image_files == (img(raw, c.case_id),)
    for c in inv.unlabeled:
        assert c.label_file is None and c.image_files[0].parent.name == "imagesUnlabeled"
    fp = inv.fingerprint_inputs()
    assert json.loads(json.dumps(fp)) == fp
    assert fp["labeled_ids"] == sorted(inv.labeled_ids) and fp["unlabeled_ids"] == moved
    assert f"labelsTr/{inv.labeled_ids[0]}.nii.gz" in fp["labeled_files"]
    assert f"imagesUnlabeled/{moved[0]}_0000.nii.gz" in fp["unlabeled_files"]
    assert fp == build(raw, check_contents=False).fingerprint_inputs()


def test_happy_path_with_labeled_list(raw: Path, tmp_path: Path) -> None:
    ids = case_ids(raw)
    chosen = sample_labeled_ids(ids, 0.25, seed=3)
    list_path = tmp_path / "lists" / "labeled.txt"
    write_labeled_list(chosen, list_path, header="sampled 25% with seed 3\nfrom imagesTr")
    text = list_path.read_text()
    assert text.startswith("# sampled 25% with seed 3\n# from imagesTr\n")
    assert not list(list_path.parent.glob("*.tmp"))
    assert read_labeled_list(list_path) == chosen

    inv = build(raw, labeled_ids=read_labeled_list(list_path))
    assert inv.labeled_ids == chosen and len(chosen) == 10
    assert inv.unlabeled_ids == sorted(set(ids) - set(chosen))
    assert all(c.label_file is None for c in inv.unlabeled)
    assert all(c.label_file is not None for c in inv.labeled)
    # Unlabelled cases' labels are not part of the fingerprint.
    assert not any(k.startswith("labelsTr/") for k in inv.fingerprint_inputs()["unlabeled_files"])


def test_labels_of_unlabeled_cases_are_never_opened(raw: Path) -> None:
    ids = case_ids(raw)
    labeled = ids[:5]
    hidden = ids[5:]
    # Garbage for some, a readable-but-wrong label (other size, undeclared value) for the others: any header or
    # voxel read of these files would make validation fail.
    wrong = sitk.GetImageFromArray(np.full((3, 4, 5), 7, dtype=np.uint8))
    for i, c in enumerate(hidden):
        if i % 2:
            lab(raw, c).write_bytes(GARBAGE)
        else:
            sitk.WriteImage(wrong, str(lab(raw, c)))
    before = {c: lab(raw, c).stat().st_mtime_ns for c in hidden}
    inv = build(raw, labeled_ids=labeled, check_contents=True)
    assert inv.labeled_ids == labeled and inv.unlabeled_ids == hidden
    fp = inv.fingerprint_inputs()
    assert not any(f"labelsTr/{c}" in json.dumps(fp) for c in hidden)
    # Sanity check that the same corruption is caught when those cases are labelled.
    msg = build_error(raw, labeled_ids=labeled + hidden[:2])
    assert f"labelsTr/{hidden[0]}.nii.gz" in msg and f"labelsTr/{hidden[1]}.nii.gz" in msg
    assert before == {c: lab(raw, c).stat().st_mtime_ns for c in hidden}


# ---------------------------------------------------------------------------------------------- dataset.json


def test_dataset_json_missing_or_invalid(raw: Path) -> None:
    (raw / "dataset.json").write_text("{not json")
    assert "dataset.json is not valid JSON" in build_error(raw, allow_empty_unlabeled=True)
    (raw / "dataset.json").write_text(json.dumps({"name": "x"}))
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert "'channel_names'" in msg and "'labels'" in msg and "'file_ending'" in msg and "3 problems" in msg
    (raw / "dataset.json").unlink()
    assert "dataset.json is missing" in build_error(raw, allow_empty_unlabeled=True)


def test_imagestr_missing(raw: Path) -> None:
    shutil.rmtree(raw / "imagesTr")
    assert "imagesTr does not exist" in build_error(raw, allow_empty_unlabeled=True)


# ---------------------------------------------------------------------------------------------- file structure


def test_missing_channel_file(raw: Path) -> None:
    rewrite_dataset_json(raw, channel_names={"0": "MRI", "1": "MRI2"})
    ids = case_ids(raw)
    for c in ids[1:]:
        shutil.copy(img(raw, c), img(raw, c, 1))
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert f"imagesTr/{ids[0]}_0001.nii.gz is missing" in msg
    assert "2 channel(s)" in msg and "add it or remove the case" in msg


def test_extra_channel_file(raw: Path) -> None:
    c = case_ids(raw)[3]
    shutil.copy(img(raw, c), img(raw, c, 1))
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert f"unexpected channel file imagesTr/{c}_0001.nii.gz" in msg


def test_badly_named_files_reported_hidden_files_ignored(raw: Path) -> None:
    (raw / "imagesTr" / ".DS_Store").write_bytes(b"junk")
    (raw / "imagesTr" / "notes.txt").write_text("hi")
    c = case_ids(raw)[0]
    img(raw, c).rename(raw / "imagesTr" / f"{c}.nii.gz")
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert "imagesTr/notes.txt does not match" in msg
    assert f"imagesTr/{c}.nii.gz does not match" in msg
    assert ".DS_Store" not in msg
    # Its label now has no image, which is reported too, in the same error.
    assert f"labelsTr/{c}.nii.gz has no image in imagesTr" in msg


def test_missing_label_file(raw: Path) -> None:
    c = case_ids(raw)[2]
    lab(raw, c).unlink()
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert f"labelled case '{c}' has no label file labelsTr/{c}.nii.gz" in msg


def test_label_without_image(raw: Path) -> None:
    shutil.copy(lab(raw, case_ids(raw)[0]), raw / "labelsTr" / "orphan_007.nii.gz")
    msg = build_error(raw, allow_empty_unlabeled=True)
    assert "labelsTr/orphan_007.nii.gz has no image" in msg


def test_several_problems_collected_in_one_error(raw: Path) -> None:
    ids = case_ids(raw)
    lab(raw, ids[0]).unlink()
    shutil.copy(img(raw, ids[1]), img(raw, ids[1], 1))
    msg = build_error(raw)
    assert "3 problems found" in msg
    assert f"labelsTr/{ids[0]}.nii.gz" in msg and f"{ids[1]}_0001.nii.gz" in msg and "imagesUnlabeled" in msg


def test_long_problem_lists_are_capped(raw: Path) -> None:
    rewrite_dataset_json(raw, channel_names={"0": "MRI", "1": "MRI2"})
    with pytest.raises(DataValidationError) as exc:
        build(raw, allow_empty_unlabeled=True)
    assert len(exc.value.problems) >= 40
    assert "... and" in str(exc.value) and str(exc.value).count("\n  - ") == 20


# ---------------------------------------------------------------------------------------------- contents


def _copy_geometry_to(ref: Path, arr: np.ndarray, out: Path, **overrides) -> None:
    ref_img = sitk.ReadImage(str(ref))
    new = sitk.GetImageFromArray(arr)
    new.SetSpacing(overrides.get("spacing", ref_img.GetSpacing()))
    new.SetOrigin(overrides.get("origin", ref_img.GetOrigin()))
    new.SetDirection(overrides.get("direction", ref_img.GetDirection()))
    sitk.WriteImage(new, str(out))


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
    from nnfiltermatch import inventory

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
    count_nonfinite = inventory._count_nonfinite
    monkeypatch.setattr(
        inventory,
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


def test_channel_count_problems_in_imagesunlabeled(raw: Path) -> None:
    """An unlabelled case with an extra or a missing channel file, or a multi-value (vector/RGB) file, is refused."""
    moved = make_unlabeled(raw, 3)
    unl = raw / "imagesUnlabeled"
    extra = unl / f"{moved[0]}_0001.nii.gz"
    shutil.copy(unl / f"{moved[0]}_0000.nii.gz", extra)
    msg = build_error(raw)
    assert f"unexpected channel file imagesUnlabeled/{moved[0]}_0001.nii.gz" in msg and "1 channel(s)" in msg

    extra.unlink()
    vector = unl / f"{moved[1]}_0000.nii.gz"
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(vector))).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([arr, arr], axis=-1), isVector=True), str(vector))
    msg = build_error(raw)
    assert f"imagesUnlabeled/{moved[1]}_0000.nii.gz has 2 values per voxel" in msg and "_0001" in msg

    # Two channels declared: an unlabelled case with only _0000 is named, with the file it lacks.
    rewrite_dataset_json(raw, channel_names={"0": "MRI", "1": "MRI2"})
    shutil.copy(unl / f"{moved[2]}_0000.nii.gz", vector)
    for f in [*(raw / "imagesTr").glob("*_0000.nii.gz"), vector]:
        shutil.copy(f, f.with_name(f.name.replace("_0000", "_0001")))
    msg = build_error(raw)
    assert f"channel file imagesUnlabeled/{moved[0]}_0001.nii.gz is missing" in msg
    assert f"imagesUnlabeled/{moved[2]}_0001.nii.gz is missing" in msg and "2 problems found" in msg


def test_check_contents_false_skips_file_reads(raw: Path) -> None:
    img(raw, case_ids(raw)[0]).write_bytes(GARBAGE)
    assert len(build(raw, allow_empty_unlabeled=True, check_contents=False).labeled) == 40


# ---------------------------------------------------------------------------------------------- labelled lists


def test_unknown_labelled_ids(raw: Path) -> None:
    ids = case_ids(raw)
    msg = build_error(raw, labeled_ids=[ids[0], "nosuchcase_999", f"{ids[1]}_0000"])
    assert "not found in" in msg and str(raw / "imagesTr") in msg
    assert "'nosuchcase_999'" in msg
    assert f"'{ids[1]}_0000'" in msg and "channel suffix" in msg and "bare case IDs" in msg


def test_overlap_imagestr_and_imagesunlabeled(raw: Path) -> None:
    ids = case_ids(raw)
    (raw / "imagesUnlabeled").mkdir()
    shutil.copy(img(raw, ids[0]), raw / "imagesUnlabeled" / img(raw, ids[0]).name)
    msg = build_error(raw)
    assert f"case ID '{ids[0]}' is both in imagesTr/ and imagesUnlabeled/" in msg
    # Same for an imagesTr case that is unlabelled because of a labelled list.
    msg = build_error(raw, labeled_ids=ids[1:4])
    assert f"'{ids[0]}' is both in imagesTr/ and imagesUnlabeled/" in msg


def test_labelled_id_only_in_imagesunlabeled(raw: Path) -> None:
    moved = make_unlabeled(raw, 2)
    msg = build_error(raw, labeled_ids=[moved[0]])
    assert f"'{moved[0]}'" in msg and "is in imagesUnlabeled/" in msg


def test_empty_unlabelled_set(raw: Path) -> None:
    msg = build_error(raw)
    assert "no unlabelled images" in msg and "imagesUnlabeled" in msg and "ssl/filtermatch" in msg
    # A labelled list containing every case leaves nothing unlabelled either.
    assert "no unlabelled images" in build_error(raw, labeled_ids=case_ids(raw))
    inv = build(raw, allow_empty_unlabeled=True)
    assert len(inv.labeled) == 40 and inv.unlabeled == []


def test_empty_imagesunlabeled_folder_still_counts_as_empty(raw: Path) -> None:
    (raw / "imagesUnlabeled").mkdir()
    assert "no unlabelled images" in build_error(raw)


def test_empty_labelled_list(raw: Path, tmp_path: Path) -> None:
    p = tmp_path / "labeled.txt"
    p.write_text("# nothing here\n\n   \n")
    with pytest.raises(DataValidationError, match="at least one labelled case is needed") as exc:
        read_labeled_list(p)
    assert str(p) in str(exc.value)
    assert "at least one labelled case" in build_error(raw, labeled_ids=[])


def test_missing_labelled_list_file(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match="does not exist") as exc:
        read_labeled_list(tmp_path / "nope.txt")
    assert "nope.txt" in str(exc.value)


def test_duplicate_ids(raw: Path, tmp_path: Path) -> None:
    p = tmp_path / "labeled.txt"
    p.write_text("hippocampus_001\nhippocampus_003\n  hippocampus_001  \n")
    with pytest.raises(DataValidationError, match="duplicate case ID 'hippocampus_001' on lines 1, 3"):
        read_labeled_list(p)
    msg = build_error(raw, labeled_ids=["hippocampus_001", "hippocampus_001"])
    assert "duplicate case IDs ['hippocampus_001']" in msg


def test_ids_with_file_ending_or_channel_suffix(tmp_path: Path) -> None:
    p = tmp_path / "labeled.txt"
    p.write_text("hippocampus_001_0000.nii.gz\nhippocampus_003.nii\n")
    with pytest.raises(DataValidationError) as exc:
        read_labeled_list(p)
    msg = str(exc.value)
    assert "'hippocampus_001_0000.nii.gz'" in msg and "'hippocampus_003.nii'" in msg and "bare case IDs" in msg
    assert "'hippocampus_001'" in msg  # suggestion
    p.write_text("hippocampus_001_0000\n")
    with pytest.raises(DataValidationError, match="channel suffix _0000"):
        read_labeled_list(p, known_ids=["hippocampus_001"])
    # IDs that really end in _NNNN stay valid.
    p.write_text("patient_0001\n")
    assert read_labeled_list(p) == ["patient_0001"]
    assert read_labeled_list(p, known_ids=["patient_0001"]) == ["patient_0001"]


def test_sample_labeled_ids() -> None:
    ids = [f"case_{i:03d}" for i in range(40)]
    a = sample_labeled_ids(ids, 0.2, seed=0)
    assert a == sample_labeled_ids(list(reversed(ids)), 0.2, seed=0)  # order-independent
    assert a == sorted(a) and len(a) == 8 and set(a) <= set(ids)
    assert a != sample_labeled_ids(ids, 0.2, seed=1)
    assert len(sample_labeled_ids(ids, 0.001, seed=0)) == 1
    assert sample_labeled_ids(ids, 1.0, seed=5) == ids
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(DataValidationError, match=r"\(0, 1\]") as exc:
            sample_labeled_ids(ids, bad, seed=0)
        assert repr(bad) in str(exc.value)
    with pytest.raises(DataValidationError, match="no case IDs"):
        sample_labeled_ids([], 0.5, seed=0)


def test_write_labeled_list_is_atomic_and_replaces(tmp_path: Path) -> None:
    p = tmp_path / "labeled.txt"
    write_labeled_list(["a", "b"], p)
    write_labeled_list(["c"], p, header="second")
    assert p.read_text() == "# second\nc\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["labeled.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any list the user writes, not mkstemp's 0600
    with pytest.raises(DataValidationError, match="invalid case IDs"):
        write_labeled_list(["ok", "bad id\n"], p)
    assert p.read_text() == "# second\nc\n"


def test_case_is_frozen() -> None:
    c = Case("x", (Path("x_0000.nii.gz"),), None)
    with pytest.raises(AttributeError):
        c.case_id = "y"  # type: ignore[misc]


def test_multi_member_gzip_is_not_mistaken_for_truncation(raw: Path) -> None:
    import gzip

    c = case_ids(raw)[4]
    data = gzip.decompress(img(raw, c).read_bytes())
    img(raw, c).write_bytes(gzip.compress(data[:1000]) + gzip.compress(data[1000:]))
    build(raw, allow_empty_unlabeled=True)


# ---------------------------------------------------------------------------------------------- issue 14 s.6


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


def test_labelled_list_with_byte_order_mark(raw: Path, tmp_path: Path) -> None:
    """A list saved by a Windows editor began with '\\ufeffhippocampus_001', an unknown case."""
    ids = case_ids(raw)[:3]
    p = tmp_path / "labeled.txt"
    p.write_text("\n".join(ids) + "\n", encoding="utf-8-sig")
    assert p.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_labeled_list(p) == ids
    assert build(raw, labeled_ids=read_labeled_list(p)).labeled_ids == ids
    p.write_text("\n".join(ids) + "\n", encoding="utf-16")  # PowerShell's `>`
    assert read_labeled_list(p) == ids
    p.write_bytes("\ufeff{}\n\ufeff{}\n".format(*ids[:2]).encode())  # two lists joined with cat
    assert read_labeled_list(p) == ids[:2]


def test_dangling_symlinks_are_named(raw: Path, tmp_path: Path) -> None:
    """A link that leads nowhere was skipped without a word (its case silently dropped); now it is an error."""
    ids = case_ids(raw)
    moved = make_unlabeled(raw, 2)
    gone = tmp_path / "unmounted"
    links = [
        img(raw, ids[0]),  # labelled image
        raw / "imagesUnlabeled" / f"{moved[0]}_0000.nii.gz",  # unlabelled image: the pool would shrink silently
        lab(raw, ids[1]),  # label of a labelled case
    ]
    originals = {link: link.read_bytes() for link in links}
    for link in links:
        link.unlink()
        link.symlink_to(gone / link.name)
    msg = build_error(raw)
    assert "3 problems found" in msg
    for link, what in zip(links, ("image", "image", "label")):
        rel = link.relative_to(raw).as_posix()
        assert f"{rel} is a symbolic link to {gone / link.name}, which does not exist" in msg
        assert f"so this {what} cannot be read; restore its target or replace the link by the file" in msg
    assert "has no label file" not in msg and "has no image" not in msg  # the cases are not lost on the way

    # The label of a case that the labelled list leaves unlabelled is never used, dangling or not.
    for link in links[:2]:
        link.unlink()
        link.write_bytes(originals[link])
    inv = build(raw, labeled_ids=[ids[0], ids[2]])
    assert ids[1] in inv.unlabeled_ids
