"""Convert the public h5 benchmark layouts of LA (UA-MT) and ACDC (SSL4MIS) into nnU-Net v2 raw datasets.

The semi-supervised literature publishes these two benchmarks as h5 files with fixed train/val/test lists and
fixed labelled subsets. Converting them (instead of re-deriving from the challenge data) keeps our numbers
comparable with published ones: same cases, same intensities, same labelled patients.

Everything a converter reads is checked first and all problems are reported together in one
``ConversionError``; only then is anything written, into a hidden temporary folder next to the target that is
renamed into place at the end, so an interrupted or failed conversion never leaves half a dataset behind.

Axis order: arrays are written with ``sitk.GetImageFromArray(arr)``, so ``sitk.GetArrayFromImage`` (which is
what nnU-Net's SimpleITKIO does, pinned in dataset.json) returns ``arr`` unchanged: numpy axis 0 of the h5
array becomes the NIfTI/ITK z axis. For ACDC volumes (slices x H x W) this puts the slices on the axis nnU-Net
treats as out-of-plane, which is what its 2d configuration slices along. The h5 files store no spacing, so
1 mm is written unless a spacing is given; ``--spacing X Y Z`` is in ITK order (X for the last h5 axis, Z for
the first).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnfiltermatch.data.image_checks import first_line, nifti_truncation_problem, read_geometry
from nnfiltermatch.data.labeled_lists import write_labeled_list
from nnfiltermatch.errors import MAX_LISTED_PROBLEMS, DataValidationError
from nnfiltermatch.files import disk_full_reason, relative_posix

__all__ = ["ConversionError", "ConversionResult"]

FILE_ENDING = ".nii.gz"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


# The converters read the published files as they are distributed; a content problem means a damaged copy.
RESTORE_HINT = "restore the named files from the published dataset, or leave their cases out of the lists"


class ConversionError(DataValidationError):
    """The source folder cannot be converted as given; ``problems`` lists every individual problem found."""


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion wrote, plus the messages (skipped lists, assumed spacing) a user should see."""

    dataset_dir: Path
    train_ids: list[str]
    test_ids: list[str]
    labeled_lists: dict[str, list[str]]
    messages: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ts = f", {len(self.test_ids)} in imagesTs/labelsTs" if self.test_ids else ", no imagesTs"
        return f"Wrote {self.dataset_dir}: {len(self.train_ids)} training cases in imagesTr/labelsTr{ts}."


