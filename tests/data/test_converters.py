"""Tests for the LA (UA-MT) and ACDC (SSL4MIS) h5 converters.

Round-trip tests use the real shared data through a small symlinked copy of its layout (a few cases), so they
stay fast; error tests use tiny synthetic h5 files.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import SimpleITK as sitk

from nnfiltermatch.cli import main
from nnfiltermatch.data import converters, converters_la
from nnfiltermatch.data.converters import ConversionError
from nnfiltermatch.data.converters_acdc import convert_acdc_h5
from nnfiltermatch.data.converters_la import convert_la_h5
from nnfiltermatch.data.inventory import build_inventory
from nnfiltermatch.data.labeled_lists import read_labeled_list

SHARED = Path(os.environ.get("NNFM_SHARED_DATA") or Path(__file__).resolve().parents[2].parent / "shared" / "data")
LA_TRAIN = 5  # > 4, so labeled_4 is written and labeled_8 is not
ACDC_TRAIN_PATIENTS = ("patient038", "patient050", "patient099", "patient003")  # 099 has 16 slices: order matters
ACDC_VAL = "patient002_frame01"


def need_shared(sub: str) -> Path:
    folder = SHARED / sub
    if not folder.is_dir():
        pytest.skip(f"real data {folder} is absent (set NNFM_SHARED_DATA to the shared data folder to run this test)")
    return folder


def read_nifti(path: Path) -> tuple[np.ndarray, sitk.Image]:
    image = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(image), image


def read_h5(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as h:
        return h["image"][()], h["label"][()]


def write_h5(path: Path, image: np.ndarray | None, label: np.ndarray | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h:
        if image is not None:
            h["image"] = image
        if label is not None:
            h["label"] = label
    return path


@contextmanager
def isolated_nnunet_env() -> Iterator[None]:
    """Hide the developer's nnU-Net folders, whose dataset IDs could clash with the ones used here."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.delenv(name, raising=False)
        yield


def slice_index(path: Path) -> int:
    return int(re.search(r"_slice_(\d+)\.h5$", path.name).group(1))


# --------------------------------------------------------------------------------------------------------------
# Real data: small symlinked trees, converted once per module
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def la_small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str], list[str]]:
    """UA-MT tree with LA_TRAIN train cases and 1 test case (symlinks to the real files), converted."""
    real = need_shared("la")
    ids = [ln.strip() for ln in (real / "train.list").read_text().splitlines() if ln.strip()]
    train, test = ids[:LA_TRAIN], ids[LA_TRAIN : LA_TRAIN + 1]
    src = tmp_path_factory.mktemp("la_src")
    for case in train + test:
        (src / converters_la.LA_CASE_DIR).mkdir(exist_ok=True)
        (src / converters_la.LA_CASE_DIR / case).symlink_to(real / converters_la.LA_CASE_DIR / case)
    (src / "train.list").write_text("\n".join(train) + "\n")
    (src / "test.list").write_text("\n".join(test) + "\n")
    raw = tmp_path_factory.mktemp("la_raw")
    with isolated_nnunet_env():
        result = convert_la_h5(src, 501, raw_root=raw, progress=False)
    return src, result.dataset_dir, train, test


@pytest.fixture(scope="module")
def acdc_small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, converters.ConversionResult]:
    """SSL4MIS tree with 4 training patients (slices) and one val volume, converted."""
    real = need_shared("acdc")
    src = tmp_path_factory.mktemp("acdc_src")
    (src / "data" / "slices").mkdir(parents=True)
    frames = []
    for patient in ACDC_TRAIN_PATIENTS:
        for path in sorted((real / "data" / "slices").glob(f"{patient}_frame*_slice_*.h5")):
            (src / "data" / "slices" / path.name).symlink_to(path)
            frames.append(path.name.split("_slice_")[0])
    (src / "data" / f"{ACDC_VAL}.h5").symlink_to(real / "data" / f"{ACDC_VAL}.h5")
    (src / "train.list").write_text("\n".join(dict.fromkeys(frames)) + "\n")
    (src / "val.list").write_text(ACDC_VAL + "\n")
    raw = tmp_path_factory.mktemp("acdc_raw")
    with isolated_nnunet_env():
        return src, convert_acdc_h5(src, 502, raw_root=raw, progress=False)


