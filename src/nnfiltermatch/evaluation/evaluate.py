"""``nnfiltermatch evaluate``: every reference case of a folder scored against the same-named prediction, after
all inputs are validated.

A prediction is only compared voxel by voxel with its reference when both lie on the same physical grid: same
size, spacing (relative 1e-4), origin (within 5% of the smallest reference voxel spacing) and direction (1e-4 per
matrix entry). Within these tolerances nearest-neighbour resampling onto the reference grid would return the very
same voxels (over 512 voxels per axis the three together displace a voxel centre by about 0.15 voxel at most, so it
still rounds to the same voxel), so accepting them loses nothing; a real mismatch (another spacing, a shifted
origin, a flipped axis) would score nonsense silently, so it is refused, or resampled on request.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from nnfiltermatch.data.image_checks import ImageGeometry, count_nonfinite, read_geometry
from nnfiltermatch.evaluation.metrics import METRICS, NSD, case_metrics, check_tolerance
from nnfiltermatch.evaluation.results import CaseRow, EvaluationResult, Resampled

__all__ = ["EvaluationError", "evaluate_folders", "read_label_names"]

SPACING_RTOL = 1e-4
"""Largest relative spacing difference per axis between a prediction and its reference."""
ORIGIN_TOL_VOXELS = 0.05
"""Largest origin distance (Euclidean, mm), as a fraction of the smallest reference spacing."""
DIRECTION_ATOL = 1e-4
"""Largest difference of any entry of the direction cosine matrices."""

Units = Literal["voxel", "mm"]


class EvaluationError(ValueError):
    """Inputs of :func:`evaluate_folders` that cannot be evaluated; the message names the file and the fix."""


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


def _geometry_differences(pred: ImageGeometry, ref: ImageGeometry) -> list[str]:
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


def _read_header(path: Path) -> ImageGeometry:
    """Size, spacing, origin and direction from the header only (cheap validation pass)."""
    try:
        return read_geometry(path)
    except RuntimeError as exc:
        raise EvaluationError(f"cannot read {path}: {exc}; check that it is a valid image file") from exc


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


def _resample_to(image: Any, grid: ImageGeometry) -> Any:
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
    path: Path, case: str, grid: ImageGeometry, differs: Sequence[str]
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
            nsd_tolerance = check_tolerance(nsd_tolerance)
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
    grids: dict[str, ImageGeometry] = {}
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
