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

from nnfiltermatch.files import disk_full_reason
from nnfiltermatch.inventory import (
    MAX_LISTED_PROBLEMS,
    DataValidationError,
    _first_line,
    _nifti_truncation_problem,
    _read_header,
    write_labeled_list,
)

__all__ = [
    "ACDC_LABELED_PATIENTS",
    "LA_LABELED_SIZES",
    "ConversionError",
    "ConversionResult",
    "convert_acdc_h5",
    "convert_la_h5",
]

FILE_ENDING = ".nii.gz"

LA_CASE_DIR = "2018LA_Seg_Training Set"
LA_H5_NAME = "mri_norm2.h5"
LA_LABELS = {"background": 0, "left_atrium": 1}
# UA-MT protocol: the first k cases of train.list are labelled (k of the 80 training cases).
LA_LABELED_SIZES: dict[int, str] = {4: "5%", 8: "10%", 16: "20%"}

ACDC_LABELS = {"background": 0, "right_ventricle": 1, "myocardium": 2, "left_ventricle": 3}
# SSL4MIS protocol: labelled patients (all their frames) out of the 70 training patients.
ACDC_LABELED_PATIENTS: dict[int, tuple[tuple[str, ...], str]] = {
    3: (("patient038", "patient050", "patient099"), "5%"),
    7: (("patient021", "patient038", "patient049", "patient050", "patient058", "patient099", "patient100"), "10%"),
}
ACDC_SPLITS_FILE = "splits_test.json"

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_CHANNEL_LIKE = re.compile(r".+_\d{4}$")  # would be mistaken for a channel suffix by nnU-Net
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")
_ACDC_PATIENT = re.compile(r"patient\d{3}")
_ACDC_FRAME = re.compile(r"(?P<patient>patient\d{3})_frame\d+")
_ACDC_SLICE = re.compile(r"(?P<frame>(?P<patient>patient\d{3})_frame\d+)_slice_(?P<index>\d+)")


# The converters read the published files as they are distributed; a content problem means a damaged copy.
_RESTORE_HINT = "restore the named files from the published dataset, or leave their cases out of the lists"


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
class _Source:
    """One output case: a single 3D h5 volume, or the 2D slice h5 files of one volume in slice order."""

    case_id: str
    files: tuple[Path, ...]
    stacked: bool = False


# --------------------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------------------


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _read_list(path: Path, root: Path, problems: list[str]) -> list[str]:
    """Entries of a ``.list`` file (one per line, blank lines and ``#`` comments ignored); duplicates reported."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"list {_rel(path, root)} cannot be read ({e})")
        return []
    entries = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    dups = sorted(e for e, n in Counter(entries).items() if n > 1)
    if dups:
        problems.append(f"list {_rel(path, root)} names {dups[:MAX_LISTED_PROBLEMS]} more than once")
    if not entries:
        problems.append(f"list {_rel(path, root)} is empty")
    return list(dict.fromkeys(entries))


def _check_spacing(spacing: Sequence[float] | None) -> tuple[float, float, float] | None:
    if spacing is None:
        return None
    values = tuple(float(s) for s in spacing)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ConversionError(f"--spacing needs three positive numbers X Y Z (mm), got {list(spacing)}")
    return values  # type: ignore[return-value]


def _spacing_note(spacing: tuple[float, float, float] | None, true_spacing: str) -> str:
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


def _target_folder(dataset_id: int, name: str, raw_root: Path | None, overwrite: bool) -> tuple[Path, Path]:
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

    where = _rel(path, root)
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


def _load(source: _Source, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read (and for slices, stack in slice order) image as float32 and label as uint8."""
    import h5py

    images, labels = [], []
    for path in source.files:
        try:
            with h5py.File(path, "r") as h:
                images.append(np.asarray(h["image"][()], dtype=np.float32))
                labels.append(np.asarray(h["label"][()]).astype(np.uint8))
        except (OSError, KeyError) as e:
            raise ConversionError(f"{_rel(path, root)} cannot be read ({e})") from e
    if source.stacked:
        return np.stack(images, axis=0), np.stack(labels, axis=0)
    return images[0], labels[0]


def _hw(shape: tuple[int, ...]) -> str:
    return " x ".join(map(str, shape))


