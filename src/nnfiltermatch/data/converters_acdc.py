"""``nnfiltermatch convert acdc-h5``: the ACDC cardiac benchmark in the SSL4MIS h5 layout (``SRC/data``,
``SRC/data/slices`` and the train/val/test lists) as an nnU-Net v2 raw dataset."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from nnfiltermatch.data.converters import (
    RESTORE_HINT,
    ConversionError,
    ConversionResult,
    Source,
    check_spacing,
    dataset_json_for,
    read_list,
    spacing_note,
    target_folder,
    validate_sources,
    write_dataset,
)
from nnfiltermatch.errors import MAX_LISTED_PROBLEMS
from nnfiltermatch.files import relative_posix

__all__ = ["ACDC_LABELED_PATIENTS", "convert_acdc_h5"]

ACDC_LABELS = {"background": 0, "right_ventricle": 1, "myocardium": 2, "left_ventricle": 3}
# SSL4MIS protocol: labelled patients (all their frames) out of the 70 training patients.
ACDC_LABELED_PATIENTS: dict[int, tuple[tuple[str, ...], str]] = {
    3: (("patient038", "patient050", "patient099"), "5%"),
    7: (("patient021", "patient038", "patient049", "patient050", "patient058", "patient099", "patient100"), "10%"),
}
ACDC_SPLITS_FILE = "splits_test.json"
_ACDC_PATIENT = re.compile(r"patient\d{3}")
_ACDC_FRAME = re.compile(r"(?P<patient>patient\d{3})_frame\d+")
_ACDC_SLICE = re.compile(r"(?P<frame>(?P<patient>patient\d{3})_frame\d+)_slice_(?P<index>\d+)")


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
            first, second = relative_posix(Path(entry.path), src), relative_posix(frame[index], src)
            problems.append(f"{first} and {second} are both slice {index}")
        frame[index] = Path(entry.path)
    base = 0 if any(0 in f for f in by_frame.values()) else 1
    out: dict[str, list[Path]] = {}
    for frame_id, slices in by_frame.items():
        indices = sorted(slices)  # numeric order: slice_10 after slice_9
        missing = sorted(set(range(base, indices[-1] + 1)) - set(indices))
        if missing:
            shown = ", ".join(f"{frame_id}_slice_{i}.h5" for i in missing[:MAX_LISTED_PROBLEMS])
            problems.append(
                f"{relative_posix(slice_dir, src)}: volume {frame_id} has slices {indices[0]}..{indices[-1]} but "
                f"{shown} {'is' if len(missing) == 1 else 'are'} missing"
            )
        out[frame_id] = [slices[i] for i in indices]
    return out


def _acdc_list(src: Path, given: Path | None, default: str, messages: list[str], problems: list[str]) -> list[str]:
    path = Path(given) if given is not None else src / default
    if path.is_file():
        return read_list(path, src, problems)
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
    spacing_t = check_spacing(spacing)
    raw_root, target = target_folder(dataset_id, name, raw_root, overwrite)
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

    train: list[Source] = []
    for frame_id in train_ids:
        if frame_id not in slices:
            problems.append(f"train list names {frame_id}, but data/slices/ has no {frame_id}_slice_*.h5")
            continue
        train.append(Source(frame_id, tuple(slices[frame_id]), stacked=True))
    if train_entries and any(_ACDC_SLICE.fullmatch(e) for e in train_entries):
        have = {p.name[:-3] for paths in slices.values() for p in paths}
        absent = [e for e in train_entries if _ACDC_SLICE.fullmatch(e) and e not in have]
        if absent:
            problems.append(f"train list names slice(s) that do not exist: {absent[:MAX_LISTED_PROBLEMS]}")
    held_out: list[Source] = []
    for split, ids in (("val", val_ids), ("test", test_ids)):
        for frame_id in ids:
            if frame_id not in volumes:
                problems.append(f"{split} list names {frame_id}, but data/{frame_id}.h5 does not exist")
                continue
            held_out.append(Source(frame_id, (volumes[frame_id],)))
    if problems:
        raise ConversionError.from_problems(f"Cannot convert {src}", problems)

    allowed = set(ACDC_LABELS.values())
    problems = validate_sources(train + held_out, allowed, src, progress, "checking ACDC h5")
    problems += _acdc_cross_check(train, volumes, src)
    if problems:
        raise ConversionError.from_problems(f"Cannot convert {src} ({RESTORE_HINT})", problems)

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

    note = spacing_note(spacing_t, "about 1.4-1.7 mm in-plane, 5-10 mm between slices, varying per patient")
    description = (
        "ACDC cine cardiac MRI, converted by `nnfiltermatch convert acdc-h5` from the SSL4MIS h5 layout (image "
        "scaled to [0, 1]); training volumes are stacked from their slices. Array axes are slices x H x W "
        f"(numpy axis 0, the NIfTI z axis, is the slice axis). imagesTs holds val and test cases: see "
        f"{ACDC_SPLITS_FILE}. {note}"
    )
    dataset_json = dataset_json_for(
        name,
        ACDC_LABELS,
        len(train),
        len(held_out),
        description,
        "Bernard et al., Deep Learning Techniques for Automatic MRI Cardiac Multi-structures Segmentation and "
        "Diagnosis: Is the Problem Solved?, IEEE TMI 37(11), 2018",
    )
    extra = {ACDC_SPLITS_FILE: {"val": val_ids, "test": test_ids}}
    write_dataset(
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


def _acdc_cross_check(train: list[Source], volumes: dict[str, Path], src: Path) -> list[str]:
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
            problems.append(f"{relative_posix(volume, src)} cannot be read as HDF5 ({e})")
            continue
        stacked = (len(source.files), *hw)
        if shape is not None and shape != stacked:
            problems.append(
                f"{relative_posix(volume, src)} has shape {shape} but its {len(source.files)} slices in data/slices/ "
                f"stack to {stacked}: slices are missing or belong to another volume"
            )
    return problems
