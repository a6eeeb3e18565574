"""Checks of single image and label files: what makes a file unusable for nnU-Net (unreadable, truncated, not 2D or
3D, several values per voxel, NaN/inf voxels; a label off its image's grid or with values dataset.json does not
declare), read from the header wherever that suffices.

Each check returns its problems as messages that name the file (relative to the dataset folder) and the fix, so that
the callers report every problem of a dataset at once.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nnfiltermatch.errors import MAX_LISTED_PROBLEMS
from nnfiltermatch.files import relative_posix

SPACING_ORIGIN_RTOL = 1e-4
DIRECTION_ATOL = 1e-3


@dataclass(frozen=True)
class ImageGeometry:
    """Size, spacing, origin and direction of an image in SimpleITK (x, y, z) order, as its header gives them."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int = 1  # values per voxel; nnU-Net wants 1 (one file per channel)
    floating: bool = False  # only floating-point files can hold NaN or inf

    @property
    def dim(self) -> int:
        return len(self.size)

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


def geometry_of(obj: Any) -> ImageGeometry:
    """Geometry of a SimpleITK ImageFileReader (after ReadImageInformation) or Image."""
    import SimpleITK as sitk

    components = obj.GetNumberOfComponents() if hasattr(obj, "GetNumberOfComponents") else None
    if components is None:
        components = obj.GetNumberOfComponentsPerPixel()
    floating = obj.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)
    return ImageGeometry(
        tuple(int(s) for s in obj.GetSize()),
        tuple(float(s) for s in obj.GetSpacing()),
        tuple(float(s) for s in obj.GetOrigin()),
        tuple(float(s) for s in obj.GetDirection()),
        int(components),
        bool(floating),
    )


def _rel_close(a: Sequence[float], b: Sequence[float], rtol: float) -> bool:
    # Relative to the larger magnitude, with a floor of 1 so that origins near 0 are compared sensibly.
    return all(abs(x - y) <= rtol * max(abs(x), abs(y), 1.0) for x, y in zip(a, b))


def geometry_mismatch(a: ImageGeometry, b: ImageGeometry) -> list[str]:
    """Human-readable differences between two geometries (empty when they agree within tolerance)."""
    if a.dim != b.dim:
        return [f"dimensionality {a.dim}D vs {b.dim}D"]
    out = []
    if a.size != b.size:
        out.append(f"size {a.size} vs {b.size}")
    if not _rel_close(a.spacing, b.spacing, SPACING_ORIGIN_RTOL):
        out.append(f"spacing {_fmt(a.spacing)} vs {_fmt(b.spacing)}")
    if not _rel_close(a.origin, b.origin, SPACING_ORIGIN_RTOL):
        out.append(f"origin {_fmt(a.origin)} vs {_fmt(b.origin)}")
    if any(abs(x - y) > DIRECTION_ATOL for x, y in zip(a.direction, b.direction)):
        out.append(f"direction {_fmt(a.direction)} vs {_fmt(b.direction)}")
    return out


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def read_geometry(path: Path) -> ImageGeometry:
    """Read only the image header (cheap) with SimpleITK; raises RuntimeError on unreadable files."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return geometry_of(reader)


def nifti_truncation_problem(path: Path) -> str | None:
    """Detect a truncated NIfTI without decompressing it, so unlabelled pools of any size stay cheap to check.

    A header read succeeds on a truncated .nii.gz because the header sits at the start. We compare the size the
    header implies with the file size (.nii) or the gzip trailer's ISIZE (.nii.gz); only if those disagree is the
    file decompressed fully to confirm, so multi-member gzip files are not falsely reported.
    """
    if not _is_nifti(path):
        return None
    try:
        import nibabel as nib

        header = nib.load(str(path)).header
        nbytes = int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
        # Some writers store vox_offset 0; single-file NIfTI data still starts after the header (+4 bytes).
        offset = max(int(header.get_data_offset()), int(header["sizeof_hdr"]) + 4)
        expected = offset + nbytes
    except Exception:  # noqa: BLE001 - nibabel cannot judge it; SimpleITK already read the header
        return None
    if path.name.lower().endswith(".nii"):
        actual = path.stat().st_size
        if actual < expected:
            return f"is truncated: {actual} bytes but its header implies at least {expected}"
        return None
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:
            return "is truncated (too short for a gzip file)"
        f.seek(-4, os.SEEK_END)
        (isize,) = struct.unpack("<I", f.read(4))
    if isize == expected % 2**32:
        return None
    total = 0
    try:
        with gzip.open(path, "rb") as g:
            while chunk := g.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        return f"is truncated or corrupt ({type(e).__name__}: {e})"
    if total < expected:
        return f"is truncated: {total} uncompressed bytes but its header implies at least {expected}"
    return None


def header_problem(path: Path, root: Path, file_ending: str) -> tuple[ImageGeometry | None, str | None]:
    """The geometry of a usable image file, or None and why it is not (unreadable, not 2D/3D, vector, truncated)."""
    name = relative_posix(path, root)
    try:
        g = read_geometry(path)
    except RuntimeError as e:
        return None, (
            f"{name} cannot be read (corrupt, truncated or not a {file_ending} image): {first_line(e)}; "
            "re-export or replace the file"
        )
    if g.dim not in (2, 3):
        return None, (
            f"{name} is {g.dim}D (size {g.size}); nnU-Net needs 2D or 3D images with one file per "
            "channel: split 4D/multi-channel volumes into _0000, _0001, ... files"
        )
    if g.components != 1:
        return None, (
            f"{name} has {g.components} values per voxel (a vector/RGB image); nnU-Net needs one file per "
            f"channel: split it into _0000, _0001, ... files and list {g.components} channels in dataset.json "
            "'channel_names'"
        )
    truncated = nifti_truncation_problem(path)
    if truncated:
        return None, f"{name} {truncated}; re-export or replace the file"
    return g, None


def voxel_problem(path: Path, root: Path) -> str | None:
    """NaN/inf voxels (nnU-Net's reader would silently turn them into 0) or a file that fails a full read."""
    problems: list[str] = []
    nan, inf = _count_nonfinite(path, problems, root)
    if nan or inf:
        problems.append(
            f"{relative_posix(path, root)} contains {nan} NaN and {inf} infinite voxel(s), which nnU-Net's reader "
            "would silently turn into 0; replace them (e.g. with the image minimum) or remove the case"
        )
    return "; ".join(problems) or None


def label_problems(
    label: Path, image: Path, image_geometry: ImageGeometry, root: Path, allowed_labels: set[int]
) -> list[str]:
    """What makes ``label`` unusable as the label of ``image``: unreadable or truncated, off the image's grid,
    several values per voxel, non-integer values, or values that dataset.json does not declare."""
    import SimpleITK as sitk

    name = relative_posix(label, root)
    try:
        label_img = sitk.ReadImage(str(label))
    except RuntimeError as e:
        return [f"{name} cannot be read (corrupt or truncated): {first_line(e)}; replace it"]
    truncated = nifti_truncation_problem(label)
    if truncated:
        return [f"{name} {truncated}; replace the label file"]
    label_geometry = geometry_of(label_img)
    diff = geometry_mismatch(image_geometry, label_geometry)
    if diff:
        return [
            f"label {name} does not match image {relative_posix(image, root)}: {'; '.join(diff)} (image vs label); "
            "the label must have the image's size, spacing, origin and direction"
        ]
    if label_img.GetNumberOfComponentsPerPixel() != 1:
        return [f"label {name} has multi-component pixels; labels must be a single integer map"]
    problems: list[str] = []
    values = np.unique(sitk.GetArrayViewFromImage(label_img))
    if label_geometry.floating:
        # 1.0000001 printed as "value 1 not declared": name non-integers as such, in the file's own precision.
        fractional = values[np.isfinite(values) & (values != np.round(values))]
        if fractional.size:
            shown = ", ".join(np.format_float_positional(v, unique=True, trim="-") for v in fractional[:5])
            more = f" (and {fractional.size - 5} more distinct values)" if fractional.size > 5 else ""
            problems.append(
                f"label {name} contains value(s) that are not integers: {shown}{more} (stored as {values.dtype}); "
                "label maps hold integer label values only: round them (e.g. numpy.rint) and save the label with "
                "an integer voxel type (e.g. uint8)"
            )
            values = values[~np.isin(values, fractional)]
        # ITK reads NaN as 0: count NaN/inf in the file itself
        nan, inf = _count_nonfinite(label, problems, root)
        values = np.concatenate([values, [np.nan] * bool(nan), [np.inf] * bool(inf)])
    bad = [v for v in values.tolist() if not (float(v).is_integer() and int(v) in allowed_labels)]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:MAX_LISTED_PROBLEMS])
        problems.append(
            f"label {name} contains value(s) {shown} not declared in dataset.json 'labels' "
            f"(declared: {sorted(allowed_labels)}); fix the label or add the value to dataset.json"
        )
    return problems