def _validate(sources: Iterable[_Source], allowed: set[int], root: Path, progress: bool, desc: str) -> list[str]:
    """Check every source; for stacked sources also that all slices share H x W. Returns the problems."""
    from tqdm import tqdm

    problems: list[str] = []
    for source in tqdm(list(sources), desc=desc, unit="case", disable=not progress):
        if not source.stacked:
            _check_h5(source.files[0], 3, allowed, root, problems)
            continue
        shapes = [(path, _check_h5(path, 2, allowed, root, problems)) for path in source.files]
        valid = [(path, shape) for path, shape in shapes if shape is not None]
        odd = [f"{_rel(path, root)} is {_hw(shape)}" for path, shape in valid if shape != valid[0][1]]
        if odd:
            problems.append(
                f"slices of volume {source.case_id} differ in H x W (all must match to be stacked): "
                f"{_rel(valid[0][0], root)} is {_hw(valid[0][1])}, but {'; '.join(odd[:MAX_LISTED_PROBLEMS])}"
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
        _read_header(path)
    except RuntimeError as exc:
        raise RuntimeError(f"{path} was written incompletely ({_first_line(exc)})") from exc
    incomplete = _nifti_truncation_problem(path)
    if incomplete:
        raise RuntimeError(f"{path} was written incompletely: it {incomplete}")


def _fix_permissions(folder: Path) -> None:
    """Temp files (mkstemp in write_labeled_list) are 0600; give the dataset the user's usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _write_dataset(
    target: Path,
    raw_root: Path,
    src: Path,
    train: list[_Source],
    test: list[_Source],
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


def _dataset_json(
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


# --------------------------------------------------------------------------------------------------------------
# LA (UA-MT layout)
# --------------------------------------------------------------------------------------------------------------


def convert_la_h5(
    src: Path,
    dataset_id: int,
    name: str = "LA",
    spacing: Sequence[float] | None = None,
    train_list: Path | None = None,
    test_list: Path | None = None,
    overwrite: bool = False,
    raw_root: Path | None = None,
    progress: bool = True,
) -> ConversionResult:
    """Convert ``SRC/2018LA_Seg_Training Set/<CASE>/mri_norm2.h5`` (UA-MT) to ``DatasetXXX_<name>``.

    Case IDs are the bare UA-MT case IDs, so the published UA-MT labelled lists can be used unchanged.
    Train cases go to imagesTr/labelsTr, test cases (if a test list exists) to imagesTs/labelsTs.
    """
    src = Path(src)
    spacing_t = _check_spacing(spacing)
    raw_root, target = _target_folder(dataset_id, name, raw_root, overwrite)
    if not src.is_dir():
        raise ConversionError(f"source folder {src} does not exist")
    messages: list[str] = []
    problems: list[str] = []

    train_path = Path(train_list) if train_list is not None else src / "train.list"
    if not train_path.is_file():
        raise ConversionError(f"train list {train_path} does not exist; pass --train-list")
    train_ids = _read_list(train_path, src, problems)
    test_path = Path(test_list) if test_list is not None else src / "test.list"
    test_ids: list[str] = []
    if test_path.is_file():
        test_ids = _read_list(test_path, src, problems)
    elif test_list is not None:
        raise ConversionError(f"test list {test_path} does not exist")
    else:
        messages.append(f"No test list ({_rel(test_path, src)} is absent): no imagesTs/labelsTs written.")

    for case_id in train_ids + test_ids:
        if not _SAFE_ID.fullmatch(case_id) or _CHANNEL_LIKE.fullmatch(case_id):
            problems.append(
                f"case ID {case_id!r} cannot be an nnU-Net case ID (use letters, digits, '_', '-', '.'; no _XXXX "
                "ending)"
            )
    both = sorted(set(train_ids) & set(test_ids))
    if both:
        problems.append(f"{both[:MAX_LISTED_PROBLEMS]} are in both the train and the test list")
    case_dir = src / LA_CASE_DIR
    if not case_dir.is_dir():
        problems.append(f"{_rel(case_dir, src)}/ does not exist (expected {LA_CASE_DIR}/<CASE>/{LA_H5_NAME})")
    elif train_ids or test_ids:
        for list_path, ids in ((train_path, train_ids), (test_path, test_ids)):
            problems += [
                f"{LA_CASE_DIR}/{c}/{LA_H5_NAME} does not exist (case named by {_rel(list_path, src)})"
                for c in ids
                if not (case_dir / c / LA_H5_NAME).is_file()
            ]
    if problems:
        raise ConversionError.from_problems(f"Cannot convert {src}", problems)

    train = [_Source(c, (case_dir / c / LA_H5_NAME,)) for c in train_ids]
    test = [_Source(c, (case_dir / c / LA_H5_NAME,)) for c in test_ids]
    problems = _validate(train + test, set(LA_LABELS.values()), src, progress, "checking LA h5")
    if problems:
        raise ConversionError.from_problems(f"Cannot convert {src} ({_RESTORE_HINT})", problems)
    unlisted = sorted(p.name for p in case_dir.iterdir() if p.is_dir() and p.name not in set(train_ids) | set(test_ids))
    if unlisted:
        messages.append(f"{len(unlisted)} case folder(s) not named by any list were skipped: {unlisted[:10]}")

    lists: dict[str, tuple[list[str], str]] = {}
    for k, pct in LA_LABELED_SIZES.items():
        fname = f"labeled_{k}.txt"
        if len(train_ids) > k:
            header = (
                f"LA {pct} protocol (UA-MT): the first {k} cases of train.list are labelled (of 80 in the full set)"
            )
            lists[fname] = (train_ids[:k], header)
            messages.append(f"Wrote {fname} ({pct}): the first {k} cases of the train list.")
        else:
            messages.append(
                f"{fname} ({pct}) not written: it needs more than {k} training cases so that some stay "
                f"unlabelled ({len(train_ids)} here)."
            )

    note = _spacing_note(spacing_t, "0.625 mm isotropic")
    description = (
        "2018 Atrial Segmentation Challenge left atrium (LGE MRI), converted by `nnfiltermatch convert la-h5` from "
        "the UA-MT h5 layout (image z-scored per volume). Array axes are those of the h5 files (numpy axis 0 is "
        f"the NIfTI z axis). {note}"
    )
    dataset_json = _dataset_json(
        name,
        LA_LABELS,
        len(train),
        len(test),
        description,
        "Xiong et al., A global benchmark of algorithms for segmenting the left atrium from LGE MRI, MedIA 67 (2021)",
    )
    _write_dataset(
        target, raw_root, src, train, test, dataset_json, lists, {}, spacing_t or (1.0, 1.0, 1.0), overwrite, progress
    )
    messages.insert(0, note)
    return ConversionResult(target, train_ids, test_ids, {k: v[0] for k, v in lists.items()}, messages)


# --------------------------------------------------------------------------------------------------------------
# ACDC (SSL4MIS layout)
# --------------------------------------------------------------------------------------------------------------


def _patient(frame_id: str) -> str:
    """``patient038_frame01`` -> ``patient038``."""
    return frame_id.split("_", 1)[0]


def _acdc_frames(entries: list[str], list_name: str, problems: list[str], frames_of_patient: dict) -> list[str]:
    """Turn list entries (patients, patient-frames or slices) into patient-frame IDs, in list order."""
    frames: list[str] = []
    for entry in entries:
        if m := _ACDC_SLICE.fullmatch(entry):
            frames.append(m.group("frame"))
        elif _ACDC_FRAME.fullmatch(entry):
            frames.append(entry)
        elif _ACDC_PATIENT.fullmatch(entry):
            found = frames_of_patient.get(entry, [])
            if not found:
                problems.append(f"{list_name} names patient {entry!r}, but no file of that patient exists")
            frames += found
        else:
            problems.append(
                f"{list_name} entry {entry!r} is not a patient (patientXXX), a patient-frame (patientXXX_frameYY) "
                "or a slice (patientXXX_frameYY_slice_Z)"
            )
    return list(dict.fromkeys(frames))


def _acdc_slices(slice_dir: Path, src: Path, problems: list[str]) -> dict[str, list[Path]]:
    """Slice files of every frame in ``data/slices``, in numeric slice order, with gaps reported.

    The SSL4MIS files number slices from 1; a 0-based set is accepted too. The base is taken from the whole
    folder, so a frame that lacks slice_0 while others have one is reported as incomplete.
    """
    by_frame: dict[str, dict[int, Path]] = {}
    if not slice_dir.is_dir():
        return {}
    for entry in sorted(os.scandir(slice_dir), key=lambda e: e.name):
        if not entry.name.endswith(".h5") or not (m := _ACDC_SLICE.fullmatch(entry.name[:-3])):
            continue
        index = int(m.group("index"))
        frame = by_frame.setdefault(m.group("frame"), {})
        if index in frame:
            problems.append(f"{_rel(Path(entry.path), src)} and {_rel(frame[index], src)} are both slice {index}")
        frame[index] = Path(entry.path)
    base = 0 if any(0 in f for f in by_frame.values()) else 1
    out: dict[str, list[Path]] = {}
    for frame_id, slices in by_frame.items():
        indices = sorted(slices)  # numeric order: slice_10 after slice_9
        missing = sorted(set(range(base, indices[-1] + 1)) - set(indices))
        if missing:
            shown = ", ".join(f"{frame_id}_slice_{i}.h5" for i in missing[:MAX_LISTED_PROBLEMS])
            problems.append(
                f"{_rel(slice_dir, src)}: volume {frame_id} has slices {indices[0]}..{indices[-1]} but {shown} "
                f"{'is' if len(missing) == 1 else 'are'} missing"
            )
        out[frame_id] = [slices[i] for i in indices]
    return out


def _acdc_list(src: Path, given: Path | None, default: str, messages: list[str], problems: list[str]) -> list[str]:
    path = Path(given) if given is not None else src / default
    if path.is_file():
        return _read_list(path, src, problems)
    if given is not None:
        raise ConversionError(f"list {path} does not exist")
    messages.append(f"No {default} in {src}: no cases of that split.")
    return []


def convert_acdc_h5(
    src: Path,
    dataset_id: int,
    name: str = "ACDC",
    spacing: Sequence[float] | None = None,
    train_list: Path | None = None,
    val_list: Path | None = None,
    test_list: Path | None = None,
    overwrite: bool = False,
    raw_root: Path | None = None,
    progress: bool = True,
) -> ConversionResult:
    """Convert the SSL4MIS ACDC layout (``SRC/data``, ``SRC/data/slices``, lists) to ``DatasetXXX_<name>``.

    Training volumes are rebuilt by stacking their slices (SSL4MIS stores no training volumes); val and test
    volumes are taken as they are and go to imagesTs, with ``splits_test.json`` telling them apart. Case IDs are
    patient-frames (``patient038_frame01``); labelled lists name all frames of the protocol's patients.
    """
    src = Path(src)
    spacing_t = _check_spacing(spacing)
    raw_root, target = _target_folder(dataset_id, name, raw_root, overwrite)
    data_dir = src / "data"
    slice_dir = data_dir / "slices"
    if not data_dir.is_dir():
        raise ConversionError(f"{data_dir} does not exist (expected SSL4MIS layout SRC/data/, SRC/data/slices/)")
    messages: list[str] = []
    problems: list[str] = []

    slices = _acdc_slices(slice_dir, src, problems)
    volumes = {p.name[:-3]: p for p in data_dir.glob("patient*_frame*.h5") if _ACDC_FRAME.fullmatch(p.name[:-3])}
    frames_of_patient: dict[str, list[str]] = {}
    for frame_id in sorted(set(slices) | set(volumes)):
        frames_of_patient.setdefault(_patient(frame_id), []).append(frame_id)

    if train_list is None and not (src / "train.list").is_file() and (src / "train_slices.list").is_file():
        train_list = src / "train_slices.list"
        messages.append("No train.list: training volumes taken from train_slices.list.")
    train_entries = _acdc_list(src, train_list, "train.list", messages, problems)
    val_entries = _acdc_list(src, val_list, "val.list", messages, problems)
    test_entries = _acdc_list(src, test_list, "test.list", messages, problems)
    train_ids = _acdc_frames(train_entries, "train list", problems, frames_of_patient)
    val_ids = _acdc_frames(val_entries, "val list", problems, frames_of_patient)
    test_ids = _acdc_frames(test_entries, "test list", problems, frames_of_patient)
    if not train_ids and not problems:
        problems.append("the train list names no training volume")

    splits = {"train": train_ids, "val": val_ids, "test": test_ids}
    patients = {k: {_patient(f) for f in v} for k, v in splits.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        both = sorted(patients[a] & patients[b])
        if both:
            problems.append(f"patient(s) {both[:MAX_LISTED_PROBLEMS]} are in both the {a} and the {b} list")

    train: list[_Source] = []
    for frame_id in train_ids:
        if frame_id not in slices:
            problems.append(f"train list names {frame_id}, but data/slices/ has no {frame_id}_slice_*.h5")
            continue
        train.append(_Source(frame_id, tuple(slices[frame_id]), stacked=True))
    if train_entries and any(_ACDC_SLICE.fullmatch(e) for e in train_entries):
        have = {p.name[:-3] for paths in slices.values() for p in paths}
        absent = [e for e in train_entries if _ACDC_SLICE.fullmatch(e) and e not in have]
        if absent:
            problems.append(f"train list names slice(s) that do not exist: {absent[:MAX_LISTED_PROBLEMS]}")
    held_out: list[_Source] = []
    for split, ids in (("val", val_ids), ("test", test_ids)):
        for frame_id in ids:
            if frame_id not in volumes:
                problems.append(f"{split} list names {frame_id}, but data/{frame_id}.h5 does not exist")
                continue
            held_out.append(_Source(frame_id, (volumes[frame_id],)))
    if problems:
        raise ConversionError.from_problems(f"Cannot convert {src}", problems)

    allowed = set(ACDC_LABELS.values())
    problems = _validate(train + held_out, allowed, src, progress, "checking ACDC h5")
    problems += _acdc_cross_check(train, volumes, src)
    if problems:
        raise ConversionError.from_problems(f"Cannot convert {src} ({_RESTORE_HINT})", problems)

    lists: dict[str, tuple[list[str], str]] = {}
    train_patients = patients["train"]
    for k, (wanted, pct) in ACDC_LABELED_PATIENTS.items():
        fname = f"labeled_{k}.txt"
        absent = [p for p in wanted if p not in train_patients]
        ids = sorted(f for f in train_ids if _patient(f) in wanted)
        if absent:
            messages.append(f"{fname} ({pct}) not written: patient(s) {absent} are not among the training patients.")
        elif len(ids) == len(train_ids):
            messages.append(
                f"{fname} ({pct}) not written: it would label every training case, leaving none unlabelled."
            )
        else:
            header = f"ACDC {pct} protocol (SSL4MIS): all frames of {', '.join(wanted)} are labelled (of 70 patients)"
            lists[fname] = (ids, header)
            messages.append(f"Wrote {fname} ({pct}): {len(ids)} frames of {', '.join(wanted)}.")

    note = _spacing_note(spacing_t, "about 1.4-1.7 mm in-plane, 5-10 mm between slices, varying per patient")
    description = (
        "ACDC cine cardiac MRI, converted by `nnfiltermatch convert acdc-h5` from the SSL4MIS h5 layout (image "
        "scaled to [0, 1]); training volumes are stacked from their slices. Array axes are slices x H x W "
        f"(numpy axis 0, the NIfTI z axis, is the slice axis). imagesTs holds val and test cases: see "
        f"{ACDC_SPLITS_FILE}. {note}"
    )
    dataset_json = _dataset_json(
        name,
        ACDC_LABELS,
        len(train),
        len(held_out),
        description,
        "Bernard et al., Deep Learning Techniques for Automatic MRI Cardiac Multi-structures Segmentation and "
        "Diagnosis: Is the Problem Solved?, IEEE TMI 37(11), 2018",
    )
    extra = {ACDC_SPLITS_FILE: {"val": val_ids, "test": test_ids}}
    _write_dataset(
        target,
        raw_root,
        src,
        train,
        held_out,
        dataset_json,
        lists,
        extra,
        spacing_t or (1.0, 1.0, 1.0),
        overwrite,
        progress,
    )
    messages.insert(0, note)
    return ConversionResult(target, train_ids, val_ids + test_ids, {k: v[0] for k, v in lists.items()}, messages)


def _acdc_cross_check(train: list[_Source], volumes: dict[str, Path], src: Path) -> list[str]:
    """Where the full layout also stores a training volume, its shape must match the stacked slices.

    This catches a missing first or last slice, which a gap check cannot see. Only metadata is read.
    """
    import h5py

    problems: list[str] = []
    for source in train:
        volume = volumes.get(source.case_id)
        if volume is None:
            continue
        try:
            with h5py.File(source.files[0], "r") as h:
                hw = tuple(h["image"].shape)
            with h5py.File(volume, "r") as h:
                shape = tuple(h["image"].shape) if isinstance(h.get("image"), h5py.Dataset) else None
        except OSError as e:
            problems.append(f"{_rel(volume, src)} cannot be read as HDF5 ({e})")
            continue
        stacked = (len(source.files), *hw)
        if shape is not None and shape != stacked:
            problems.append(
                f"{_rel(volume, src)} has shape {shape} but its {len(source.files)} slices in data/slices/ stack to "
                f"{stacked}: slices are missing or belong to another volume"
            )
    return problems