def test_la_round_trip(la_small: tuple[Path, Path, list[str], list[str]]) -> None:
    src, out, train, test = la_small
    for case, img_dir, lab_dir in [(c, "imagesTr", "labelsTr") for c in train] + [
        (c, "imagesTs", "labelsTs") for c in test
    ]:
        image, label = read_h5(src / converters_la.LA_CASE_DIR / case / converters_la.LA_H5_NAME)
        got_image, itk_image = read_nifti(out / img_dir / f"{case}_0000.nii.gz")
        got_label, itk_label = read_nifti(out / lab_dir / f"{case}.nii.gz")
        assert got_image.dtype == np.float32 and got_label.dtype == np.uint8
        np.testing.assert_array_equal(got_image, image)
        np.testing.assert_array_equal(got_label, label)
        assert itk_image.GetSpacing() == (1.0, 1.0, 1.0) == itk_label.GetSpacing()


def test_la_dataset_json_lists_and_inventory(la_small: tuple[Path, Path, list[str], list[str]]) -> None:
    _, out, train, test = la_small
    assert out.name == "Dataset501_LA"
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "MRI"}
    assert dj["labels"] == {"background": 0, "left_atrium": 1}
    assert dj["file_ending"] == ".nii.gz" and dj["numTraining"] == LA_TRAIN
    assert "1 x 1 x 1 mm" in dj["description"]
    assert read_labeled_list(out / "labeled_4.txt") == train[:4]
    assert not (out / "labeled_8.txt").exists() and not (out / "labeled_16.txt").exists()
    inventory = build_inventory(out, labeled_ids=read_labeled_list(out / "labeled_4.txt"), progress=False)
    assert inventory.labeled_ids == train[:4] and inventory.unlabeled_ids == [train[4]]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"{test[0]}_0000.nii.gz"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_acdc_stacked_training_volume_round_trip(acdc_small: tuple[Path, converters.ConversionResult]) -> None:
    src, result = acdc_small
    out = result.dataset_dir
    checked_unordered = False
    for frame in result.train_ids:
        paths = sorted((src / "data" / "slices").glob(f"{frame}_slice_*.h5"), key=slice_index)
        checked_unordered |= [p.name for p in paths] != sorted(p.name for p in paths)
        pairs = [read_h5(p) for p in paths]
        got_image, itk = read_nifti(out / "imagesTr" / f"{frame}_0000.nii.gz")
        got_label, _ = read_nifti(out / "labelsTr" / f"{frame}.nii.gz")
        np.testing.assert_array_equal(got_image, np.stack([i for i, _ in pairs]))
        np.testing.assert_array_equal(got_label, np.stack([lab for _, lab in pairs]))
        assert got_image.dtype == np.float32 and got_label.dtype == np.uint8
        assert itk.GetSize()[2] == len(paths)  # slices on the NIfTI z axis
    assert checked_unordered, "no frame with >= 10 slices: numeric slice order was not exercised"
    assert len(result.train_ids) == 2 * len(ACDC_TRAIN_PATIENTS)


def test_acdc_val_volume_round_trip(acdc_small: tuple[Path, converters.ConversionResult]) -> None:
    src, result = acdc_small
    image, label = read_h5(src / "data" / f"{ACDC_VAL}.h5")
    got_image, _ = read_nifti(result.dataset_dir / "imagesTs" / f"{ACDC_VAL}_0000.nii.gz")
    got_label, _ = read_nifti(result.dataset_dir / "labelsTs" / f"{ACDC_VAL}.nii.gz")
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_label, label)


