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

A prediction is only compared voxel by voxel with its reference when both lie on the same physical grid: same
size, spacing (relative 1e-4), origin (within 5% of the smallest reference voxel spacing) and direction (1e-4 per
matrix entry). Within these tolerances nearest-neighbour resampling onto the reference grid would return the very
same voxels (over 512 voxels per axis the three together displace a voxel centre by about 0.15 voxel at most, so it
still rounds to the same voxel), so accepting them loses nothing; a real mismatch (another spacing, a shifted
origin, a flipped axis) would score nonsense silently, so it is refused, or resampled on request.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

from nnfiltermatch.files import atomic_write_text
from nnfiltermatch.inventory import count_nonfinite

__all__ = [
    "METRICS",
    "CSV_COLUMNS",
    "CaseRow",
    "EvaluationError",
    "EvaluationResult",
    "Resampled",
    "asd",
    "assd",
    "binary_metrics",
    "case_metrics",
    "dice",
    "distance_metrics",
    "evaluate_folders",
    "hd95",
    "jaccard",
    "normalized_surface_dice",
    "read_label_names",
    "surface_distances",
]

METRICS: tuple[str, ...] = ("dice", "jaccard", "hd95", "asd", "assd")
"""Metric names, in the order used by tables, CSV columns and JSON."""

CSV_COLUMNS: tuple[str, ...] = ("case", "label", *METRICS)
"""Exact CSV header written by :meth:`EvaluationResult.to_csv` (an ``nsd`` column follows only with a tolerance)."""

NSD = "nsd"
"""Name of the optional normalised surface Dice metric (column, JSON key), present only when a tolerance is set."""

SPACING_RTOL = 1e-4
"""Largest relative spacing difference per axis between a prediction and its reference."""
ORIGIN_TOL_VOXELS = 0.05
"""Largest origin distance (Euclidean, mm), as a fraction of the smallest reference spacing."""
DIRECTION_ATOL = 1e-4
"""Largest difference of any entry of the direction cosine matrices."""

Spacing = Sequence[float] | float | None
Units = Literal["voxel", "mm"]


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


def _check_tolerance(tolerance: float) -> float:
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
    tol = _check_tolerance(tolerance)
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
        tol = _check_tolerance(nsd_tolerance)
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


# ----------------------------------------------------------------------------------------------
# Folder evaluation
# ----------------------------------------------------------------------------------------------


class EvaluationError(ValueError):
    """Inputs of :func:`evaluate_folders` that cannot be evaluated; the message names the file and the fix."""


@dataclass(frozen=True)
class CaseRow:
    """Metrics of one class in one case (one CSV row); ``nsd`` stays NaN unless an NSD tolerance was given."""

    case: str
    label: int
    dice: float
    jaccard: float
    hd95: float
    asd: float
    assd: float
    n_ref: int
    n_pred: int
    nsd: float = math.nan


@dataclass(frozen=True)
class Resampled:
    """A prediction that was resampled onto its reference grid, and what that did to its foreground.

    The foreground volume before and after is reported so that a prediction lying partly outside the reference
    grid (whose voxels resampling drops) is visible instead of silently scoring as an under-segmentation.
    """

    case: str
    differs: tuple[str, ...]
    foreground_mm3_before: float
    foreground_mm3_after: float

    def describe(self) -> str:
        """One line for the printed output."""
        return (
            f"{self.case}: differed in {', '.join(self.differs)}; foreground {self.foreground_mm3_before:.1f} mm³ "
            f"before, {self.foreground_mm3_after:.1f} mm³ after"
        )


