"""Tests for nnfiltermatch.evaluation.metrics: empty-mask conventions, agreement with medpy on real labels, NSD."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter, generate_binary_structure

from nnfiltermatch.evaluation.metrics import (
    METRICS,
    asd,
    assd,
    binary_metrics,
    case_metrics,
    dice,
    distance_metrics,
    hd95,
    jaccard,
    normalized_surface_dice,
    surface_distances,
)

sitk = pytest.importorskip("SimpleITK")


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _shift(mask: np.ndarray, offset: int, axis: int) -> np.ndarray:
    """Shift with zero fill (np.roll would wrap objects around the border)."""
    out = np.zeros_like(mask)
    src = [slice(None)] * mask.ndim
    dst = [slice(None)] * mask.ndim
    if offset >= 0:
        src[axis], dst[axis] = slice(0, mask.shape[axis] - offset), slice(offset, None)
    else:
        src[axis], dst[axis] = slice(-offset, None), slice(0, mask.shape[axis] + offset)
    out[tuple(dst)] = mask[tuple(src)]
    return out


def _perturbations(ndim: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    cross = generate_binary_structure(ndim, 1)
    return {
        "erosion": lambda m: binary_erosion(m, cross),
        "dilation": lambda m: binary_dilation(m, cross, iterations=2),
        "shift": lambda m: _shift(m, 2, axis=ndim - 1),
        "shift_dilate": lambda m: _shift(binary_dilation(m, cross), -1, axis=0),
    }


def _assert_matches_medpy(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...] | None) -> None:
    medpy = pytest.importorskip("medpy.metric.binary", reason="medpy (dev extra) is needed for the cross-check")
    ours = binary_metrics(pred, ref, spacing)
    expected = {
        "dice": medpy.dc(pred, ref),
        "jaccard": medpy.jc(pred, ref),
        "hd95": medpy.hd95(pred, ref, voxelspacing=spacing),
        "asd": medpy.asd(pred, ref, voxelspacing=spacing),
        "assd": medpy.assd(pred, ref, voxelspacing=spacing),
    }
    for name, value in expected.items():
        tol = 1e-6 if name in ("dice", "jaccard") else 1e-3
        assert ours[name] == pytest.approx(value, abs=tol), (name, spacing)
    # The standalone functions agree with the combined one.
    assert dice(pred, ref) == ours["dice"] and jaccard(pred, ref) == ours["jaccard"]
    assert hd95(pred, ref, spacing) == ours["hd95"]
    assert asd(pred, ref, spacing) == ours["asd"]
    assert assd(pred, ref, spacing) == ours["assd"]


# ----------------------------------------------------------------------------------------------
# Conventions
# ----------------------------------------------------------------------------------------------


def test_both_empty_is_perfect() -> None:
    empty = np.zeros((8, 9, 10), dtype=bool)
    m = binary_metrics(empty, empty, (1.0, 0.5, 2.0))
    assert m == {"dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0, "assd": 0.0, "n_ref": 0, "n_pred": 0}


@pytest.mark.parametrize("empty_side", ["pred", "ref"])
def test_one_empty_gives_zero_overlap_and_nan_distances(empty_side: str) -> None:
    obj = np.zeros((8, 9, 10), dtype=bool)
    obj[2:5, 3:6, 4:7] = True
    empty = np.zeros_like(obj)
    pred, ref = (empty, obj) if empty_side == "pred" else (obj, empty)
    m = binary_metrics(pred, ref)
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0
    for name in ("hd95", "asd", "assd"):
        assert math.isnan(m[name]), name
    assert (m["n_pred"], m["n_ref"]) == ((0, 27) if empty_side == "pred" else (27, 0))
    with pytest.raises(ValueError, match="empty"):
        surface_distances(pred, ref)


def test_identical_masks() -> None:
    obj = np.zeros((12, 12, 12), dtype=bool)
    obj[3:9, 2:10, 4:8] = True
    m = binary_metrics(obj, obj.copy(), (0.7, 1.0, 3.0))
    assert m["dice"] == 1.0 and m["jaccard"] == 1.0
    assert m["hd95"] == 0.0 and m["asd"] == 0.0 and m["assd"] == 0.0


def test_asd_is_directed_pred_to_ref() -> None:
    # A single voxel inside a big cube: pred->ref is short, ref->pred long, so asd must differ from asd(ref, pred).
    ref = np.zeros((15, 15, 15), dtype=bool)
    ref[2:13, 2:13, 2:13] = True
    pred = np.zeros_like(ref)
    pred[7, 7, 2] = True  # on the reference's surface
    assert asd(pred, ref) == 0.0
    assert asd(ref, pred) > 3.0
    assert assd(pred, ref) == pytest.approx(assd(ref, pred))


def test_invalid_inputs() -> None:
    a = np.zeros((4, 4), dtype=bool)
    with pytest.raises(ValueError, match="shape"):
        dice(a, np.zeros((4, 5), dtype=bool))
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        distance_metrics(a, a, (1.0, 0.0))


def test_case_metrics_labels_and_counts() -> None:
    ref = np.zeros((10, 10, 10), dtype=np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[6:9, 6:9, 6:9] = 2
    pred = ref.copy()
    pred[pred == 2] = 0  # label 2 missed entirely
    out = case_metrics(pred, ref, labels=[1, 2, 3], spacing=(1.0, 1.0, 1.0))
    assert set(out) == {1, 2, 3}
    assert set(out[1]) == {*METRICS, "n_ref", "n_pred"}
    assert out[1]["dice"] == 1.0 and out[1]["hd95"] == 0.0 and out[1]["n_ref"] == 27 == out[1]["n_pred"]
    assert out[2]["dice"] == 0.0 and math.isnan(out[2]["hd95"]) and out[2]["n_ref"] == 27 and out[2]["n_pred"] == 0
    assert out[3]["dice"] == 1.0 and out[3]["assd"] == 0.0  # absent from both
    with pytest.raises(ValueError, match="shape"):
        case_metrics(pred[:-1], ref, [1])


# ----------------------------------------------------------------------------------------------
# Agreement with medpy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [None, (1.0, 0.7, 2.5)])
def test_matches_medpy_on_synthetic_blobs_touching_the_border(spacing: tuple[float, ...] | None) -> None:
    # Smoothed noise gives several components, holes and objects cut by the array border (cropping must not
    # change the erosion there).
    rng = np.random.default_rng(0)
    for _ in range(4):
        pred = gaussian_filter(rng.random((24, 20, 16)), 2) > 0.52
        ref = gaussian_filter(rng.random((24, 20, 16)), 2) > 0.52
        assert pred.any() and ref.any() and pred[0].any()
        _assert_matches_medpy(pred, ref, spacing)


@pytest.mark.parametrize("spacing", [None, (0.7, 1.3)])
def test_matches_medpy_2d_synthetic(spacing: tuple[float, ...] | None) -> None:
    yy, xx = np.mgrid[:60, :50]
    ref = (yy - 30) ** 2 + (xx - 25) ** 2 < 15**2
    pred = ((yy - 27) / 1.2) ** 2 + (xx - 28) ** 2 < 13**2
    pred[5:8, 40:49] = True  # a false-positive island
    _assert_matches_medpy(pred, ref, spacing)


@pytest.mark.parametrize("spacing", [None, (1.0, 0.7, 2.5)])
def test_matches_medpy_on_real_hippocampus(hippo_files: list[Path], spacing: tuple[float, ...] | None) -> None:
    checked = 0
    for path in hippo_files:
        labelmap = _read(path)
        for label in (1, 2):
            ref = labelmap == label
            for name, perturb in _perturbations(3).items():
                pred = perturb(ref)
                assert pred.any(), (path.name, label, name)
                _assert_matches_medpy(pred, ref, spacing)
                checked += 1
    assert checked == 5 * 2 * 4


@pytest.mark.parametrize("spacing", [None, (0.7, 1.3)])
def test_matches_medpy_on_real_2d_slices(hippo_files: list[Path], spacing: tuple[float, ...] | None) -> None:
    for path in hippo_files[:3]:
        labelmap = _read(path)
        z = int(np.argmax((labelmap > 0).sum(axis=(1, 2))))  # the slice with most foreground
        for label in (1, 2):
            ref = labelmap[z] == label
            if not ref.any():
                continue
            for perturb in _perturbations(2).values():
                pred = perturb(ref)
                if pred.any():
                    _assert_matches_medpy(pred, ref, spacing)


def test_speed_large_volume_modest_object() -> None:
    zz, yy, xx = np.ogrid[:200, :200, :100]
    ref = (zz - 100) ** 2 + (yy - 90) ** 2 + (xx - 50) ** 2 < 20**2
    pred = (zz - 103) ** 2 + ((yy - 92) / 1.1) ** 2 + (xx - 48) ** 2 < 19**2
    labelmap_ref = ref.astype(np.uint8)
    labelmap_pred = pred.astype(np.uint8)
    case_metrics(labelmap_pred[:20], labelmap_ref[:20], [1])  # warm-up (imports, allocator)
    start = time.perf_counter()
    out = case_metrics(labelmap_pred, labelmap_ref, [1], spacing=(1.0, 0.8, 2.0))
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"case_metrics took {elapsed:.2f} s on a 200x200x100 volume"
    assert 0.7 < out[1]["dice"] < 1.0 and 0.0 < out[1]["asd"] < out[1]["hd95"]


# ----------------------------------------------------------------------------------------------
# Normalised surface Dice
# ----------------------------------------------------------------------------------------------


def _brute_force_nsd(pred: np.ndarray, ref: np.ndarray, tolerance: float, spacing: tuple[float, ...]) -> float:
    """NSD by definition: surface voxel = object voxel with a 6-neighbour outside the object or the array;
    all pairwise physical distances between the two surfaces; share of surface voxels within the tolerance."""

    def surface_points(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1)
        points = []
        for idx in zip(*np.nonzero(mask)):
            p = tuple(i + 1 for i in idx)
            for axis in range(mask.ndim):
                for step in (-1, 1):
                    q = list(p)
                    q[axis] += step
                    if not padded[tuple(q)]:
                        points.append(idx)
                        break
                else:
                    continue
                break
        return np.array(points, dtype=float) * np.array(spacing)

    sp, sr = surface_points(pred), surface_points(ref)
    dist = np.sqrt(((sp[:, None, :] - sr[None, :, :]) ** 2).sum(-1))
    close = np.count_nonzero(dist.min(axis=1) <= tolerance) + np.count_nonzero(dist.min(axis=0) <= tolerance)
    return close / (len(sp) + len(sr))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nsd_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    spacing = (1.5, 1.0, 0.8)
    ref = gaussian_filter(rng.random((9, 10, 11)), 1.5) > 0.5
    pred = gaussian_filter(rng.random((9, 10, 11)), 1.5) > 0.5
    assert ref.any() and pred.any() and not np.array_equal(ref, pred)
    values = []
    for tolerance in (0.0, 0.9, 1.3, 2.1, 4.0):
        expected = _brute_force_nsd(pred, ref, tolerance, spacing)
        got = normalized_surface_dice(pred, ref, tolerance, spacing)
        assert got == pytest.approx(expected, abs=1e-12), tolerance
        assert binary_metrics(pred, ref, None, nsd_tolerance=tolerance, nsd_spacing=spacing)["nsd"] == got
        values.append(got)
    assert values == sorted(values) and 0 < values[1] < values[-1] <= 1
    assert normalized_surface_dice(ref, ref, 0.0, spacing) == 1.0
    empty = np.zeros_like(ref)
    assert normalized_surface_dice(empty, empty, 1.0) == 1.0 and normalized_surface_dice(pred, empty, 1.0) == 0.0
    with pytest.raises(ValueError, match="tolerance"):
        normalized_surface_dice(pred, ref, -1.0)