def test_acdc_splits_lists_and_inventory(acdc_small: tuple[Path, converters.ConversionResult]) -> None:
    _, result = acdc_small
    out = result.dataset_dir
    assert json.loads((out / "splits_test.json").read_text()) == {"val": [ACDC_VAL], "test": []}
    dj = json.loads((out / "dataset.json").read_text())
    assert dj["labels"] == {"background": 0, "right_ventricle": 1, "myocardium": 2, "left_ventricle": 3}
    assert dj["numTraining"] == 8
    expected = [f"{p}_frame{f}" for p in ("patient038", "patient050", "patient099") for f in ("01", "02")]
    assert read_labeled_list(out / "labeled_3.txt") == expected
    assert not (out / "labeled_7.txt").exists()
    assert any("labeled_7.txt" in m and "patient021" in m for m in result.messages)
    assert any("test.list" in m for m in result.messages)
    inventory = build_inventory(out, labeled_ids=expected, progress=False)
    assert inventory.unlabeled_ids == ["patient003_frame01", "patient003_frame02"]


# --------------------------------------------------------------------------------------------------------------
# Synthetic sources
# --------------------------------------------------------------------------------------------------------------


def la_case(src: Path, case: str, shape: tuple[int, ...] = (6, 5, 4), **kw: np.ndarray | None) -> Path:
    rng = np.random.default_rng(sum(map(ord, case)))
    image = kw.get("image", rng.normal(size=shape).astype(np.float32))
    label = kw.get("label", (rng.random(shape) > 0.5).astype(np.uint8))
    return write_h5(src / converters_la.LA_CASE_DIR / case / converters_la.LA_H5_NAME, image, label)


def la_source(tmp_path: Path, cases: tuple[str, ...] = ("A1", "B2", "C3"), test: tuple[str, ...] = ()) -> Path:
    src = tmp_path / "la"
    for case in cases + test:
        la_case(src, case)
    (src / "train.list").write_text("\n".join(cases) + "\n")
    if test:
        (src / "test.list").write_text("\n".join(test) + "\n")
    return src


def acdc_slices(src: Path, frame: str, indices: list[int], hw: tuple[int, int] = (5, 4), labels: int = 3) -> None:
    for i in indices:
        image = np.full(hw, i, dtype=np.float32)
        label = np.full(hw, min(i, labels), dtype=np.uint8)
        write_h5(src / "data" / "slices" / f"{frame}_slice_{i}.h5", image, label)


def acdc_source(tmp_path: Path) -> Path:
    """Two training frames (1-based slices, 11 of them), one val volume."""
    src = tmp_path / "acdc"
    for frame in ("patient001_frame01", "patient001_frame02"):
        acdc_slices(src, frame, list(range(1, 12)))
    write_h5(src / "data" / "patient002_frame01.h5", np.zeros((3, 5, 4), np.float32), np.ones((3, 5, 4), np.uint8))
    (src / "train.list").write_text("patient001_frame01\npatient001_frame02\n")
    (src / "val.list").write_text("patient002_frame01\n")
    return src


@pytest.fixture
def raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "nnUNet_raw"
    folder.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(folder))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    monkeypatch.delenv("nnUNet_results", raising=False)
    return folder


def test_acdc_slices_stacked_in_numeric_order(tmp_path: Path, raw: Path) -> None:
    result = convert_acdc_h5(acdc_source(tmp_path), 3, progress=False)
    image, _ = read_nifti(result.dataset_dir / "imagesTr" / "patient001_frame01_0000.nii.gz")
    assert image[:, 0, 0].tolist() == list(range(1, 12))  # slice_10 after slice_9, not after slice_1


