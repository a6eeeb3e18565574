"""Tests for nnfiltermatch.evaluation.evaluate: folder evaluation, predictions off the reference grid, class names."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, generate_binary_structure
from test_metrics import _brute_force_nsd, _read, _shift

from nnfiltermatch.evaluation import evaluate as evaluation
from nnfiltermatch.evaluation.evaluate import EvaluationError, evaluate_folders
from nnfiltermatch.evaluation.metrics import METRICS, case_metrics, dice
from nnfiltermatch.evaluation.results import CSV_COLUMNS

sitk = pytest.importorskip("SimpleITK")


# ----------------------------------------------------------------------------------------------
# Folder evaluation
# ----------------------------------------------------------------------------------------------


def _write_like(array: np.ndarray, reference: sitk.Image, path: Path) -> None:
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.CopyInformation(reference)
    sitk.WriteImage(img, str(path))


def _make_folders(hippo_files: list[Path], root: Path, n: int = 4) -> tuple[Path, Path, list[str]]:
    """References = real labels copied as is; predictions = per-class perturbations on the same grid."""
    ref_dir, pred_dir = root / "ref", root / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    cross = generate_binary_structure(3, 1)
    ids = []
    for i, path in enumerate(hippo_files[:n]):
        shutil.copy(path, ref_dir / path.name)
        ref_img = sitk.ReadImage(str(path))
        ref = sitk.GetArrayFromImage(ref_img)
        pred = np.zeros(ref.shape, dtype=np.uint8)
        pred[binary_dilation(ref == 1, cross)] = 1
        pred[_shift(ref == 2, 1, axis=i % 3)] = 2
        _write_like(pred, ref_img, pred_dir / path.name)
        ids.append(path.name[: -len(".nii.gz")])
    return ref_dir, pred_dir, ids


def test_evaluate_folders_end_to_end(hippo_files: list[Path], tmp_path: Path) -> None:
    ref_dir, pred_dir, ids = _make_folders(hippo_files, tmp_path)
    # Case 0 loses class 2 entirely: undefined distances for that class.
    ref0 = sitk.ReadImage(str(ref_dir / f"{ids[0]}.nii.gz"))
    pred0 = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / f"{ids[0]}.nii.gz")))
    pred0[pred0 == 2] = 0
    _write_like(pred0, ref0, pred_dir / f"{ids[0]}.nii.gz")
    # A prediction without a reference and an unrelated file are ignored.
    shutil.copy(pred_dir / f"{ids[1]}.nii.gz", pred_dir / "extra_case.nii.gz")
    (pred_dir / "plans.json").write_text("{}")

    res = evaluate_folders(ref_dir, pred_dir, progress=False)
    assert res.labels == [1, 2] and res.units == "voxel" and res.n_cases == len(ids)
    assert res.unmatched_predictions == ["extra_case"] and res.missing == []
    assert len(res.rows) == len(ids) * 2
    assert res.n_undefined == {1: 0, 2: 1}

    # Rows equal a direct computation on the arrays.
    for case in ids:
        direct = case_metrics(
            _read(pred_dir / f"{case}.nii.gz"), _read(ref_dir / f"{case}.nii.gz"), [1, 2], spacing=None
        )
        for row in (r for r in res.rows if r.case == case):
            for m in METRICS:
                np.testing.assert_equal(getattr(row, m), direct[row.label][m])
    hd_class2 = [r.hd95 for r in res.rows if r.label == 2 and not math.isnan(r.hd95)]
    assert res.per_class_mean[2]["hd95"] == pytest.approx(np.mean(hd_class2))

    json_path = res.to_json(tmp_path / "out" / "summary.json")
    data = json.loads(json_path.read_text())
    assert data["units"] == "voxel" and data["labels"] == [1, 2] and data["n_cases"] == len(ids)
    assert data["per_class"]["2"]["n_undefined"] == 1
    assert data["per_class"]["1"]["mean"]["dice"] == pytest.approx(res.per_class_mean[1]["dice"])
    assert data["mean_over_classes"]["assd"] == pytest.approx(res.mean_over_classes["assd"])
    assert data["unmatched_predictions"] == ["extra_case"]
    row0 = next(r for r in data["cases"] if r["case"] == ids[0] and r["label"] == 2)
    assert row0["hd95"] is None and row0["asd"] is None and row0["dice"] == 0.0 and row0["n_pred"] == 0
    assert "NaN" not in json_path.read_text()
    assert not [p for p in json_path.parent.iterdir() if p.name != "summary.json"]  # no temp file left

    csv_path = res.to_csv(tmp_path / "out" / "summary.csv")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "case,label,dice,jaccard,hd95,asd,assd"
    assert tuple(lines[0].split(",")) == CSV_COLUMNS
    with csv_path.open() as handle:
        records = list(csv.DictReader(handle))
    assert len(records) == len(ids) * 2
    assert [(r["case"], int(r["label"])) for r in records] == [(r.case, r.label) for r in res.rows]
    first = next(r for r in res.rows if r.case == ids[1] and r.label == 1)
    rec = next(r for r in records if r["case"] == ids[1] and r["label"] == "1")
    assert float(rec["dice"]) == first.dice and float(rec["hd95"]) == first.hd95
    assert math.isnan(float(next(r for r in records if r["case"] == ids[0] and r["label"] == "2")["asd"]))

    table = res.format_table()
    assert "voxels" in table and "extra_case" in table and "1/4" in table


def test_evaluate_folders_mm_units_use_header_spacing(hippo_files: list[Path], tmp_path: Path) -> None:
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    sitk_spacing = (2.0, 1.0, 0.5)  # x, y, z as SimpleITK stores it
    arrays = {}
    for path in hippo_files[:2]:
        ref = _read(path).astype(np.uint8)
        pred = ref.copy()
        pred[_shift(ref == 1, 1, axis=0)] = 1  # grows label 1 along numpy axis 0 (z)
        img = sitk.GetImageFromArray(ref)
        img.SetSpacing(sitk_spacing)
        sitk.WriteImage(img, str(ref_dir / path.name))
        _write_like(pred, img, pred_dir / path.name)
        arrays[path.name[: -len(".nii.gz")]] = (pred, ref)

    res_mm = evaluate_folders(ref_dir, pred_dir, labels=[1, 2], units="mm", progress=False)
    res_vox = evaluate_folders(ref_dir, pred_dir, labels=[1, 2], units="voxel", progress=False)
    numpy_spacing = tuple(reversed(sitk_spacing))  # (z, y, x) = (0.5, 1.0, 2.0)
    for case, (pred, ref) in arrays.items():
        mm = case_metrics(pred, ref, [1], numpy_spacing)[1]
        vox = case_metrics(pred, ref, [1], None)[1]
        wrong_order = case_metrics(pred, ref, [1], sitk_spacing)[1]
        row_mm = next(r for r in res_mm.rows if r.case == case and r.label == 1)
        row_vox = next(r for r in res_vox.rows if r.case == case and r.label == 1)
        assert row_mm.asd == pytest.approx(mm["asd"]) and row_mm.hd95 == pytest.approx(mm["hd95"])
        assert row_vox.asd == pytest.approx(vox["asd"]) and row_vox.assd == pytest.approx(vox["assd"])
        assert row_mm.asd != pytest.approx(row_vox.asd)
        assert row_mm.assd != pytest.approx(wrong_order["assd"])
        assert row_mm.dice == row_vox.dice
    assert res_mm.units == "mm" and "mm" in res_mm.format_table()


def test_missing_prediction(hippo_files: list[Path], tmp_path: Path) -> None:
    ref_dir, pred_dir, ids = _make_folders(hippo_files, tmp_path, n=3)
    (pred_dir / f"{ids[1]}.nii.gz").unlink()
    with pytest.raises(EvaluationError, match=ids[1]) as info:
        evaluate_folders(ref_dir, pred_dir, progress=False)
    assert "allow_missing" in str(info.value)
    res = evaluate_folders(ref_dir, pred_dir, allow_missing=True, progress=False)
    assert res.missing == [ids[1]]
    assert res.n_cases == 2 and ids[1] not in {r.case for r in res.rows}
    assert json.loads(res.to_json(tmp_path / "s.json").read_text())["missing"] == [ids[1]]
    assert ids[1] in res.format_table()


def test_shape_mismatch(hippo_files: list[Path], tmp_path: Path) -> None:
    ref_dir, pred_dir, ids = _make_folders(hippo_files, tmp_path, n=2)
    bad = pred_dir / f"{ids[1]}.nii.gz"
    arr = _read(bad)[:, :-2, :]
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(bad))
    with pytest.raises(EvaluationError, match=r"\(different size, origin, direction\)") as info:
        evaluate_folders(ref_dir, pred_dir, progress=False)
    assert str(bad) in str(info.value) and "--resample-to-reference" in str(info.value)


@pytest.mark.parametrize("where", ["pred", "ref"])
def test_unexpected_label_value(hippo_files: list[Path], tmp_path: Path, where: str) -> None:
    ref_dir, pred_dir, ids = _make_folders(hippo_files, tmp_path, n=2)
    bad = (pred_dir if where == "pred" else ref_dir) / f"{ids[0]}.nii.gz"
    img = sitk.ReadImage(str(bad))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = 3
    _write_like(arr, img, bad)
    with pytest.raises(EvaluationError, match=r"\[3\]") as info:
        evaluate_folders(ref_dir, pred_dir, labels=[1, 2], progress=False)
    assert str(bad) in str(info.value)
    # Without explicit labels a stray prediction label is only warned about; a reference label is evaluated.
    if where == "pred":
        with pytest.warns(UserWarning, match="occur in no reference"):
            res = evaluate_folders(ref_dir, pred_dir, progress=False)
        assert res.labels == [1, 2]
    else:
        assert evaluate_folders(ref_dir, pred_dir, progress=False).labels == [1, 2, 3]


def test_non_integer_label_map_rejected(tmp_path: Path) -> None:
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    ref = np.zeros((6, 7, 8), dtype=np.float32)
    ref[2:4, 2:5, 3:6] = 1.0
    sitk.WriteImage(sitk.GetImageFromArray(ref), str(ref_dir / "c1.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(ref * 0.6), str(pred_dir / "c1.nii.gz"))
    with pytest.raises(EvaluationError, match="non-integer") as info:
        evaluate_folders(ref_dir, pred_dir, progress=False)
    assert str(pred_dir / "c1.nii.gz") in str(info.value)
    # Float label maps holding whole numbers are fine (some real references are stored as float32).
    sitk.WriteImage(sitk.GetImageFromArray(ref), str(pred_dir / "c1.nii.gz"))
    res = evaluate_folders(ref_dir, pred_dir, progress=False)
    assert res.labels == [1] and res.rows[0].dice == 1.0
    # NaN in a float reference: ITK would read it as 0 (background), so it must be refused by name
    ref[0, 0, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(ref), str(ref_dir / "c1.nii.gz"))
    with pytest.raises(EvaluationError, match="1 NaN and 0 infinite") as info:
        evaluate_folders(ref_dir, pred_dir, progress=False)
    assert str(ref_dir / "c1.nii.gz") in str(info.value)


def test_empty_and_nonexistent_folders(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[1:3, 1:3, 1:3] = 1
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(full / "c1.nii.gz"))

    with pytest.raises(EvaluationError, match="reference folder .* has no files ending in '.nii.gz'"):
        evaluate_folders(empty, full, progress=False)
    with pytest.raises(EvaluationError, match="prediction folder .*empty"):
        evaluate_folders(full, empty, progress=False)
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate_folders(tmp_path / "nope", full, progress=False)
    (empty / "c1.nii").write_bytes(b"")
    with pytest.raises(EvaluationError, match="set file_ending"):
        evaluate_folders(full, empty, progress=False)
    with pytest.raises(EvaluationError, match="units"):
        evaluate_folders(full, full, units="cm", progress=False)  # type: ignore[arg-type]
    with pytest.raises(EvaluationError, match="background"):
        evaluate_folders(full, full, labels=[0, 1], progress=False)


# ----------------------------------------------------------------------------------------------
# Geometry: predictions must lie on the reference grid (or be resampled onto it)
# ----------------------------------------------------------------------------------------------

REF_SPACING = (0.8, 1.0, 1.5)  # SimpleITK (x, y, z) order


REF_ORIGIN = (3.0, -2.0, 5.0)


def _tiny_labelmap(seed: int = 0) -> np.ndarray:
    """(z, y, x) = (8, 10, 12) label map with two blobs off-centre in x, so that an x-flip moves them."""
    arr = np.zeros((8, 10, 12), dtype=np.uint8)
    arr[2:6, 2:7, 1:5] = 1
    arr[3:5, 4:8, 6:8] = 2
    arr[1 + seed % 3, 5, 9] = 1  # a stray voxel that makes cases differ
    return arr


def _write_ref(arr: np.ndarray, path: Path) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(REF_SPACING)
    img.SetOrigin(REF_ORIGIN)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return sitk.ReadImage(str(path))


def _geometry_folders(root: Path, n: int = 2) -> tuple[Path, Path]:
    """``n`` reference cases c1..cn and exact copies as predictions (same voxels, same header)."""
    ref_dir, pred_dir = root / "ref", root / "pred"
    for i in range(1, n + 1):
        img = _write_ref(_tiny_labelmap(i), ref_dir / f"c{i}.nii.gz")
        pred_dir.mkdir(exist_ok=True)
        sitk.WriteImage(img, str(pred_dir / f"c{i}.nii.gz"))
    return ref_dir, pred_dir


def _no_metrics(*args: object, **kwargs: object) -> None:
    raise AssertionError("a metric was computed before the geometry was checked")


def _rotation_z(angle: float) -> tuple[float, ...]:
    c, s = math.cos(angle), math.sin(angle)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


def test_flipped_prediction_is_refused_then_resampled_to_dice_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sitk.Flip stores the same physical mask with the x axis reversed: compared voxel-wise it scored far below 1."""
    ref_dir, pred_dir = _geometry_folders(tmp_path)
    ref_img = sitk.ReadImage(str(ref_dir / "c1.nii.gz"))
    flipped = sitk.Flip(ref_img, [True, False, False])
    sitk.WriteImage(flipped, str(pred_dir / "c1.nii.gz"))
    # The test means something: the stored voxels differ, the physical masks do not.
    ref_arr, flipped_arr = _read(ref_dir / "c1.nii.gz"), _read(pred_dir / "c1.nii.gz")
    assert dice(flipped_arr == 1, ref_arr == 1) < 0.9
    assert np.array_equal(flipped_arr[:, :, ::-1], ref_arr)

    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "case_metrics", _no_metrics)
        with pytest.raises(EvaluationError) as info:
            evaluate_folders(ref_dir, pred_dir, progress=False)
    message = str(info.value)
    assert message.startswith("1 problem(s):")
    assert "case 'c1'" in message and "case 'c2'" not in message
    assert str(pred_dir / "c1.nii.gz") in message and str(ref_dir / "c1.nii.gz") in message
    assert "(different origin, direction)" in message
    assert "prediction: size (12, 10, 8), spacing (0.8, 1, 1.5), origin (11.8, -2, 5), direction (-1, 0, 0," in message
    assert "reference:  size (12, 10, 8), spacing (0.8, 1, 1.5), origin (3, -2, 5), direction (1, 0, 0," in message
    assert "--resample-to-reference" in message

    res = evaluate_folders(ref_dir, pred_dir, progress=False, resample_to_reference=True)
    assert [r.case for r in res.resampled] == ["c1"]
    assert res.resampled[0].differs == ("origin", "direction")
    assert res.resampled[0].foreground_mm3_before == pytest.approx(res.resampled[0].foreground_mm3_after)
    for row in res.rows:
        assert (row.dice, row.jaccard, row.hd95, row.asd, row.assd) == (1.0, 1.0, 0.0, 0.0, 0.0), row
    assert "resampled onto the reference grid with nearest neighbour (1 of 2):" in res.format_table()
    assert "  c1: differed in origin, direction; foreground" in res.format_table()
    assert res.to_dict()["resampled"][0]["case"] == "c1"


