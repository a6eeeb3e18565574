"""Segmentation metrics for ``nnfiltermatch evaluate``: Dice, Jaccard, HD95, ASD, ASSD and optionally NSD.

The distance metrics reproduce ``medpy.metric.binary`` (version 0.5.2) exactly, because the
semi-supervised segmentation literature (SSL4MIS, UA-MT, ...) reports numbers computed with medpy:

* the surface of a mask is ``mask XOR binary_erosion(mask, generate_binary_structure(ndim, 1))``
  (connectivity 1, border value 0, so object voxels on the array border are surface voxels);
* ``d(A->B)`` is the Euclidean distance (``distance_transform_edt`` with ``sampling=spacing``) from
  every surface voxel of ``A`` to the nearest surface voxel of ``B``;
* ``hd95`` is the 95th percentile (numpy's default linear interpolation) of the *pooled* distances
  ``d(pred->ref)`` and ``d(ref->pred)``, as medpy computes it (not the maximum of the two directed
  95th percentiles that MONAI and DeepMind's ``surface-distance`` use);
* ``asd`` is the mean of ``d(pred->ref)`` only (medpy's ``asd(pred, ref)``, the number SSL papers report);
* ``assd`` is the mean of the pooled distances (medpy 0.5.x; medpy 0.4 averaged the two directed means).

Unlike medpy, both directions are computed once per mask pair, on the masks cropped to their joint
bounding box plus a one-voxel margin, which gives identical values far faster on large volumes.

Conventions for empty masks (medpy raises instead):

* both masks empty: Dice 1, Jaccard 1, all distances 0 (a correctly predicted absent structure);
* exactly one mask empty: Dice 0, Jaccard 0, all distances NaN (undefined, never 0), so that means
  over cases skip them (``np.nanmean``) and ``n_undefined`` counts them.

Normalised surface Dice (NSD, Nikolov et al. 2021) at tolerance ``tau`` is computed from the same surface voxels
and distances: ``(#{d(pred->ref) <= tau} + #{d(ref->pred) <= tau}) / (#surface(pred) + #surface(ref))``, i.e.
counted per surface voxel (MONAI's ``compute_surface_dice`` without sub-voxel areas). Like Dice it is 1 when both
masks are empty and 0 when exactly one is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

__all__ = [
    "METRICS",
    "NSD",
    "asd",
    "assd",
    "binary_metrics",
    "case_metrics",
    "check_tolerance",
    "dice",
    "distance_metrics",
    "hd95",
    "jaccard",
    "normalized_surface_dice",
    "surface_distances",
]

METRICS: tuple[str, ...] = ("dice", "jaccard", "hd95", "asd", "assd")
"""Metric names, in the order used by tables, CSV columns and JSON."""

NSD = "nsd"
"""Name of the optional normalised surface Dice metric (column, JSON key), present only when a tolerance is set."""

Spacing = Sequence[float] | float | None


# ----------------------------------------------------------------------------------------------
# Array metrics for one binary mask pair
# ----------------------------------------------------------------------------------------------


def _as_bool_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binarise like medpy (nonzero = object) and refuse shape mismatches, which would broadcast silently."""
    pred_b = np.atleast_1d(np.asarray(pred)).astype(bool, copy=False)
    ref_b = np.atleast_1d(np.asarray(ref)).astype(bool, copy=False)
    if pred_b.shape != ref_b.shape:
        raise ValueError(f"prediction shape {pred_b.shape} differs from reference shape {ref_b.shape}")
    return pred_b, ref_b


def _normalize_spacing(spacing: Spacing, ndim: int) -> tuple[float, ...]:
    """Spacing per array axis (numpy order); None means 1 along every axis, a scalar is repeated."""
    if spacing is None:
        return (1.0,) * ndim
    if np.isscalar(spacing):
        values = (float(spacing),) * ndim  # type: ignore[arg-type]
    else:
        values = tuple(float(s) for s in spacing)  # type: ignore[union-attr]
    if len(values) != ndim:
        raise ValueError(f"spacing {values} has {len(values)} entries but the masks have {ndim} dimensions")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be finite and positive, got {values}")
    return values