def test_spacing_is_written_and_described(tmp_path: Path, raw: Path) -> None:
    result = convert_la_h5(la_source(tmp_path), 7, spacing=(0.625, 0.5, 2.0), progress=False)
    _, itk = read_nifti(result.dataset_dir / "imagesTr" / "A1_0000.nii.gz")
    assert itk.GetSpacing() == (0.625, 0.5, 2.0)
    assert "0.625 x 0.5 x 2 mm" in json.loads((result.dataset_dir / "dataset.json").read_text())["description"]
    with pytest.raises(ConversionError, match="three positive"):
        convert_la_h5(la_source(tmp_path), 8, spacing=(1.0, 0.0, 1.0), progress=False)


def test_cli_convert(tmp_path: Path, raw: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = la_source(tmp_path, cases=("A1", "B2", "C3", "D4", "E5"))
    assert main(["convert", "la-h5", str(src), "-d", "12", "--name", "Tiny"]) == 0
    out = capsys.readouterr().out
    assert "Wrote labeled_4.txt" in out and "labeled_8.txt (10%) not written" in out and "no imagesTs" in out
    assert (raw / "Dataset012_Tiny" / "imagesTr" / "E5_0000.nii.gz").is_file()
    assert main(["convert", "la-h5", str(src), "-d", "12", "--name", "Tiny"]) == 2
    assert "already exists" in capsys.readouterr().err
    acdc = acdc_source(tmp_path)
    assert main(["convert", "acdc-h5", str(acdc), "-d", "13"]) == 0
    assert (raw / "Dataset013_ACDC" / "imagesTs" / "patient002_frame01_0000.nii.gz").is_file()


def test_overwrite_replaces_and_leaves_no_temporary_folders(tmp_path: Path, raw: Path) -> None:
    convert_la_h5(la_source(tmp_path), 5, progress=False)
    with pytest.raises(ConversionError, match="--overwrite"):
        convert_la_h5(la_source(tmp_path), 5, progress=False)
    src2 = la_source(tmp_path / "second", cases=("Z9",))
    convert_la_h5(src2, 5, overwrite=True, progress=False)
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset005_LA"]
    assert [p.name for p in (raw / "Dataset005_LA" / "imagesTr").iterdir()] == ["Z9_0000.nii.gz"]


def test_failure_while_writing_leaves_nothing(tmp_path: Path, raw: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = converters._write_nifti
    calls = []

    def failing(array: np.ndarray, path: Path, spacing: tuple[float, float, float]) -> None:
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_write(array, path, spacing)

    monkeypatch.setattr(converters, "_write_nifti", failing)
    with pytest.raises(OSError, match="disk full"):
        convert_la_h5(la_source(tmp_path), 5, progress=False)
    assert list(raw.iterdir()) == []


def test_disk_full_is_caught_although_itk_does_not_raise(
    tmp_path: Path, raw: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a full disk ITK's NIfTI writer prints "wrote only 0 of N bytes" and returns: each file is read back, so the
    conversion stops with a clear error instead of installing truncated images; an existing dataset stays."""
    import shutil

    convert_la_h5(la_source(tmp_path / "first", cases=("Z9",)), 5, progress=False)
    before = {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    real_write, written = sitk.WriteImage, []

    def fills_the_disk(image: sitk.Image, path: str, *args: object) -> None:
        real_write(image, path, *args)
        written.append(path)
        if len(written) >= 3:  # what a full disk leaves: the start of the gzip stream, no error
            Path(path).write_bytes(Path(path).read_bytes()[:30])

    monkeypatch.setattr(sitk, "WriteImage", fills_the_disk)
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0))
    src = la_source(tmp_path)
    assert main(["convert", "la-h5", str(src), "-d", "5", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"no space left on the disk of {raw} while writing Dataset005_LA" in err
    assert "B2_0000.nii.gz was written incompletely" in err and "only 0 bytes free" in err
    assert f"{raw / 'Dataset005_LA'} is as it was" in err and "Free up space" in err and "nnUNet_raw" in err
    assert {p.relative_to(raw): p.read_bytes() for p in raw.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset005_LA"]  # no temporary folder left


def test_target_checks(tmp_path: Path, raw: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = la_source(tmp_path)
    (raw / "Dataset005_Other").mkdir()
    with pytest.raises(ConversionError, match="already used by"):
        convert_la_h5(src, 5, progress=False)
    with pytest.raises(ConversionError, match="--name"):
        convert_la_h5(src, 6, name="bad name", progress=False)
    with pytest.raises(ConversionError, match="0-999"):
        convert_la_h5(src, 1000, progress=False)
    monkeypatch.delenv("nnUNet_raw")
    with pytest.raises(ConversionError, match="nnUNet_raw is not set"):
        convert_la_h5(src, 6, progress=False)


# --------------------------------------------------------------------------------------------------------------
# Errors: each check names the file, and nothing is written
# --------------------------------------------------------------------------------------------------------------


def expect_error(raw: Path, fn, *args, match: str, **kw) -> ConversionError:
    with pytest.raises(ConversionError, match=match) as info:
        fn(*args, 9, progress=False, **kw)
    assert list(raw.iterdir()) == [], "a failed conversion must not write anything"
    return info.value


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"image": None}, r"B2/mri_norm2\.h5 has no dataset 'image'"),
        ({"label": None}, r"B2/mri_norm2\.h5 has no dataset 'label'"),
        ({"label": np.zeros((6, 5, 3), np.uint8)}, r"B2/mri_norm2\.h5: image shape \(6, 5, 4\) does not match label"),
        ({"label": np.full((6, 5, 4), 2, np.uint8)}, r"B2/mri_norm2\.h5: label contains value\(s\) 2 outside"),
        (
            {"image": np.zeros((5, 4), np.float32), "label": np.zeros((5, 4), np.uint8)},
            r"B2/mri_norm2\.h5: image is 2D",
        ),
    ],
)
def test_la_h5_content_errors(tmp_path: Path, raw: Path, kw: dict, match: str) -> None:
    src = la_source(tmp_path)
    la_case(src, "B2", **kw)
    expect_error(raw, convert_la_h5, src, match=match)


def test_la_not_hdf5_and_missing_entries(tmp_path: Path, raw: Path) -> None:
    src = la_source(tmp_path, test=("T1",))
    (src / converters_la.LA_CASE_DIR / "A1" / converters_la.LA_H5_NAME).write_bytes(b"not an h5 file")
    expect_error(raw, convert_la_h5, src, match=r"A1/mri_norm2\.h5 cannot be read as HDF5")
    (src / "test.list").write_text("T1\nGONE\n")
    expect_error(
        raw,
        convert_la_h5,
        src,
        match=r"2018LA_Seg_Training Set/GONE/mri_norm2\.h5 does not exist \(case named by test\.list\)",
    )
    (src / "test.list").write_text("A1\n")
    expect_error(raw, convert_la_h5, src, match="in both the train and the test list")


def test_problems_are_collected(tmp_path: Path, raw: Path) -> None:
    src = la_source(tmp_path)
    la_case(src, "A1", label=np.full((6, 5, 4), 7, np.uint8))
    la_case(src, "C3", image=None)
    err = expect_error(raw, convert_la_h5, src, match="2 problems found")
    assert len(err.problems) == 2
    assert "restore the named files from the published dataset, or leave their cases out of the lists" in str(err)


@pytest.mark.parametrize(
    ("indices", "missing"),
    [([0, 2], "patient001_frame01_slice_1.h5"), ([1, 2, 4], "patient001_frame01_slice_3.h5")],
)
def test_acdc_missing_slice(tmp_path: Path, raw: Path, indices: list[int], missing: str) -> None:
    src = acdc_source(tmp_path)
    for f in (src / "data" / "slices").glob("patient001_frame01_*"):
        f.unlink()
    acdc_slices(src, "patient001_frame01", indices)
    expect_error(raw, convert_acdc_h5, src, match=re.escape(missing) + " is missing")


def test_acdc_missing_first_slice_when_others_start_at_0(tmp_path: Path, raw: Path) -> None:
    src = acdc_source(tmp_path)
    acdc_slices(src, "patient001_frame02", [0])  # frame02 is now 0..11, frame01 still 1..11
    expect_error(raw, convert_acdc_h5, src, match=r"patient001_frame01_slice_0\.h5 is missing")


def test_acdc_slices_of_different_size(tmp_path: Path, raw: Path) -> None:
    src = acdc_source(tmp_path)
    acdc_slices(src, "patient001_frame02", [5], hw=(6, 4))
    expect_error(
        raw, convert_acdc_h5, src, match=r"patient001_frame02 differ in H x W.*patient001_frame02_slice_5\.h5 is 6 x 4"
    )


def test_acdc_content_and_list_errors(tmp_path: Path, raw: Path) -> None:
    src = acdc_source(tmp_path)
    acdc_slices(src, "patient001_frame01", [5], labels=4)  # label value min(5, 4) = 4
    expect_error(raw, convert_acdc_h5, src, match=r"patient001_frame01_slice_5\.h5: label contains value\(s\) 4")
    acdc_slices(src, "patient001_frame01", [5])
    (src / "val.list").write_text("patient002_frame01\npatient007_frame01\n")
    expect_error(raw, convert_acdc_h5, src, match=r"data/patient007_frame01\.h5 does not exist")
    (src / "val.list").write_text("patient002_frame01\n")
    (src / "train.list").write_text("patient001_frame01\npatient009_frame01\n")
    expect_error(raw, convert_acdc_h5, src, match=r"no patient009_frame01_slice_\*\.h5")
    (src / "train.list").write_text("patient001_frame01\n")
    write_h5(src / "data" / "patient002_frame01.h5", np.zeros((3, 5, 4), np.float32), np.zeros((3, 4, 4), np.uint8))
    expect_error(raw, convert_acdc_h5, src, match=r"data/patient002_frame01\.h5: image shape")
    write_h5(src / "data" / "patient002_frame01.h5", np.zeros((3, 5, 4), np.float32), None)
    expect_error(raw, convert_acdc_h5, src, match=r"data/patient002_frame01\.h5 has no dataset 'label'")
    (src / "val.list").write_text("patient001_frame02\n")
    expect_error(raw, convert_acdc_h5, src, match=r"\['patient001'\] are in both the train and the val list")


def test_acdc_train_volume_cross_check(tmp_path: Path, raw: Path) -> None:
    """Full SSL4MIS layout also stores training volumes: a slice lost at the end shows up there."""
    src = acdc_source(tmp_path)
    write_h5(src / "data" / "patient001_frame01.h5", np.zeros((12, 5, 4), np.float32), np.zeros((12, 5, 4), np.uint8))
    expect_error(raw, convert_acdc_h5, src, match=r"patient001_frame01\.h5 has shape \(12, 5, 4\) but its 11 slices")


def test_acdc_lists_may_name_patients_or_slices(tmp_path: Path, raw: Path) -> None:
    src = acdc_source(tmp_path)
    (src / "train.list").write_text("patient001_frame01_slice_2\npatient001_frame01_slice_1\n")
    result = convert_acdc_h5(src, 4, progress=False)
    assert result.train_ids == ["patient001_frame01"]
    image, _ = read_nifti(result.dataset_dir / "imagesTr" / "patient001_frame01_0000.nii.gz")
    assert image.shape == (11, 5, 4)  # the whole volume, not only the listed slices
    (src / "train.list").write_text("patient001\n")
    result = convert_acdc_h5(src, 4, overwrite=True, progress=False)
    assert result.train_ids == ["patient001_frame01", "patient001_frame02"]
