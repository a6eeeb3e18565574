"""Tests for dataset discovery and validation on a working copy of the shipped hippocampus subset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnfiltermatch.data.inventory import Case, DatasetInventory, build_inventory
from nnfiltermatch.data.labeled_lists import read_labeled_list, sample_labeled_ids, write_labeled_list
from nnfiltermatch.errors import DataValidationError

GARBAGE = b"this is not an image \x00\xff\x13" * 50


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


# ---------------------------------------------------------------------------------------------- dataset folder


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


def test_case_is_frozen() -> None:
    c = Case("x", (Path("x_0000.nii.gz"),), None)
    with pytest.raises(AttributeError):
        c.case_id = "y"  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------- dangling links


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
