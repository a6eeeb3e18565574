"""``nnfiltermatch convert la-h5``: the left atrium benchmark in the UA-MT h5 layout
(``SRC/2018LA_Seg_Training Set/<CASE>/mri_norm2.h5`` and its train/test lists) as an nnU-Net v2 raw dataset."""

from __future__ import annotations

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

__all__ = ["LA_LABELED_SIZES", "convert_la_h5"]

LA_CASE_DIR = "2018LA_Seg_Training Set"
LA_H5_NAME = "mri_norm2.h5"
LA_LABELS = {"background": 0, "left_atrium": 1}
# UA-MT protocol: the first k cases of train.list are labelled (k of the 80 training cases).
LA_LABELED_SIZES: dict[int, str] = {4: "5%", 8: "10%", 16: "20%"}

_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
_CHANNEL_LIKE = re.compile(r".+_\d{4}$")  # would be mistaken for a channel suffix by nnU-Net


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
    spacing_t = check_spacing(spacing)
    raw_root, target = target_folder(dataset_id, name, raw_root, overwrite)
    if not src.is_dir():
        raise ConversionError(f"source folder {src} does not exist")
    messages: list[str] = []
    problems: list[str] = []

    train_path = Path(train_list) if train_list is not None else src / "train.list"
    if not train_path.is_file():
        raise ConversionError(f"train list {train_path} does not exist; pass --train-list")
    train_ids = read_list(train_path, src, problems)
    test_path = Path(test_list) if test_list is not None else src / "test.list"
    test_ids: list[str] = []
    if test_path.is_file():
        test_ids = read_list(test_path, src, problems)
    elif test_list is not None:
        raise ConversionError(f"test list {test_path} does not exist")
    else:
        messages.append(f"No test list ({relative_posix(test_path, src)} is absent): no imagesTs/labelsTs written.")

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
        problems.append(f"{relative_posix(case_dir, src)}/ does not exist (expected {LA_CASE_DIR}/<CASE>/{LA_H5_NAME})")
    elif train_ids or test_ids:
        for list_path, ids in ((train_path, train_ids), (test_path, test_ids)):
            problems += [
                f"{LA_CASE_DIR}/{c}/{LA_H5_NAME} does not exist (case named by {relative_posix(list_path, src)})"
                for c in ids
                if not (case_dir / c / LA_H5_NAME).is_file()
            ]
    if problems:
        raise ConversionError.from_problems(f"Cannot convert {src}", problems)

    train = [Source(c, (case_dir / c / LA_H5_NAME,)) for c in train_ids]
    test = [Source(c, (case_dir / c / LA_H5_NAME,)) for c in test_ids]
    problems = validate_sources(train + test, set(LA_LABELS.values()), src, progress, "checking LA h5")
    if problems:
        raise ConversionError.from_problems(f"Cannot convert {src} ({RESTORE_HINT})", problems)
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

    note = spacing_note(spacing_t, "0.625 mm isotropic")
    description = (
        "2018 Atrial Segmentation Challenge left atrium (LGE MRI), converted by `nnfiltermatch convert la-h5` from "
        "the UA-MT h5 layout (image z-scored per volume). Array axes are those of the h5 files (numpy axis 0 is "
        f"the NIfTI z axis). {note}"
    )
    dataset_json = dataset_json_for(
        name,
        LA_LABELS,
        len(train),
        len(test),
        description,
        "Xiong et al., A global benchmark of algorithms for segmenting the left atrium from LGE MRI, MedIA 67 (2021)",
    )
    write_dataset(
        target, raw_root, src, train, test, dataset_json, lists, {}, spacing_t or (1.0, 1.0, 1.0), overwrite, progress
    )
    messages.insert(0, note)
    return ConversionResult(target, train_ids, test_ids, {k: v[0] for k, v in lists.items()}, messages)