def _nan_stat(values: Sequence[float], stat: str) -> float:
    """``np.nanmean`` / ``np.nanstd`` without the all-NaN RuntimeWarning (an all-undefined class gives NaN)."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return math.nan
    return float(np.nanmean(arr) if stat == "mean" else np.nanstd(arr))


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats by None (JSON ``null``) and numpy scalars by Python ones, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


@dataclass
class EvaluationResult:
    """Per-case metrics of a folder evaluation and their per-class aggregates.

    ``per_class_mean`` / ``per_class_std`` are ``np.nanmean`` / ``np.nanstd`` (population std) over cases, so
    undefined distances (exactly one of prediction/reference empty) are skipped instead of counted as 0;
    ``n_undefined`` says how many were skipped per class. ``mean_over_classes`` averages the per-class means,
    the "average over classes" figure papers report. ``label_names`` (from dataset.json) only label the output:
    JSON keys, CSV rows and ``labels`` stay the integer label values.
    """

    rows: list[CaseRow]
    labels: list[int]
    units: str
    per_class_mean: dict[int, dict[str, float]] = field(default_factory=dict)
    per_class_std: dict[int, dict[str, float]] = field(default_factory=dict)
    n_undefined: dict[int, int] = field(default_factory=dict)
    mean_over_classes: dict[str, float] = field(default_factory=dict)
    cases: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unmatched_predictions: list[str] = field(default_factory=list)
    label_names: dict[int, str] = field(default_factory=dict)
    label_names_source: str | None = None
    resampled: list[Resampled] = field(default_factory=list)
    nsd_tolerance: float | None = None

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[CaseRow],
        labels: Sequence[int],
        units: str,
        missing: Sequence[str] = (),
        unmatched_predictions: Sequence[str] = (),
        label_names: Mapping[int, str] | None = None,
        label_names_source: str | None = None,
        resampled: Sequence[Resampled] = (),
        nsd_tolerance: float | None = None,
    ) -> EvaluationResult:
        """Build the result and its aggregates from per-case rows (kept separate so tests can feed rows)."""
        rows = list(rows)
        labels = [int(label) for label in labels]
        metrics = METRICS if nsd_tolerance is None else (*METRICS, NSD)
        per_mean: dict[int, dict[str, float]] = {}
        per_std: dict[int, dict[str, float]] = {}
        n_undef: dict[int, int] = {}
        for label in labels:
            label_rows = [r for r in rows if r.label == label]
            per_mean[label] = {m: _nan_stat([getattr(r, m) for r in label_rows], "mean") for m in metrics}
            per_std[label] = {m: _nan_stat([getattr(r, m) for r in label_rows], "std") for m in metrics}
            n_undef[label] = sum(1 for r in label_rows if math.isnan(r.hd95))
        over_classes = {m: _nan_stat([per_mean[label][m] for label in labels], "mean") for m in metrics}
        cases = list(dict.fromkeys(r.case for r in rows))
        names = {int(k): str(v) for k, v in (label_names or {}).items() if int(k) in labels}
        return cls(
            rows=rows,
            labels=labels,
            units=units,
            per_class_mean=per_mean,
            per_class_std=per_std,
            n_undefined=n_undef,
            mean_over_classes=over_classes,
            cases=cases,
            missing=list(missing),
            unmatched_predictions=list(unmatched_predictions),
            label_names=names,
            label_names_source=label_names_source,
            resampled=list(resampled),
            nsd_tolerance=nsd_tolerance,
        )

    @property
    def n_cases(self) -> int:
        """Number of evaluated cases (missing ones excluded)."""
        return len(self.cases)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Metric names of this result: :data:`METRICS`, plus ``"nsd"`` when a tolerance was given."""
        return METRICS if self.nsd_tolerance is None else (*METRICS, NSD)

    def class_name(self, label: int) -> str:
        """``"Anterior (1)"`` when dataset.json names the label, else ``"1"``."""
        name = self.label_names.get(label)
        return f"{name} ({label})" if name else str(label)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; NaN becomes None so the file is strict JSON."""
        metrics = self.metrics
        per_class = {
            str(label): {
                "name": self.label_names.get(label),
                "mean": self.per_class_mean[label],
                "std": self.per_class_std[label],
                "n_undefined": self.n_undefined[label],
            }
            for label in self.labels
        }
        return _json_safe(
            {
                "units": self.units,
                "labels": self.labels,
                "label_names": {str(label): self.label_names.get(label) for label in self.labels},
                "label_names_source": self.label_names_source,
                "nsd_tolerance_mm": self.nsd_tolerance,
                "n_cases": self.n_cases,
                "mean_over_classes": self.mean_over_classes,
                "per_class": per_class,
                "n_undefined_total": sum(self.n_undefined.values()),
                "missing": self.missing,
                "unmatched_predictions": self.unmatched_predictions,
                "resampled": [
                    {
                        "case": r.case,
                        "differs": list(r.differs),
                        "foreground_mm3_before": r.foreground_mm3_before,
                        "foreground_mm3_after": r.foreground_mm3_after,
                    }
                    for r in self.resampled
                ],
                "cases": [
                    {
                        "case": r.case,
                        "label": r.label,
                        **{m: getattr(r, m) for m in metrics},
                        "n_ref": r.n_ref,
                        "n_pred": r.n_pred,
                    }
                    for r in self.rows
                ],
            }
        )

    def to_json(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_dict` as indented JSON (NaN as ``null``), atomically."""
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        return atomic_write_text(path, text)

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write one row per case and class with columns ``case,label,dice,jaccard,hd95,asd,assd``, atomically.

        An ``nsd`` column is appended only when a tolerance was given, so the default header never changes.
        Values use Python's shortest round-trip float format; undefined distances are written as ``nan``.
        """
        metrics = self.metrics
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(("case", "label", *metrics))
        for r in self.rows:
            writer.writerow([r.case, r.label, *(repr(float(getattr(r, m))) for m in metrics)])
        return atomic_write_text(path, buffer.getvalue())

    def format_table(self) -> str:
        """Plain-text table: mean±std per class and metric, the mean over classes, and undefined counts."""
        metrics = self.metrics

        def cell(metric: str, mean: float, std: float | None) -> str:
            digits = 4 if metric in ("dice", "jaccard", NSD) else 3
            if math.isnan(mean):
                return "n/a"
            if std is None:
                return f"{mean:.{digits}f}"
            return f"{mean:.{digits}f}±{(0.0 if math.isnan(std) else std):.{digits}f}"

        header = ["class", *(f"nsd@{self.nsd_tolerance:g}mm" if m == NSD else m for m in metrics), "undefined"]
        body: list[list[str]] = []
        for label in self.labels:
            mean, std = self.per_class_mean[label], self.per_class_std[label]
            body.append(
                [
                    self.class_name(label),
                    *(cell(m, mean[m], std[m]) for m in metrics),
                    f"{self.n_undefined[label]}/{self.n_cases}",
                ]
            )
        body.append(
            [
                "mean",
                *(cell(m, self.mean_over_classes[m], None) for m in metrics),
                f"{sum(self.n_undefined.values())}/{self.n_cases * len(self.labels)}",
            ]
        )
        widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

        def line(row: list[str]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

        unit_note = "mm" if self.units == "mm" else "voxels"
        out = [
            f"{self.n_cases} cases, distances in {unit_note}; mean±std over cases "
            "(undefined distances, where exactly one of prediction/reference is empty, are skipped)",
        ]
        if self.label_names_source:
            out.append(f"class names from {self.label_names_source}")
        if self.nsd_tolerance is not None:
            out.append(f"nsd: normalised surface Dice at {self.nsd_tolerance:g} mm (header spacing)")
        out += [line(header), line(["-" * w for w in widths])]
        out += [line(row) for row in body]
        if self.resampled:
            out.append(
                f"resampled onto the reference grid with nearest neighbour ({len(self.resampled)} of {self.n_cases}):"
            )
            out += [f"  {r.describe()}" for r in self.resampled]
        if self.missing:
            out.append(f"missing predictions ({len(self.missing)}, skipped): {', '.join(self.missing)}")
        if self.unmatched_predictions:
            out.append(
                f"predictions without a reference ({len(self.unmatched_predictions)}, ignored): "
                + ", ".join(self.unmatched_predictions)
            )
        return "\n".join(out)


def _list_cases(folder: Path, file_ending: str, role: str) -> dict[str, Path]:
    """Map case ID -> file for every ``*file_ending`` file in ``folder``, with actionable errors."""
    if not folder.exists():
        raise EvaluationError(
            f"{role} folder {folder} does not exist; pass the folder that holds the {role} label maps"
        )
    if not folder.is_dir():
        raise EvaluationError(f"{role} folder {folder} is not a folder; pass the folder, not a single file")
    files = {
        p.name[: -len(file_ending)]: p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.endswith(file_ending) and len(p.name) > len(file_ending)
    }
    if not files:
        others = sorted(p.name for p in folder.iterdir() if p.is_file())
        hint = (
            f" (it holds {len(others)} other file(s), e.g. {', '.join(others[:3])}; set file_ending to match them)"
            if others
            else " (it is empty)"
        )
        raise EvaluationError(f"{role} folder {folder} has no files ending in '{file_ending}'{hint}")
    return files


@dataclass(frozen=True)
class _Header:
    """Geometry of an image file in SimpleITK (x, y, z) order, read from the header only."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int = 1

    @property
    def numpy_spacing(self) -> tuple[float, ...]:
        """Spacing in numpy axis order, as the distance metrics take it."""
        return tuple(reversed(self.spacing))

    def describe(self) -> str:
        """All four properties, formatted so that round-off does not hide or fake a difference."""

        def fmt(values: Sequence[float]) -> str:
            return "(" + ", ".join(f"{v + 0.0:.6g}" for v in values) + ")"  # + 0.0: no "-0"

        extra = f", {self.components} values per voxel" if self.components > 1 else ""
        return (
            f"size {tuple(self.size)}, spacing {fmt(self.spacing)}, origin {fmt(self.origin)}, "
            f"direction {fmt(self.direction)}{extra}"
        )


