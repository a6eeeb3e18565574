"""The result of ``nnfiltermatch evaluate``: one row per case and class, the per-class aggregates over cases, and
their JSON, CSV and table forms."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnfiltermatch.evaluation.metrics import METRICS, NSD
from nnfiltermatch.files import atomic_write_text

__all__ = ["CSV_COLUMNS", "CaseRow", "EvaluationResult", "Resampled"]

CSV_COLUMNS: tuple[str, ...] = ("case", "label", *METRICS)
"""Exact CSV header written by :meth:`EvaluationResult.to_csv` (an ``nsd`` column follows only with a tolerance)."""


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