def check_image_files(files: Iterable[Path], root: Path, file_ending: str) -> list[str]:
    """What makes these image files unusable (the checks prepare runs), for inputs that bypass prepare (predict).

    Headers and gzip trailers only, plus a full read of floating-point files, which alone can hold NaN/inf.
    """
    problems: list[str] = []
    for f in files:
        g, problem = header_problem(Path(f), root, file_ending)
        if g is None:
            problems.append(str(problem))
        elif g.floating and (problem := voxel_problem(Path(f), root)):
            problems.append(problem)
    return problems


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def count_nonfinite(path: Path) -> tuple[int, int]:
    """(NaN, +/-inf) voxel counts of a whole image file as stored; (0, 0) for integer voxel types. Raises when the
    file cannot be decoded.

    NIfTI files are read with nibabel because ITK's NIfTI reader silently turns NaN into 0 and zero-fills
    truncated .nii.gz data, which would hide exactly what this count is for.
    """
    import SimpleITK as sitk

    if _is_nifti(path):
        import nibabel as nib

        arr = np.asanyarray(nib.load(str(path)).dataobj)
    else:
        arr = sitk.GetArrayViewFromImage(sitk.ReadImage(str(path)))
    if not np.issubdtype(arr.dtype, np.floating):
        return 0, 0
    return int(np.count_nonzero(np.isnan(arr))), int(np.count_nonzero(np.isinf(arr)))


def _count_nonfinite(path: Path, problems: list[str], raw: Path) -> tuple[int, int]:
    """``count_nonfinite``, with a file that fails the full read reported in ``problems`` (and counted as 0, 0)."""
    try:
        return count_nonfinite(path)
    except Exception as e:  # noqa: BLE001 - any failure to decode means the file is unusable
        problems.append(
            f"{relative_posix(path, raw)} cannot be read fully (corrupt or truncated): {first_line(e)}; re-export or "
            "replace the file"
        )
        return 0, 0


def first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    # SimpleITK messages start with a source location; the last line carries the actual reason.
    return lines[-1] if lines else type(e).__name__