def _geometry_differences(pred: _Header, ref: _Header) -> list[str]:
    """Names of the properties in which ``pred`` is off the reference grid (tolerances: module docstring)."""
    if len(pred.size) != len(ref.size):
        return ["dimensionality"]
    out = []
    if pred.size != ref.size:
        out.append("size")
    if any(abs(p - r) > SPACING_RTOL * max(abs(p), abs(r)) for p, r in zip(pred.spacing, ref.spacing)):
        out.append("spacing")
    if math.dist(pred.origin, ref.origin) > ORIGIN_TOL_VOXELS * min(ref.spacing):
        out.append("origin")
    if any(abs(p - r) > DIRECTION_ATOL for p, r in zip(pred.direction, ref.direction)):
        out.append("direction")
    if pred.components != ref.components:
        out.append("values per voxel")
    return out


def _read_header(path: Path) -> _Header:
    """Size, spacing, origin and direction from the header only (cheap validation pass)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise EvaluationError(f"cannot read {path}: {exc}; check that it is a valid image file") from exc
    return _Header(
        size=tuple(int(s) for s in reader.GetSize()),
        spacing=tuple(float(s) for s in reader.GetSpacing()),
        origin=tuple(float(s) for s in reader.GetOrigin()),
        direction=tuple(float(s) for s in reader.GetDirection()),
        components=int(reader.GetNumberOfComponents()),
    )


def _read_image(path: Path) -> Any:
    """The SimpleITK image, refusing NaN/inf voxels (ITK's NIfTI reader would turn NaN into background 0)."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise EvaluationError(f"cannot read {path}: {exc}; check that it is a valid image file") from exc
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        nan, inf = count_nonfinite(path)
        if nan or inf:
            raise EvaluationError(
                f"{path} contains {nan} NaN and {inf} infinite voxel(s); a label map must hold integer label values "
                "only"
            )
    return image


def _read_array(path: Path) -> np.ndarray:
    """Voxel array in numpy (z, y, x) order, as SimpleITK returns it."""
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(_read_image(path))


def _resample_to(image: Any, grid: _Header) -> Any:
    """``image`` on the grid of ``grid`` by nearest neighbour (label values are kept; outside the image is 0)."""
    import SimpleITK as sitk

    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in grid.size])
    resampler.SetOutputSpacing(grid.spacing)
    resampler.SetOutputOrigin(grid.origin)
    resampler.SetOutputDirection(grid.direction)
    resampler.SetTransform(sitk.Transform())
    resampler.SetInterpolator(sitk.sitkNearestNeighbor)
    resampler.SetDefaultPixelValue(0)
    resampler.SetOutputPixelType(image.GetPixelID())
    return resampler.Execute(image)