@dataclass(frozen=True)
class Source:
    """One output case: a single 3D h5 volume, or the 2D slice h5 files of one volume in slice order."""

    case_id: str
    files: tuple[Path, ...]
    stacked: bool = False


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def read_list(path: Path, root: Path, problems: list[str]) -> list[str]:
    """Entries of a ``.list`` file (one per line, blank lines and ``#`` comments ignored); duplicates reported."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"list {relative_posix(path, root)} cannot be read ({e})")
        return []
    entries = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    dups = sorted(e for e, n in Counter(entries).items() if n > 1)
    if dups:
        problems.append(f"list {relative_posix(path, root)} names {dups[:MAX_LISTED_PROBLEMS]} more than once")
    if not entries:
        problems.append(f"list {relative_posix(path, root)} is empty")
    return list(dict.fromkeys(entries))


def check_spacing(spacing: Sequence[float] | None) -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ConversionError(f"--spacing needs three positive numbers X Y Z (mm), got {list(spacing)}")
    return values  # type: ignore[return-value]


def spacing_note(spacing: tuple[float, float, float] | None, true_spacing: str) -> str:
    if spacing is None:
        return (
            "The h5 files carry no voxel spacing: written as 1 x 1 x 1 mm, which is not the true spacing "
            f"({true_spacing}); pass --spacing X Y Z to set it."
        )
    x, y, z = spacing
    return (
        f"The h5 files carry no voxel spacing: written as {x:g} x {y:g} x {z:g} mm (x y z, given by --spacing; "
        f"true spacing: {true_spacing})."
    )


def target_folder(dataset_id: int, name: str, raw_root: Path | None, overwrite: bool) -> tuple[Path, Path]:
    """Resolve ``$nnUNet_raw/DatasetXXX_<name>``; refuse clashes before anything is read or written."""
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 0 <= dataset_id <= 999:
        raise ConversionError(f"-d: the dataset ID must be an integer 0-999, got {dataset_id!r}")
    if not _SAFE_NAME.fullmatch(name):
        raise ConversionError(f"--name {name!r}: use letters, digits, '_' or '-' (it becomes DatasetXXX_<name>)")
    if raw_root is None:
        value = os.environ.get("nnUNet_raw")
        if not value:
            raise ConversionError(
                "environment variable nnUNet_raw is not set: export it to nnU-Net's raw data folder "
                "(see nnU-Net's documentation/setting_up_paths.md)."
            )
        raw_root = Path(value)
    raw_root = Path(raw_root)
    if not raw_root.is_dir():
        raise ConversionError(f"nnU-Net raw folder {raw_root} does not exist; create it or fix nnUNet_raw.")
    folder_name = f"Dataset{dataset_id:03d}_{name}"
    target = raw_root / folder_name
    prefix = f"Dataset{dataset_id:03d}_"
    # nnU-Net resolves -d ID by prefix across its three folders: a second name for the ID would break that.
    clashes = []
    for env in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        folder = raw_root if env == "nnUNet_raw" else Path(os.environ.get(env) or "/nonexistent-nnunet-folder")
        if folder.is_dir():
            clashes += [str(p) for p in folder.iterdir() if p.name.startswith(prefix) and p.name != folder_name]
    if clashes:
        raise ConversionError(
            f"dataset ID {dataset_id} is already used by {sorted(clashes)}; nnU-Net needs one name per ID, so "
            "choose another -d or remove those folders"
        )
    if (target.exists() or target.is_symlink()) and not overwrite:
        raise ConversionError(f"{target} already exists; pass --overwrite to replace it")
    return raw_root, target


# --------------------------------------------------------------------------------------------------------------
# Reading and checking h5 files
# --------------------------------------------------------------------------------------------------------------


def _check_h5(path: Path, ndim: int, allowed: set[int], root: Path, problems: list[str]) -> tuple[int, ...] | None:
    """Check one h5 file (datasets, dimensionality, shapes, label values) and return its shape, or None.

    The label is read fully (it is small, uint8) to check its values; the image only by its metadata, since it
    is read again when written.
    """
    import h5py

    where = relative_posix(path, root)
    if not path.is_file():
        problems.append(f"{where} does not exist")
        return None
    try:
        with h5py.File(path, "r") as h:
            missing = [k for k in ("image", "label") if not isinstance(h.get(k), h5py.Dataset)]
            if missing:
                problems.append(
                    f"{where} has no dataset {' or '.join(repr(k) for k in missing)} (it holds {sorted(h.keys())}); "
                    "expected datasets 'image' and 'label'"
                )
                return None
            image, label = h["image"], h["label"]
            bad_len = len(problems)
            for key, ds in (("image", image), ("label", label)):
                if ds.dtype.kind not in "biuf":
                    problems.append(f"{where}: {key} has non-numeric dtype {ds.dtype}")
            if image.ndim != ndim:
                problems.append(f"{where}: image is {image.ndim}D with shape {image.shape}, expected {ndim}D")
            if image.shape != label.shape:
                problems.append(f"{where}: image shape {image.shape} does not match label shape {label.shape}")
            if image.size == 0:
                problems.append(f"{where}: image is empty (shape {image.shape})")
            if len(problems) > bad_len:
                return None
            values = np.unique(label[()])
            bad = [v for v in values.tolist() if not (float(v).is_integer() and int(v) in allowed)]
            if bad:
                shown = ", ".join(f"{v:g}" for v in bad[:MAX_LISTED_PROBLEMS])
                problems.append(f"{where}: label contains value(s) {shown} outside the expected {sorted(allowed)}")
                return None
            return tuple(int(s) for s in image.shape)
    except OSError as e:
        problems.append(f"{where} cannot be read as HDF5 ({e})")
        return None


def _load(source: Source, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read (and for slices, stack in slice order) image as float32 and label as uint8."""
    import h5py

    images, labels = [], []
    for path in source.files:
        try:
            with h5py.File(path, "r") as h:
                images.append(np.asarray(h["image"][()], dtype=np.float32))
                labels.append(np.asarray(h["label"][()]).astype(np.uint8))
        except (OSError, KeyError) as e:
            raise ConversionError(f"{relative_posix(path, root)} cannot be read ({e})") from e
    if source.stacked:
        return np.stack(images, axis=0), np.stack(labels, axis=0)
    return images[0], labels[0]


def _hw(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape))