def _crop_to_joint_bbox(pred: np.ndarray, ref: np.ndarray, margin: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to their joint bounding box plus ``margin`` voxels (clipped at the array border).

    Every surface voxel lies inside the box, so nearest-surface distances are unchanged; the margin keeps
    the erosion identical too (outside the box is background, and where the box meets the array border the
    border value 0 applies in both cases). This turns whole-volume distance transforms into small ones.
    """
    union = pred | ref
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        occupied = np.flatnonzero(np.any(union, axis=other)) if other else np.flatnonzero(union)
        lo = max(int(occupied[0]) - margin, 0)
        hi = min(int(occupied[-1]) + 1 + margin, union.shape[axis])
        slices.append(slice(lo, hi))
    box = tuple(slices)
    return pred[box], ref[box]


def _surface(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    """One-voxel border of the objects, exactly as medpy's ``__surface_distances`` extracts it."""
    return mask ^ binary_erosion(mask, structure=footprint, iterations=1)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Spacing = None) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances ``(d(pred->ref), d(ref->pred))`` for two non-empty masks.

    Returned together because every distance metric needs one or both, and computing them once is the
    expensive part. Raises ``ValueError`` if either mask is empty (the distances do not exist).
    """
    pred_b, ref_b = _as_bool_pair(pred, ref)
    sampling = _normalize_spacing(spacing, pred_b.ndim)
    if not pred_b.any():
        raise ValueError("the prediction mask is empty: surface distances are undefined")
    if not ref_b.any():
        raise ValueError("the reference mask is empty: surface distances are undefined")
    pred_c, ref_c = _crop_to_joint_bbox(pred_b, ref_b)
    footprint = generate_binary_structure(pred_c.ndim, 1)
    pred_border = _surface(pred_c, footprint)
    ref_border = _surface(ref_c, footprint)
    d_pred_to_ref = distance_transform_edt(~ref_border, sampling=sampling)[pred_border]
    d_ref_to_pred = distance_transform_edt(~pred_border, sampling=sampling)[ref_border]
    return d_pred_to_ref, d_ref_to_pred


def _distances_from(d_pred_to_ref: np.ndarray, d_ref_to_pred: np.ndarray) -> dict[str, float]:
    """HD95, ASD and ASSD from both directed distance sets, with medpy's definitions."""
    pooled = np.concatenate([d_pred_to_ref, d_ref_to_pred])
    return {
        "hd95": float(np.percentile(pooled, 95)),
        "asd": float(d_pred_to_ref.mean()),
        "assd": float(pooled.mean()),
    }


def distance_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Spacing = None) -> dict[str, float]:
    """``{"hd95", "asd", "assd"}`` for one mask pair, from one computation of the surface distances.

    Both masks empty gives 0 for all three, exactly one empty gives NaN for all three (see module docstring).
    """
    pred_b, ref_b = _as_bool_pair(pred, ref)
    _normalize_spacing(spacing, pred_b.ndim)  # validate even when the distances are not computed
    has_pred, has_ref = bool(pred_b.any()), bool(ref_b.any())
    if not has_pred and not has_ref:
        return {"hd95": 0.0, "asd": 0.0, "assd": 0.0}
    if has_pred != has_ref:
        return {"hd95": math.nan, "asd": math.nan, "assd": math.nan}
    return _distances_from(*surface_distances(pred_b, ref_b, spacing))


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient ``2|P∩R| / (|P|+|R|)``; 1 when both masks are empty (medpy's ``dc``)."""
    pred_b, ref_b = _as_bool_pair(pred, ref)
    total = int(np.count_nonzero(pred_b)) + int(np.count_nonzero(ref_b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred_b & ref_b)) / total


def jaccard(pred: np.ndarray, ref: np.ndarray) -> float:
    """Jaccard index ``|P∩R| / |P∪R|``; 1 when both masks are empty (medpy's ``jc``)."""
    pred_b, ref_b = _as_bool_pair(pred, ref)
    union = int(np.count_nonzero(pred_b | ref_b))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred_b & ref_b)) / union


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Spacing = None) -> float:
    """95th percentile of the pooled symmetric surface distances (medpy's ``hd95``); 0 / NaN for empty masks."""
    return distance_metrics(pred, ref, spacing)["hd95"]


def asd(pred: np.ndarray, ref: np.ndarray, spacing: Spacing = None) -> float:
    """Mean distance from the predicted surface to the reference surface (medpy's ``asd(pred, ref)``)."""
    return distance_metrics(pred, ref, spacing)["asd"]


def assd(pred: np.ndarray, ref: np.ndarray, spacing: Spacing = None) -> float:
    """Mean of the pooled distances of both directions (medpy 0.5's ``assd``); 0 / NaN for empty masks."""
    return distance_metrics(pred, ref, spacing)["assd"]