def _read_prediction(
    path: Path, case: str, grid: _Header, differs: Sequence[str]
) -> tuple[np.ndarray, Resampled | None]:
    """The prediction's voxels on the reference grid: as stored, or resampled when ``differs`` is not empty."""
    import SimpleITK as sitk

    image = _read_image(path)
    if not differs:
        return sitk.GetArrayFromImage(image), None
    before = sitk.GetArrayFromImage(image)
    resampled = sitk.GetArrayFromImage(_resample_to(image, grid))
    note = Resampled(
        case=case,
        differs=tuple(differs),
        foreground_mm3_before=float(np.count_nonzero(before) * math.prod(image.GetSpacing())),
        foreground_mm3_after=float(np.count_nonzero(resampled) * math.prod(grid.spacing)),
    )
    return resampled, note


def read_label_names(path: str | os.PathLike[str]) -> dict[int, str]:
    """``{label value: class name}`` from a dataset.json ``labels`` entry (nnU-Net v2, or v1's ``{"1": name}``).

    Region entries (a list of values) are left out: ``evaluate`` scores single label values. Raises
    :class:`EvaluationError` naming the file when it cannot be read or has no usable ``labels``.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise EvaluationError(
            f"cannot read {path} ({exc}); give the dataset.json whose 'labels' name the classes"
        ) from exc
    except ValueError as exc:
        raise EvaluationError(f"{path} is not valid JSON ({exc}); fix the syntax") from exc
    labels = data.get("labels") if isinstance(data, dict) else None
    if not isinstance(labels, dict):
        raise EvaluationError(f'{path} has no \'labels\' mapping (e.g. {{"background": 0, "liver": 1}})')
    names: dict[int, str] = {}
    for key, value in labels.items():
        if isinstance(value, int) and not isinstance(value, bool):
            names[value] = str(key)
        elif isinstance(value, str) and str(key).isdigit():  # nnU-Net v1: {"1": "liver"}
            names[int(key)] = value
    return {value: name for value, name in names.items() if value != 0}


def _find_label_names(
    dataset_json: str | os.PathLike[str] | None, ref_dir: Path, pred_dir: Path
) -> tuple[dict[int, str], str | None]:
    """Class names and where they came from: the given dataset.json, else the first one found.

    Looked for beside the references (``labelsTs/`` sits in the raw dataset folder, so its parent too), then in
    the prediction folder, where nnU-Net's predictor copies the model's dataset.json. A broken file that was only
    found, not asked for, is warned about and the classes stay numbered.
    """
    if dataset_json is not None:
        return read_label_names(dataset_json), str(dataset_json)
    for candidate in (ref_dir / "dataset.json", ref_dir.parent / "dataset.json", pred_dir / "dataset.json"):
        if candidate.is_file():
            try:
                names = read_label_names(candidate)
            except EvaluationError as exc:
                warnings.warn(f"class names not used: {exc}", stacklevel=3)
                return {}, None
            if names:
                return names, str(candidate)
    return {}, None


def _label_values(arr: np.ndarray) -> np.ndarray:
    """Distinct values of a label map; bincount for small non-negative integers since np.unique sorts."""
    if arr.size and arr.dtype.kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi < 1 << 16:
            return np.flatnonzero(np.bincount(arr.ravel(), minlength=hi + 1))
    return np.unique(arr)


def _integer_labels(values: np.ndarray, path: Path) -> set[int]:
    """Label values as ints, refusing fractional ones (a probability map or an interpolated label map)."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        bad = values[~np.isfinite(values) | (values != np.round(values))]
        if bad.size:
            raise EvaluationError(
                f"{path} contains non-integer values (e.g. {bad[:3].tolist()}); it must be a label map, not "
                "probabilities or a label map resampled with linear interpolation (use nearest neighbour)"
            )
    return {int(v) for v in values.tolist()}