def validate_sources(sources: Iterable[Source], allowed: set[int], root: Path, progress: bool, desc: str) -> list[str]:
    """Check every source; for stacked sources also that all slices share H x W. Returns the problems."""
    from tqdm import tqdm

    problems: list[str] = []
    for source in tqdm(list(sources), desc=desc, unit="case", disable=not progress):
        if not source.stacked:
            _check_h5(source.files[0], 3, allowed, root, problems)
            continue
        shapes = [(path, _check_h5(path, 2, allowed, root, problems)) for path in source.files]
        valid = [(path, shape) for path, shape in shapes if shape is not None]
        odd = [f"{relative_posix(path, root)} is {_hw(shape)}" for path, shape in valid if shape != valid[0][1]]
        if odd:
            problems.append(
                f"slices of volume {source.case_id} differ in H x W (all must match to be stacked): "
                f"{relative_posix(valid[0][0], root)} is {_hw(valid[0][1])}, but {'; '.join(odd[:MAX_LISTED_PROBLEMS])}"
            )
    return problems


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


def _write_nifti(array: np.ndarray, path: Path, spacing: tuple[float, float, float]) -> None:
    import SimpleITK as sitk

    # GetImageFromArray maps numpy axis 0 to ITK z, so GetArrayFromImage (nnU-Net's SimpleITKIO) gives back
    # exactly `array`: nnU-Net sees the h5 axis order. Spacing is ITK (x, y, z) order: x = last numpy axis.
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path), True)
    # On a full disk ITK's NIfTI writer only prints "wrote only 0 of N bytes" and returns normally: read it back.
    try:
        read_geometry(path)
    except RuntimeError as exc:
        raise RuntimeError(f"{path} was written incompletely ({first_line(exc)})") from exc
    incomplete = nifti_truncation_problem(path)
    if incomplete:
        raise RuntimeError(f"{path} was written incompletely: it {incomplete}")


def _fix_permissions(folder: Path) -> None:
    """Temp files (mkstemp in write_labeled_list) are 0600; give the dataset the user's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def write_dataset(
    target: Path,
    raw_root: Path,
    src: Path,
    train: list[Source],
    test: list[Source],
    dataset_json: dict,
    labeled_lists: dict[str, tuple[list[str], str]],
    extra_json: dict[str, dict],
    spacing: tuple[float, float, float],
    overwrite: bool,
    progress: bool,
) -> None:
    """Write everything into a hidden temporary folder beside ``target``, then rename it into place."""
    from tqdm import tqdm

    tmp = raw_root / f".{target.name}.{uuid.uuid4().hex[:8]}.converting"
    tmp.mkdir()
    try:
        jobs = [(s, "imagesTr", "labelsTr") for s in train] + [(s, "imagesTs", "labelsTs") for s in test]
        for sub in {d for _, *dirs in jobs for d in dirs}:
            (tmp / sub).mkdir()
        for source, img_dir, lab_dir in tqdm(jobs, desc=f"writing {target.name}", unit="case", disable=not progress):
            image, label = _load(source, src)
            _write_nifti(image, tmp / img_dir / f"{source.case_id}_0000{FILE_ENDING}", spacing)
            _write_nifti(label, tmp / lab_dir / f"{source.case_id}{FILE_ENDING}", spacing)
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=4) + "\n", encoding="utf-8")
        for name, content in extra_json.items():
            (tmp / name).write_text(json.dumps(content, indent=4) + "\n", encoding="utf-8")
        for name, (ids, header) in labeled_lists.items():
            write_labeled_list(ids, tmp / name, header=header)
        _fix_permissions(tmp)
        if target.exists() or target.is_symlink():
            if not overwrite:  # appeared while we were writing
                raise ConversionError(f"{target} already exists; pass --overwrite to replace it")
            old = raw_root / f".{target.name}.{uuid.uuid4().hex[:8]}.replaced"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            os.rename(tmp, target)
    except BaseException as exc:
        full = None if isinstance(exc, DataValidationError) else disk_full_reason(exc, raw_root)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is None:
            raise
        raise ConversionError(
            f"no space left on the disk of {raw_root} while writing {target.name} ({full}). Nothing was written: the "
            f"partial copy was removed{' and ' + str(target) + ' is as it was' if target.exists() else ''}, and "
            f"{src} was only read. Free up space on that disk or set nnUNet_raw to a folder on a larger disk, then "
            "convert again."
        ) from exc


def dataset_json_for(
    name: str, labels: dict[str, int], num_training: int, num_test: int, description: str, reference: str
) -> dict:
    return {
        "name": name,
        "description": description,
        "reference": reference,
        "channel_names": {"0": "MRI"},
        "labels": labels,
        "numTraining": num_training,
        "numTest": num_test,
        "file_ending": FILE_ENDING,
        # Pin the reader so that nnU-Net reads arrays back in the h5 axis order (see the module docstring).
        "overwrite_image_reader_writer": "SimpleITKIO",
    }