def check_tolerance(tolerance: float) -> float:
    """NSD tolerance as a float, refusing negative or non-finite values (they would silently give 0 or 1)."""
    value = float(tolerance)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"the NSD tolerance must be a finite distance >= 0, got {tolerance}")
    return value


def _nsd_from(d_pred_to_ref: np.ndarray, d_ref_to_pred: np.ndarray, tolerance: float) -> float:
    """Share of both surfaces' voxels that lie within ``tolerance`` of the other surface."""
    close = int(np.count_nonzero(d_pred_to_ref <= tolerance)) + int(np.count_nonzero(d_ref_to_pred <= tolerance))
    return close / (d_pred_to_ref.size + d_ref_to_pred.size)


def normalized_surface_dice(pred: np.ndarray, ref: np.ndarray, tolerance: float, spacing: Spacing = None) -> float:
    """Normalised surface Dice at ``tolerance`` (in the units of ``spacing``); 1 / 0 for both / one mask empty."""
    pred_b, ref_b = _as_bool_pair(pred, ref)
    tol = check_tolerance(tolerance)
    _normalize_spacing(spacing, pred_b.ndim)
    has_pred, has_ref = bool(pred_b.any()), bool(ref_b.any())
    if not (has_pred and has_ref):
        return 1.0 if has_pred == has_ref else 0.0
    return _nsd_from(*surface_distances(pred_b, ref_b, spacing), tol)


def binary_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Spacing = None,
    nsd_tolerance: float | None = None,
    nsd_spacing: Spacing = None,
) -> dict[str, float]:
    """All metrics plus ``n_pred`` / ``n_ref`` voxel counts for one mask pair, distances computed once.

    With ``nsd_tolerance``, ``"nsd"`` is added, measured with ``nsd_spacing`` (default ``spacing``): the tolerance
    is in mm even when the other distances are reported in voxels, and the distances are reused when both agree.
    """
    pred_b, ref_b = _as_bool_pair(pred, ref)
    sampling = _normalize_spacing(spacing, pred_b.ndim)
    out: dict[str, float] = {"dice": dice(pred_b, ref_b), "jaccard": jaccard(pred_b, ref_b)}
    has_pred, has_ref = bool(pred_b.any()), bool(ref_b.any())
    distances = surface_distances(pred_b, ref_b, sampling) if has_pred and has_ref else None
    if distances is None:
        out.update(distance_metrics(pred_b, ref_b, sampling))
    else:
        out.update(_distances_from(*distances))
    if nsd_tolerance is not None:
        tol = check_tolerance(nsd_tolerance)
        nsd_sampling = sampling if nsd_spacing is None else _normalize_spacing(nsd_spacing, pred_b.ndim)
        if distances is None:
            out[NSD] = 1.0 if has_pred == has_ref else 0.0
        else:
            if nsd_sampling != sampling:
                distances = surface_distances(pred_b, ref_b, nsd_sampling)
            out[NSD] = _nsd_from(*distances, tol)
    out["n_ref"] = int(np.count_nonzero(ref_b))
    out["n_pred"] = int(np.count_nonzero(pred_b))
    return out


def case_metrics(
    pred_labelmap: np.ndarray,
    ref_labelmap: np.ndarray,
    labels: Iterable[int],
    spacing: Spacing = None,
    nsd_tolerance: float | None = None,
    nsd_spacing: Spacing = None,
) -> dict[int, dict[str, float]]:
    """Metrics per foreground label of one case: ``{label: {dice, jaccard, hd95, asd, assd, n_ref, n_pred}}``.

    Each label is evaluated as its own binary mask pair (one-vs-rest), with the empty-mask conventions of the
    module docstring, so a label absent from both label maps scores Dice 1 and distance 0. ``nsd_tolerance`` adds
    ``"nsd"`` (see :func:`binary_metrics`).
    """
    pred_arr = np.asarray(pred_labelmap)
    ref_arr = np.asarray(ref_labelmap)
    if pred_arr.shape != ref_arr.shape:
        raise ValueError(f"prediction shape {pred_arr.shape} differs from reference shape {ref_arr.shape}")
    spacing_t = _normalize_spacing(spacing, max(ref_arr.ndim, 1))
    return {
        int(label): binary_metrics(pred_arr == label, ref_arr == label, spacing_t, nsd_tolerance, nsd_spacing)
        for label in labels
    }