def _raise_problems(problems: list[str], fix: str) -> None:
    """One error listing every offending file, so a broken folder is fixed in one round."""
    if problems:
        shown = problems[:20]
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise EvaluationError(f"{len(problems)} problem(s):\n  " + "\n  ".join(shown) + more + f"\n{fix}")


def evaluate_folders(
    ref_dir: str | os.PathLike[str],
    pred_dir: str | os.PathLike[str],
    labels: Sequence[int] | None = None,
    units: Units = "voxel",
    allow_missing: bool = False,
    file_ending: str = ".nii.gz",
    progress: bool = True,
    resample_to_reference: bool = False,
    dataset_json: str | os.PathLike[str] | None = None,
    nsd_tolerance: float | None = None,
) -> EvaluationResult:
    """Evaluate every reference case in ``ref_dir`` against the same-named prediction in ``pred_dir``.

    Case IDs are file names minus ``file_ending``. ``labels=None`` evaluates every nonzero label found in the
    references. ``units="voxel"`` uses spacing 1 (what the semi-supervised literature reports); ``"mm"`` uses
    the reference header spacing. All inputs are validated before any metric is computed, so a bad folder
    fails in seconds rather than after a long run: missing predictions (unless ``allow_missing``, which skips
    and reports them), predictions off the reference grid (size, spacing, origin or direction; unless
    ``resample_to_reference``, which resamples them with nearest neighbour and reports them), label values outside
    ``labels`` (when given) and non-integer label maps raise :class:`EvaluationError`. Predictions without a
    reference are ignored and listed. Class names come from ``dataset_json`` or a dataset.json found beside the
    folders (see :func:`_find_label_names`). ``nsd_tolerance`` (mm) adds normalised surface Dice, always measured
    with the header spacing.
    """
    if units not in ("voxel", "mm"):
        raise EvaluationError(f"units must be 'voxel' or 'mm', got {units!r}")
    if not file_ending:
        raise EvaluationError("file_ending must not be empty (e.g. '.nii.gz')")
    if nsd_tolerance is not None:
        try:
            nsd_tolerance = _check_tolerance(nsd_tolerance)
        except ValueError as exc:
            raise EvaluationError(f"{exc} (--nsd-tolerance is in mm)") from exc
    explicit_labels = labels is not None
    if labels is not None:
        labels = [int(label) for label in labels]
        if not labels:
            raise EvaluationError("labels is empty; pass the foreground label values to evaluate or None for all")
        if any(label <= 0 for label in labels):
            raise EvaluationError(f"labels must be positive foreground values (0 is background), got {labels}")
        if len(set(labels)) != len(labels):
            raise EvaluationError(f"labels contains duplicates: {labels}")

    ref_dir, pred_dir = Path(ref_dir), Path(pred_dir)
    label_names, names_source = _find_label_names(dataset_json, ref_dir, pred_dir)
    refs = _list_cases(ref_dir, file_ending, "reference")
    preds = _list_cases(pred_dir, file_ending, "prediction")

    missing = sorted(set(refs) - set(preds))
    unmatched = sorted(set(preds) - set(refs))
    if missing and not allow_missing:
        _raise_problems(
            [f"no prediction {pred_dir / (case + file_ending)} for reference {refs[case]}" for case in missing],
            "Predict these cases, or pass allow_missing=True (--allow-missing) to skip and report them.",
        )
    cases = sorted(set(refs) & set(preds))
    if not cases:
        raise EvaluationError(
            f"no case of {ref_dir} has a prediction in {pred_dir} (prediction IDs: {', '.join(unmatched[:5])}); "
            "check that the folders and file names match"
        )

    # Validation pass 1: headers only. Every prediction must lie on its reference's physical grid.
    grids: dict[str, _Header] = {}
    to_resample: dict[str, list[str]] = {}
    problems: list[str] = []
    for case in cases:
        ref_header, pred_header = _read_header(refs[case]), _read_header(preds[case])
        grids[case] = ref_header
        differs = _geometry_differences(pred_header, ref_header)
        if not differs:
            continue
        resamplable = not {"dimensionality", "values per voxel"} & set(differs)
        if resample_to_reference and resamplable:
            to_resample[case] = differs
            continue
        problems.append(
            f"case '{case}': prediction {preds[case]} is not on the grid of reference {refs[case]} "
            f"(different {', '.join(differs)}):\n"
            f"    prediction: {pred_header.describe()}\n"
            f"    reference:  {ref_header.describe()}"
        )
    _raise_problems(
        problems,
        "A prediction must have its reference's size, spacing, origin and direction (tolerances: spacing "
        f"{SPACING_RTOL:g} relative, origin {ORIGIN_TOL_VOXELS:g} voxel, direction {DIRECTION_ATOL:g}), or "
        "Dice compares voxels that are not the same place. Check that each prediction was made from its reference's "
        "image and written with that image's header; or pass --resample-to-reference (resample_to_reference=True) to "
        "resample the predictions onto the reference grid with nearest neighbour.",
    )

    # Validation pass 2: label values (arrays are read again below rather than kept, to bound memory).
    ref_values: dict[str, set[int]] = {}
    pred_values: dict[str, set[int]] = {}
    for case in cases:
        ref_values[case] = _integer_labels(_label_values(_read_array(refs[case])), refs[case])
        pred_values[case] = _integer_labels(_label_values(_read_array(preds[case])), preds[case])
    if explicit_labels:
        allowed = set(labels) | {0}  # type: ignore[arg-type]
        for case in cases:
            for role, path, values in (("reference", refs[case], ref_values), ("prediction", preds[case], pred_values)):
                extra = sorted(values[case] - allowed)
                if extra:
                    problems.append(f"{role} {path} contains label value(s) {extra} not in labels {labels}")
        _raise_problems(problems, "Pass every foreground label in labels (--labels), or fix the label maps.")
        eval_labels = list(labels)  # type: ignore[arg-type]
    else:
        eval_labels = sorted(set().union(*ref_values.values()) - {0})
        if not eval_labels:
            raise EvaluationError(f"the references in {ref_dir} contain no foreground label; pass labels explicitly")
        stray = sorted(set().union(*pred_values.values()) - set(eval_labels) - {0})
        if stray:
            warnings.warn(
                f"predictions contain label value(s) {stray} that occur in no reference; they are not evaluated",
                stacklevel=2,
            )

    from tqdm import tqdm

    rows: list[CaseRow] = []
    resampled: list[Resampled] = []
    for case in tqdm(cases, desc="evaluating", unit="case", disable=None if progress else True):
        grid = grids[case]
        pred, note = _read_prediction(preds[case], case, grid, to_resample.get(case, ()))
        if note is not None:
            resampled.append(note)
        spacing = grid.numpy_spacing if units == "mm" else None
        per_label = case_metrics(
            pred,
            _read_array(refs[case]),
            eval_labels,
            spacing,
            nsd_tolerance=nsd_tolerance,
            nsd_spacing=grid.numpy_spacing,
        )
        for label, values in per_label.items():
            rows.append(
                CaseRow(
                    case=case,
                    label=label,
                    **{m: float(values[m]) for m in METRICS},
                    n_ref=int(values["n_ref"]),
                    n_pred=int(values["n_pred"]),
                    nsd=float(values.get(NSD, math.nan)),
                )
            )
    return EvaluationResult.from_rows(
        rows,
        eval_labels,
        units,
        missing=missing,
        unmatched_predictions=unmatched,
        label_names=label_names,
        label_names_source=names_source,
        resampled=resampled,
        nsd_tolerance=nsd_tolerance,
    )