def test_geometry_refusal_through_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nnfiltermatch.cli import main

    ref_dir, pred_dir = _geometry_folders(tmp_path)
    sitk.WriteImage(
        sitk.Flip(sitk.ReadImage(str(ref_dir / "c2.nii.gz")), [True, False, False]), str(pred_dir / "c2.nii.gz")
    )
    argv = ["evaluate", "-r", str(ref_dir), "--pred", str(pred_dir)]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("nnfiltermatch evaluate: error: 1 problem(s):\n  case 'c2': prediction ")
    assert "dice" not in captured.out  # no table: refused before any metric
    assert main([*argv, "--resample-to-reference"]) == 0
    out = capsys.readouterr().out
    assert "c2: differed in origin, direction" in out
    assert "1.0000±0.0000" in out


def test_spacing_mismatch_is_refused_naming_the_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same voxels with 2 mm spacing used to score Dice 1.0; now refused, before any metric, in either unit."""
    ref_dir, pred_dir = _geometry_folders(tmp_path, n=3)
    img = sitk.ReadImage(str(pred_dir / "c2.nii.gz"))
    img.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(img, str(pred_dir / "c2.nii.gz"))
    monkeypatch.setattr(evaluation, "case_metrics", _no_metrics)
    for units in ("voxel", "mm"):
        with pytest.raises(EvaluationError, match=r"case 'c2': .* \(different spacing\)") as info:
            evaluate_folders(ref_dir, pred_dir, units=units, progress=False)  # type: ignore[arg-type]
        message = str(info.value)
        assert "spacing (2, 2, 2)" in message and "spacing (0.8, 1, 1.5)" in message
        assert "'c1'" not in message and "'c3'" not in message


def test_origin_mismatch_is_refused(tmp_path: Path) -> None:
    ref_dir, pred_dir = _geometry_folders(tmp_path)
    img = sitk.ReadImage(str(pred_dir / "c1.nii.gz"))
    img.SetOrigin((REF_ORIGIN[0] + 10.0, REF_ORIGIN[1], REF_ORIGIN[2]))
    sitk.WriteImage(img, str(pred_dir / "c1.nii.gz"))
    with pytest.raises(EvaluationError, match=r"case 'c1': .* \(different origin\)") as info:
        evaluate_folders(ref_dir, pred_dir, progress=False)
    assert "origin (13, -2, 5)" in str(info.value) and "origin (3, -2, 5)" in str(info.value)
    # Resampled, the mask moved by 10 mm (12.5 voxels in x) loses its overlap with the reference.
    res = evaluate_folders(ref_dir, pred_dir, progress=False, resample_to_reference=True)
    assert [r.case for r in res.resampled] == ["c1"]
    assert all(r.dice < 0.5 for r in res.rows if r.case == "c1")


@pytest.mark.parametrize(
    ("change", "accepted"),
    [
        ("spacing*(1+5e-5)", True),
        ("spacing*(1+1e-3)", False),
        ("origin+0.01voxel", True),
        ("origin+0.2voxel", False),
        ("rotate 5e-5 rad", True),
        ("rotate 1e-3 rad", False),
    ],
)
def test_geometry_within_tolerance_is_accepted(tmp_path: Path, change: str, accepted: bool) -> None:
    """Header round-off passes untouched; just beyond the stated tolerance is refused."""
    ref_dir, pred_dir = _geometry_folders(tmp_path, n=1)
    img = sitk.ReadImage(str(pred_dir / "c1.nii.gz"))
    if change.startswith("spacing"):
        factor = 1 + float(change.split("+")[1].rstrip(")"))
        img.SetSpacing(tuple(s * factor for s in REF_SPACING))
    elif change.startswith("origin"):
        shift = float(change.split("+")[1].removesuffix("voxel")) * min(REF_SPACING)
        img.SetOrigin((REF_ORIGIN[0] + shift, REF_ORIGIN[1], REF_ORIGIN[2]))
    else:
        img.SetDirection(_rotation_z(float(change.split()[1])))
    sitk.WriteImage(img, str(pred_dir / "c1.nii.gz"))
    if accepted:
        res = evaluate_folders(ref_dir, pred_dir, progress=False)
        assert res.resampled == [] and all(r.dice == 1.0 for r in res.rows)
    else:
        what = change.split("*")[0].split("+")[0].replace("rotate", "direction").split()[0]
        with pytest.raises(EvaluationError, match=rf"\(different {what}\)"):
            evaluate_folders(ref_dir, pred_dir, progress=False)


def test_resampling_also_fixes_a_size_mismatch_but_not_dimensionality(tmp_path: Path) -> None:
    """A prediction cropped to a sub-box (same spacing, shifted origin) is padded back onto the reference grid."""
    ref_dir, pred_dir = _geometry_folders(tmp_path, n=1)
    img = sitk.ReadImage(str(ref_dir / "c1.nii.gz"))
    cropped = img[1:11, 1:9, 1:7]  # x, y, z; keeps the physical position of every voxel
    sitk.WriteImage(cropped, str(pred_dir / "c1.nii.gz"))
    with pytest.raises(EvaluationError, match=r"\(different size, origin\)"):
        evaluate_folders(ref_dir, pred_dir, progress=False)
    res = evaluate_folders(ref_dir, pred_dir, progress=False, resample_to_reference=True)
    assert res.resampled[0].differs == ("size", "origin") and all(r.dice == 1.0 for r in res.rows)
    sitk.WriteImage(img[:, :, 3], str(pred_dir / "c1.nii.gz"))  # a 2D slice
    with pytest.raises(EvaluationError, match=r"\(different dimensionality\)"):
        evaluate_folders(ref_dir, pred_dir, progress=False, resample_to_reference=True)


# ----------------------------------------------------------------------------------------------
# Class names from dataset.json
# ----------------------------------------------------------------------------------------------


def test_class_names_from_dataset_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nnfiltermatch.cli import main

    dataset = tmp_path / "Dataset901_Tiny"
    ref_dir, pred_dir = _geometry_folders(dataset)
    ref_dir = ref_dir.rename(dataset / "labelsTs")
    labels = {"background": 0, "liver": 1, "tumour": 2, "whole": [1, 2]}  # a region entry is not a class
    (dataset / "dataset.json").write_text(json.dumps({"labels": labels, "file_ending": ".nii.gz"}))

    res = evaluate_folders(ref_dir, pred_dir, progress=False)
    assert res.label_names == {1: "liver", 2: "tumour"}
    assert res.label_names_source == str(dataset / "dataset.json")
    table = res.format_table()
    assert "\nliver (1)  " in table and "\ntumour (2)  " in table
    data = res.to_dict()
    assert list(data["per_class"]) == ["1", "2"] and data["labels"] == [1, 2]  # keys stay the label values
    assert data["label_names"] == {"1": "liver", "2": "tumour"} and data["per_class"]["2"]["name"] == "tumour"
    assert {r["label"] for r in data["cases"]} == {1, 2}

    # The command prints them; an explicit --dataset-json wins; nnU-Net v1's {"1": name} works too.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"labels": {"0": "background", "1": "Anterior", "2": "Posterior"}}))
    assert main(["evaluate", "-r", str(ref_dir), "--pred", str(pred_dir)]) == 0
    assert "\nliver (1)  " in capsys.readouterr().out
    assert main(["evaluate", "-r", str(ref_dir), "--pred", str(pred_dir), "--dataset-json", str(other)]) == 0
    out = capsys.readouterr().out
    assert "\nAnterior (1)  " in out and "\nPosterior (2)  " in out and f"class names from {other}" in out
    assert main(["evaluate", "-r", str(ref_dir), "--pred", str(pred_dir), "--dataset-json", str(tmp_path / "no")]) == 2
    assert "nnfiltermatch evaluate: error: cannot read" in capsys.readouterr().err

    # Without dataset.json beside the references, the one nnU-Net writes into the prediction folder is used;
    # without any, classes stay numbered and JSON names are null.
    (dataset / "dataset.json").rename(pred_dir / "dataset.json")
    assert evaluate_folders(ref_dir, pred_dir, progress=False).label_names == {1: "liver", 2: "tumour"}
    (pred_dir / "dataset.json").unlink()
    plain = evaluate_folders(ref_dir, pred_dir, progress=False)
    assert plain.label_names == {} and plain.label_names_source is None
    assert "\n1  " in plain.format_table() and plain.to_dict()["label_names"] == {"1": None, "2": None}
    # A broken dataset.json that was only found is warned about, not fatal.
    (ref_dir / "dataset.json").write_text("{not json")
    with pytest.warns(UserWarning, match="class names not used"):
        assert evaluate_folders(ref_dir, pred_dir, progress=False).label_names == {}


# ----------------------------------------------------------------------------------------------
# Normalised surface Dice
# ----------------------------------------------------------------------------------------------


def test_nsd_in_folder_evaluation_uses_header_spacing(tmp_path: Path) -> None:
    ref_dir, pred_dir = _geometry_folders(tmp_path, n=2)
    ref_img = sitk.ReadImage(str(ref_dir / "c1.nii.gz"))
    pred_arr = _tiny_labelmap(1)
    pred_arr[:, :, 1:] = pred_arr[:, :, :-1].copy()  # shift one voxel (0.8 mm) along x
    _write_like(pred_arr, ref_img, pred_dir / "c1.nii.gz")
    numpy_spacing = tuple(reversed(REF_SPACING))
    ref_arr = _read(ref_dir / "c1.nii.gz")
    # 0.9 mm covers the 0.8 mm shift but not 1 voxel: NSD in voxels would be 0.61 instead of 1.
    in_mm = _brute_force_nsd(pred_arr == 1, ref_arr == 1, 0.9, numpy_spacing)
    in_voxels = _brute_force_nsd(pred_arr == 1, ref_arr == 1, 0.9, (1.0, 1.0, 1.0))
    assert in_mm == 1.0 and in_voxels < 0.7
    for units in ("voxel", "mm"):
        res = evaluate_folders(ref_dir, pred_dir, units=units, nsd_tolerance=0.9, progress=False)  # type: ignore[arg-type]
        row = next(r for r in res.rows if r.case == "c1" and r.label == 1)
        assert row.nsd == pytest.approx(in_mm)
        assert row.dice < 1.0
    assert res.metrics == (*METRICS, "nsd") and "nsd@0.9mm" in res.format_table()
    assert res.to_dict()["nsd_tolerance_mm"] == 0.9 and "nsd" in res.to_dict()["cases"][0]
    header = res.to_csv(tmp_path / "s.csv").read_text().splitlines()[0]
    assert header == "case,label,dice,jaccard,hd95,asd,assd,nsd"
    plain = evaluate_folders(ref_dir, pred_dir, progress=False)
    assert plain.to_csv(tmp_path / "p.csv").read_text().splitlines()[0] == ",".join(CSV_COLUMNS)
    assert "nsd" not in plain.to_dict()["cases"][0] and "nsd" not in plain.format_table()
    with pytest.raises(EvaluationError, match="--nsd-tolerance"):
        evaluate_folders(ref_dir, pred_dir, nsd_tolerance=-1.0, progress=False)
