"""Discover and validate the cases of an nnU-Net v2 raw dataset before anything is trained.

Everything downstream (preprocessing, pseudo-labelling, filtering) trusts the inventory built here, so the
checks are strict and their messages name the offending file and say how to fix it. Problems are collected
and reported together so that a user can repair a dataset in one pass instead of one error at a time.

Label-budget simulation: when a labelled list is given, every other ``imagesTr`` case is treated as
unlabelled. Its label file is *never* opened (not even its header); only its presence in a directory listing
is used. This keeps the simulation honest: nothing about a hidden label can leak into training.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import math
import os
import re
import struct
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nnfiltermatch.files import atomic_write_text

__all__ = [
    "Case",
    "DataValidationError",
    "DatasetInventory",
    "build_inventory",
    "check_image_files",
    "count_nonfinite",
    "read_labeled_list",
    "sample_labeled_ids",
    "write_labeled_list",
]

MAX_LISTED_PROBLEMS = 20
SPACING_ORIGIN_RTOL = 1e-4
DIRECTION_ATOL = 1e-3
UNLABELED_DIR = "imagesUnlabeled"

# File endings users tend to paste into a labelled list; longest first so ".nii.gz" wins over ".gz".
_KNOWN_ENDINGS = (
    ".nii.gz",
    ".nii",
    ".mha",
    ".mhd",
    ".nrrd",
    ".nhdr",
    ".png",
    ".bmp",
    ".tif",
    ".tiff",
    ".jpg",
    ".jpeg",
    ".npy",
    ".npz",
    ".b2nd",
    ".gz",
)
_CHANNEL_SUFFIX = re.compile(r"^(?P<base>.+)_(?P<channel>\d{4})$")


class DataValidationError(ValueError):
    """Raised when the dataset (or a labelled list) cannot be used as given.

    ``problems`` holds every individual problem so callers can show or test them separately.
    """

    def __init__(self, message: str, problems: Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = list(problems) if problems is not None else [message]

    @classmethod
    def from_problems(cls, what: str, problems: Sequence[str]) -> DataValidationError:
        """Build one error listing up to MAX_LISTED_PROBLEMS problems, so users can fix them all at once."""
        if len(problems) == 1:
            return cls(f"{what}: {problems[0]}", problems)
        lines = [f"{what}: {len(problems)} problems found:"]
        lines += [f"  - {p}" for p in problems[:MAX_LISTED_PROBLEMS]]
        if len(problems) > MAX_LISTED_PROBLEMS:
            lines.append(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more (fix the ones above and re-run).")
        return cls("\n".join(lines), problems)


@dataclass(frozen=True)
class Case:
    """One case: its channel files in channel order and, for labelled cases only, its label file."""

    case_id: str
    image_files: tuple[Path, ...]
    label_file: Path | None


@dataclass
class DatasetInventory:
    """The validated split of a raw dataset into labelled and unlabelled cases."""

    raw_dir: Path
    dataset_json: dict
    labeled: list[Case]
    unlabeled: list[Case]
    num_channels: int
    file_ending: str

    @property
    def labeled_ids(self) -> list[str]:
        return [c.case_id for c in self.labeled]

    @property
    def unlabeled_ids(self) -> list[str]:
        return [c.case_id for c in self.unlabeled]

    def fingerprint_inputs(self, known: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """JSON-able description of every input file, so a prepare step can tell whether it must re-run.

        Each file is described by its size and the SHA-256 of its content, not by its timestamp, so a copied or
        re-extracted dataset is not taken for a changed one. A file whose size and mtime match its record in
        ``known`` (the last prepare's ``file_records``) keeps that record's hash without being read again.
        Labels of unlabelled cases are not included at all, so changing them never invalidates anything.
        """

        def entries(cases: list[Case], with_labels: bool) -> dict[str, dict[str, Any]]:
            out: dict[str, dict[str, Any]] = {}
            for case in cases:
                files = list(case.image_files)
                if with_labels and case.label_file is not None:
                    files.append(case.label_file)
                for f in files:
                    rel = _rel(f, self.raw_dir)
                    st = f.stat()
                    before = (known or {}).get(rel) or {}
                    unchanged = before.get("size") == st.st_size and before.get("mtime_ns") == st.st_mtime_ns
                    sha = before["sha256"] if unchanged and before.get("sha256") else file_sha256(f)
                    out[rel] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
            return dict(sorted(out.items()))

        return {
            "raw_dir": str(self.raw_dir.resolve()),
            "dataset_json": self.dataset_json,
            "num_channels": self.num_channels,
            "file_ending": self.file_ending,
            "labeled_ids": sorted(self.labeled_ids),
            "unlabeled_ids": sorted(self.unlabeled_ids),
            "labeled_files": entries(self.labeled, with_labels=True),
            "unlabeled_files": entries(self.unlabeled, with_labels=False),
        }


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Labelled lists
# --------------------------------------------------------------------------------------------------------------


def _strip_known_ending(name: str) -> str | None:
    for ending in _KNOWN_ENDINGS:
        if name.lower().endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


def read_labeled_list(path: Path, known_ids: Iterable[str] | None = None) -> list[str]:
    """Read a labelled list (one bare case ID per line; blank lines and ``#`` comments ignored; UTF-8, or UTF-16
    with a byte-order mark; a UTF-8 byte-order mark is dropped).

    IDs with a file ending (``case.nii.gz``) are always rejected. A channel suffix (``case_0000``) is rejected
    when ``known_ids`` is given and the ID is not itself a case but its stem is; without ``known_ids`` the
    suffix is ambiguous (many datasets have IDs such as ``patient_0001``) and is left to ``build_inventory``,
    which gives the same hint for unknown IDs.
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(
            f"Labelled list {path} does not exist (or is not a file). Give the path of a text file with one "
            "case ID per line, or leave the option out to use every imagesTr case as labelled."
        )
    try:
        data = path.read_bytes()
        # Editors on Windows start files with a byte-order mark; it is not part of the first ID.
        text = data.decode("utf-16" if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataValidationError(f"Labelled list {path} cannot be read as UTF-8 text ({e}).") from e

    ids: list[str] = []
    line_of: dict[str, list[int]] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip().lstrip("\ufeff").strip()  # a mark inside: lists joined with cat
        if not line or line.startswith("#"):
            continue
        ids.append(line)
        line_of.setdefault(line, []).append(lineno)

    if not ids:
        raise DataValidationError(
            f"Labelled list {path} contains no case IDs: at least one labelled case is needed. "
            "Write one bare case ID (e.g. hippocampus_001) per line."
        )

    known = set(known_ids) if known_ids is not None else None
    problems: list[str] = []
    dups = {i: lines for i, lines in line_of.items() if len(lines) > 1}
    for case_id, lines in dups.items():
        problems.append(f"duplicate case ID {case_id!r} on lines {', '.join(map(str, lines))}; list each case once")
    for case_id in line_of:
        problems += _id_format_problems(case_id, known, where=f"line {line_of[case_id][0]}")
    if problems:
        raise DataValidationError.from_problems(f"Labelled list {path} is invalid", problems)
    return ids


def _id_format_problems(case_id: str, known: set[str] | None, where: str) -> list[str]:
    """Problems with how an ID is written (file ending, channel suffix, whitespace)."""
    if any(ch.isspace() for ch in case_id):
        return [f"case ID {case_id!r} ({where}) contains whitespace; write one bare case ID per line"]
    stem = _strip_known_ending(case_id)
    if stem is not None:
        bare = _CHANNEL_SUFFIX.match(stem)
        suggestion = bare.group("base") if bare else stem
        return [
            f"case ID {case_id!r} ({where}) includes a file ending; write bare case IDs "
            f"(e.g. {suggestion!r}, without channel suffix or file ending)"
        ]
    if known is not None and case_id not in known:
        m = _CHANNEL_SUFFIX.match(case_id)
        if m and m.group("base") in known:
            return [
                f"case ID {case_id!r} ({where}) includes the channel suffix _{m.group('channel')}; write bare "
                f"case IDs (e.g. {m.group('base')!r})"
            ]
    return []


def sample_labeled_ids(case_ids: list[str], fraction: float, seed: int) -> list[str]:
    """Reproducibly pick ``max(1, round(fraction * n))`` labelled cases for a label-budget simulation.

    Sampling is done on the sorted, de-duplicated IDs so the result does not depend on directory-listing order.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or math.isnan(fraction):
        raise DataValidationError(f"Labelled fraction must be a number in (0, 1], got {fraction!r}.")
    if not 0.0 < float(fraction) <= 1.0:
        raise DataValidationError(
            f"Labelled fraction must be in (0, 1], got {fraction!r} (e.g. 0.1 labels 10% of the imagesTr cases)."
        )
    ids = sorted(set(case_ids))
    if not ids:
        raise DataValidationError("Cannot sample labelled cases: no case IDs given (is imagesTr empty?).")
    count = max(1, min(len(ids), round(float(fraction) * len(ids))))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(ids), size=count, replace=False)
    return sorted(ids[i] for i in chosen)


def write_labeled_list(ids: Iterable[str], path: Path, header: str | None = None) -> None:
    """Write a labelled list atomically (temp file + ``os.replace``) so a crash never leaves half a list.

    ``header`` (e.g. how the list was sampled) is written as ``#`` comment lines, which ``read_labeled_list``
    ignores.
    """
    path = Path(path)
    ids = list(ids)
    bad = [i for i in ids if not isinstance(i, str) or not i or i != i.strip() or "\n" in i or i.startswith("#")]
    if bad:
        raise DataValidationError(f"Cannot write labelled list {path}: invalid case IDs {bad[:MAX_LISTED_PROBLEMS]}.")
    lines: list[str] = []
    if header:
        lines += [f"# {h}".rstrip() for h in header.splitlines()]
    lines += ids
    atomic_write_text(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Inventory
# --------------------------------------------------------------------------------------------------------------


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _load_dataset_json(raw_dir: Path) -> tuple[dict, int, str, set[int]]:
    """Parse dataset.json and return (content, number of channels, file ending, allowed label values)."""
    dj_path = raw_dir / "dataset.json"
    if not raw_dir.is_dir():
        raise DataValidationError(f"Dataset folder {raw_dir} does not exist; pass the nnU-Net raw dataset folder.")
    if not dj_path.is_file():
        raise DataValidationError(
            f"{dj_path} is missing. Every nnU-Net v2 raw dataset needs a dataset.json with channel_names, "
            "labels and file_ending."
        )
    try:
        dj = json.loads(dj_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataValidationError(f"{dj_path} is not valid JSON ({e}); fix the syntax.") from e
    if not isinstance(dj, dict):
        raise DataValidationError(f"{dj_path} must contain a JSON object, got {type(dj).__name__}.")

    problems: list[str] = []
    channel_names = dj.get("channel_names")
    num_channels = 0
    if channel_names is None:
        hint = (
            " (found 'modality': this is an nnU-Net v1 file; rename it to 'channel_names')" if "modality" in dj else ""
        )
        problems.append(f'{dj_path} has no \'channel_names\'{hint}; add e.g. {{"0": "CT"}}')
    elif not isinstance(channel_names, dict) or not channel_names:
        problems.append(f'{dj_path}: \'channel_names\' must be a non-empty object like {{"0": "CT"}}')
    else:
        num_channels = len(channel_names)
        expected = {str(i) for i in range(num_channels)}
        if set(map(str, channel_names)) != expected:
            problems.append(
                f"{dj_path}: 'channel_names' keys must be '0'..'{num_channels - 1}', got {sorted(channel_names)}"
            )

    labels = dj.get("labels")
    allowed: set[int] = set()
    if labels is None:
        problems.append(f'{dj_path} has no \'labels\'; add e.g. {{"background": 0, "tumor": 1}}')
    elif not isinstance(labels, dict) or not labels:
        problems.append(f"{dj_path}: 'labels' must be a non-empty object mapping names to integers")
    else:
        for name, value in labels.items():
            # Region-based datasets map a region name to a list of label values.
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    problems.append(f"{dj_path}: label {name!r} has value {v!r}; label values must be integers >= 0")
                else:
                    allowed.add(v)
        if not problems:
            problems += _label_numbering_problems(dj_path, labels)

    file_ending = dj.get("file_ending")
    if file_ending is None:
        problems.append(f"{dj_path} has no 'file_ending'; add e.g. \".nii.gz\"")
    elif not isinstance(file_ending, str) or not file_ending.startswith(".") or len(file_ending) < 2:
        problems.append(f"{dj_path}: 'file_ending' must be a string like \".nii.gz\", got {file_ending!r}")

    if problems:
        raise DataValidationError.from_problems("dataset.json is invalid", problems)
    return dj, num_channels, file_ending, allowed


def _label_numbering_problems(dj_path: Path, labels: Mapping[str, Any]) -> list[str]:
    """Label values nnU-Net cannot train with, although each is a valid integer.

    nnU-Net needs the values 0, 1, 2, ... without gaps, and an ``ignore`` label (if any) just above them: it sizes its
    outputs by the number of labels, so a gap passes planning and preprocessing and only training crashes
    (``index 5 is out of bounds``). Checked here, before hours of preprocessing.
    """
    names: dict[int, list[str]] = {}
    for name, value in labels.items():
        if name != "ignore":
            for v in value if isinstance(value, (list, tuple)) else [value]:
                names.setdefault(int(v), []).append(name)
    ignore = labels.get("ignore")
    if 0 not in names:
        return [f"{dj_path}: 'labels' has no value 0; nnU-Net needs the background as 0: add \"background\": 0"]
    values = sorted(names)
    problems: list[str] = []
    if values != list(range(len(values))):
        missing = sorted(set(range(values[-1])) - set(values))
        renumber = ", ".join(
            f"{'/'.join(repr(n) for n in names[v])}: {v} -> {i}" for i, v in enumerate(values) if v != i
        )
        declared = ", ".join(f"{'/'.join(repr(n) for n in names[v])}: {v}" for v in values)
        problems.append(
            f"{dj_path}: label values must be consecutive, 0, 1, 2, ... (nnU-Net needs it: with a gap, training "
            f"crashes with 'index {values[-1]} is out of bounds'), but 'labels' declares {declared}, which skips "
            f"{', '.join(map(str, missing))}; renumber ({renumber}) in dataset.json and in every label file "
            "(labelsTr/, and the reference labels you evaluate against)"
        )
    if isinstance(ignore, int) and not isinstance(ignore, bool) and ignore != len(values):
        problems.append(
            f"{dj_path}: the 'ignore' label has value {ignore}, but nnU-Net needs it to be the highest value, just "
            f'above the others ({len(values)} here); set "ignore": {len(values)} and renumber it in the label files'
        )
    return problems


def _visible_files(folder: Path) -> list[Path]:
    """Non-hidden files of a folder (hidden files such as .DS_Store are not data), dangling symbolic links included.

    A dangling link is not a file, but leaving it out would drop its case (or channel, or label) without a word;
    ``_dangling_link_problem`` reports it instead.
    """
    with os.scandir(folder) as it:
        return sorted(
            Path(e.path)
            for e in it
            if not e.name.startswith(".") and (e.is_file() or (e.is_symlink() and not os.path.exists(e.path)))
        )


def _dangling_link_problem(path: Path, raw_dir: Path, what: str) -> str | None:
    """Why ``path`` cannot be used if it is a symbolic link that leads nowhere (None for an existing file)."""
    if os.path.exists(path):
        return None
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return (
        f"{_rel(path, raw_dir)} is a symbolic link to {target}, which does not exist (a dangling link: moved or "
        f"unmounted data?), so this {what} cannot be read; restore its target or replace the link by the file"
    )


def _discover_cases(
    folder: Path, raw_dir: Path, num_channels: int, file_ending: str, problems: list[str]
) -> dict[str, tuple[Path, ...]]:
    """Group channel files of ``folder`` into cases; report bad names and missing or extra channels."""
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(file_ending) + r"$")
    channels: dict[str, dict[int, Path]] = {}
    for f in _visible_files(folder):
        m = pattern.match(f.name)
        if m is None:
            problems.append(
                f"{_rel(f, raw_dir)} does not match the nnU-Net naming CASE_XXXX{file_ending} (e.g. "
                f"case_001_0000{file_ending}, XXXX = 4-digit channel index, file_ending from dataset.json); "
                "rename it or move it out of the folder"
            )
            continue
        if problem := _dangling_link_problem(f, raw_dir, "image"):
            problems.append(problem)  # the case is kept, so that no misleading follow-up error names it
        channels.setdefault(m.group("case"), {})[int(m.group("channel"))] = f

    span = "_0000" if num_channels == 1 else f"_0000.._{num_channels - 1:04d}"
    cases: dict[str, tuple[Path, ...]] = {}
    for case_id, chans in sorted(channels.items()):
        missing = [i for i in range(num_channels) if i not in chans]
        extra = sorted(i for i in chans if i >= num_channels)
        for i in missing:
            problems.append(
                f"case {case_id!r}: channel file {_rel(folder / f'{case_id}_{i:04d}{file_ending}', raw_dir)} is "
                f"missing (dataset.json declares {num_channels} channel(s), so every case needs {span}); add it or "
                "remove the case"
            )
        for i in extra:
            problems.append(
                f"case {case_id!r}: unexpected channel file {_rel(chans[i], raw_dir)} (dataset.json declares "
                f"{num_channels} channel(s): {span}); remove it or add the channel to "
                "channel_names"
            )
        if not missing and not extra:
            cases[case_id] = tuple(chans[i] for i in range(num_channels))
    return cases


def build_inventory(
    raw_dir: Path,
    labeled_ids: list[str] | None = None,
    allow_empty_unlabeled: bool = False,
    check_contents: bool = True,
    progress: bool = True,
) -> DatasetInventory:
    """Find and validate the labelled and unlabelled cases of an nnU-Net v2 raw dataset.

    ``labeled_ids`` None: every imagesTr case is labelled and the unlabelled pool is ``imagesUnlabeled/``.
    ``labeled_ids`` given (label-budget simulation): only those imagesTr cases are labelled; the other imagesTr
    cases join the unlabelled pool and their label files are never opened. Raises ``DataValidationError``
    listing every problem found.
    """
    raw_dir = Path(raw_dir)
    dataset_json, num_channels, file_ending, allowed_labels = _load_dataset_json(raw_dir)
    images_tr = raw_dir / "imagesTr"
    labels_tr = raw_dir / "labelsTr"
    images_unl = raw_dir / UNLABELED_DIR
    if not images_tr.is_dir():
        raise DataValidationError(
            f"{images_tr} does not exist; an nnU-Net v2 raw dataset keeps its training images in imagesTr/."
        )

    problems: list[str] = []
    tr_cases = _discover_cases(images_tr, raw_dir, num_channels, file_ending, problems)
    unl_cases: dict[str, tuple[Path, ...]] = {}
    if images_unl.is_dir():
        unl_cases = _discover_cases(images_unl, raw_dir, num_channels, file_ending, problems)
    # IDs seen at all (also cases with channel problems) so that follow-up errors are not misleading.
    tr_all = tr_cases.keys() | _case_ids_in(images_tr, file_ending)
    unl_all = unl_cases.keys() | (_case_ids_in(images_unl, file_ending) if images_unl.is_dir() else set())

    label_names: set[str] = set()
    if labels_tr.is_dir():
        label_names = {f.name for f in _visible_files(labels_tr)}
        for name in sorted(label_names):
            if name.endswith(file_ending) and name[: -len(file_ending)] not in tr_all:
                case_id = name[: -len(file_ending)]
                where = f" (it is in {UNLABELED_DIR}/, which must not have labels)" if case_id in unl_all else ""
                problems.append(
                    f"labelsTr/{name} has no image in imagesTr (expected imagesTr/{case_id}_0000{file_ending})"
                    f"{where}; add the image or remove the label"
                )

    for case_id in sorted(tr_all & unl_all):
        problems.append(
            f"case ID {case_id!r} is both in imagesTr/ and {UNLABELED_DIR}/ (e.g. {UNLABELED_DIR}/{case_id}_0000"
            f"{file_ending}); case IDs must be unique, so rename or remove one of them"
        )

    if labeled_ids is None:
        labeled_set = set(tr_all)
        if not tr_all:
            problems.append(
                f"imagesTr/ contains no images named CASE_XXXX{file_ending}; at least one labelled case is needed"
            )
    else:
        labeled_set = _check_labeled_ids(labeled_ids, tr_all, unl_all, images_tr, problems)

    labeled: list[Case] = []
    unlabeled: list[Case] = []
    for case_id, files in tr_cases.items():
        if case_id in labeled_set:
            label_name = case_id + file_ending
            if label_name not in label_names:
                problems.append(
                    f"labelled case {case_id!r} has no label file labelsTr/{label_name}; add it"
                    + (
                        ", or leave the case out of the labelled list"
                        if labeled_ids is not None
                        else f", or move its images to {UNLABELED_DIR}/ (or use a labelled list)"
                    )
                )
                continue
            if problem := _dangling_link_problem(labels_tr / label_name, raw_dir, "label"):
                problems.append(problem)  # only labels of labelled cases: the others are never used
                continue
            labeled.append(Case(case_id, files, labels_tr / label_name))
        else:
            # Budget simulation: the label may exist but is deliberately not referenced.
            unlabeled.append(Case(case_id, files, None))
    unlabeled += [Case(case_id, files, None) for case_id, files in unl_cases.items() if case_id not in tr_all]
    unlabeled.sort(key=lambda c: c.case_id)

    if not unlabeled and not unl_all and not (tr_all - labeled_set) and not allow_empty_unlabeled:
        problems.append(
            "there are no unlabelled images, but modes ssl/filtermatch need them: put them in "
            f"{raw_dir / UNLABELED_DIR}/ (named like imagesTr), or pass a labelled list so that the remaining "
            "imagesTr cases count as unlabelled; use mode supervised to train on labelled cases only"
        )

    if problems:
        raise DataValidationError.from_problems(f"Dataset {raw_dir} is not valid", problems)

    inventory = DatasetInventory(
        raw_dir=raw_dir,
        dataset_json=dataset_json,
        labeled=labeled,
        unlabeled=unlabeled,
        num_channels=num_channels,
        file_ending=file_ending,
    )
    if check_contents:
        _check_contents(inventory, allowed_labels, progress)
    return inventory


def _case_ids_in(folder: Path, file_ending: str) -> set[str]:
    pattern = re.compile(r"^(?P<case>.+)_\d{4}" + re.escape(file_ending) + r"$")
    return {m.group("case") for f in _visible_files(folder) if (m := pattern.match(f.name))}


def _check_labeled_ids(
    labeled_ids: list[str], tr_all: set[str], unl_all: set[str], images_tr: Path, problems: list[str]
) -> set[str]:
    """Validate a labelled list against imagesTr and return it as a set."""
    if isinstance(labeled_ids, str):
        raise TypeError("labeled_ids must be a list of case IDs, not a string (use read_labeled_list for a file)")
    if not labeled_ids:
        problems.append("the labelled list is empty: at least one labelled case is needed")
        return set()
    dups = sorted(i for i, n in Counter(labeled_ids).items() if n > 1)
    if dups:
        problems.append(f"the labelled list has duplicate case IDs {dups}; list each case once")
    unknown = sorted(set(labeled_ids) - tr_all)
    if unknown:
        hints = []
        for case_id in unknown:
            hint = _id_format_problems(case_id, tr_all, where="labelled list")
            if hint:
                hints += hint
            elif case_id in unl_all:
                hints.append(
                    f"case ID {case_id!r} is in {UNLABELED_DIR}/; labelled cases must be in imagesTr/ with a "
                    "label in labelsTr/"
                )
        shown = unknown[:MAX_LISTED_PROBLEMS]
        more = f" (and {len(unknown) - len(shown)} more)" if len(unknown) > len(shown) else ""
        problems.append(
            f"{len(unknown)} labelled case ID(s) not found in {images_tr}: {shown}{more}; "
            "write bare case IDs (no _0000 suffix, no file ending) of cases that have images in imagesTr/"
        )
        problems += hints
    return set(labeled_ids) & tr_all


# --------------------------------------------------------------------------------------------------------------
# Content checks
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    components: int = 1  # values per voxel; nnU-Net wants 1 (one file per channel)
    floating: bool = False  # only floating-point files can hold NaN or inf

    @property
    def dim(self) -> int:
        return len(self.size)


def _geometry_of(obj: Any) -> _Geometry:
    """Geometry of a SimpleITK ImageFileReader (after ReadImageInformation) or Image."""
    import SimpleITK as sitk

    components = obj.GetNumberOfComponents() if hasattr(obj, "GetNumberOfComponents") else None
    if components is None:
        components = obj.GetNumberOfComponentsPerPixel()
    floating = obj.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64, sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)
    return _Geometry(
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


def _geometry_mismatch(a: _Geometry, b: _Geometry, check_size: bool = True) -> list[str]:
    """Human-readable differences between two geometries (empty when they agree within tolerance)."""
    if a.dim != b.dim:
        return [f"dimensionality {a.dim}D vs {b.dim}D"]
    out = []
    if check_size and a.size != b.size:
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


def _read_header(path: Path) -> _Geometry:
    """Read only the image header (cheap) with SimpleITK; raises RuntimeError on unreadable files."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return _geometry_of(reader)


def _nifti_truncation_problem(path: Path) -> str | None:
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


def _header_problem(path: Path, root: Path, file_ending: str) -> tuple[_Geometry | None, str | None]:
    """The geometry of a usable image file, or None and why it is not (unreadable, not 2D/3D, vector, truncated)."""
    try:
        g = _read_header(path)
    except RuntimeError as e:
        return None, (
            f"{_rel(path, root)} cannot be read (corrupt, truncated or not a {file_ending} image): {_first_line(e)}; "
            "re-export or replace the file"
        )
    if g.dim not in (2, 3):
        return None, (
            f"{_rel(path, root)} is {g.dim}D (size {g.size}); nnU-Net needs 2D or 3D images with one file per "
            "channel: split 4D/multi-channel volumes into _0000, _0001, ... files"
        )
    if g.components != 1:
        return None, (
            f"{_rel(path, root)} has {g.components} values per voxel (a vector/RGB image); nnU-Net needs one file per "
            f"channel: split it into _0000, _0001, ... files and list {g.components} channels in dataset.json "
            "'channel_names'"
        )
    truncated = _nifti_truncation_problem(path)
    if truncated:
        return None, f"{_rel(path, root)} {truncated}; re-export or replace the file"
    return g, None


def _voxel_problem(path: Path, root: Path) -> str | None:
    """NaN/inf voxels (nnU-Net's reader would silently turn them into 0) or a file that fails a full read."""
    problems: list[str] = []
    nan, inf = _count_nonfinite(path, problems, root)
    if nan or inf:
        problems.append(
            f"{_rel(path, root)} contains {nan} NaN and {inf} infinite voxel(s), which nnU-Net's reader would silently "
            "turn into 0; replace them (e.g. with the image minimum) or remove the case"
        )
    return "; ".join(problems) or None


def check_image_files(files: Iterable[Path], root: Path, file_ending: str) -> list[str]:
    """What makes these image files unusable (the checks prepare runs), for inputs that bypass prepare (predict).

    Headers and gzip trailers only, plus a full read of floating-point files, which alone can hold NaN/inf.
    """
    problems: list[str] = []
    for f in files:
        g, problem = _header_problem(Path(f), root, file_ending)
        if g is None:
            problems.append(str(problem))
        elif g.floating and (problem := _voxel_problem(Path(f), root)):
            problems.append(problem)
    return problems


def _check_contents(inv: DatasetInventory, allowed_labels: set[int], progress: bool) -> None:
    """Read headers of all images, then labelled and floating-point images and labels in full; raise once with every
    problem found."""
    import SimpleITK as sitk
    from tqdm import tqdm

    raw = inv.raw_dir
    problems: list[str] = []
    case_geom: dict[str, _Geometry] = {}
    dims: dict[int, str] = {}  # dimensionality -> first file seen with it

    all_cases = [(c, True) for c in inv.labeled] + [(c, False) for c in inv.unlabeled]
    n_files = sum(len(c.image_files) for c, _ in all_cases)
    with tqdm(total=n_files, desc="checking images", unit="file", disable=not progress) as bar:
        for case, is_labeled in all_cases:
            geoms: list[_Geometry] = []
            for f in case.image_files:
                bar.update(1)
                g, problem = _header_problem(f, raw, inv.file_ending)
                if g is None:
                    problems.append(str(problem))
                    continue
                dims.setdefault(g.dim, _rel(f, raw))
                geoms.append(g)
            if len(geoms) != len(case.image_files):
                continue
            for f, g in zip(case.image_files[1:], geoms[1:]):
                diff = _geometry_mismatch(geoms[0], g)
                if diff:
                    problems.append(
                        f"case {case.case_id!r}: channel {_rel(f, raw)} does not match {_rel(case.image_files[0], raw)}"
                        f" ({'; '.join(diff)}); all channels of a case must share size, spacing, origin, direction"
                    )
            case_geom[case.case_id] = geoms[0]
            for f, g in zip(case.image_files, geoms):
                # Labelled images are read in full anyway; unlabelled ones only when their voxel type can hold NaN/inf
                # (nnU-Net's reader would silently turn those into 0), so large integer-typed pools stay cheap.
                if not (is_labeled or g.floating):
                    continue
                problem = _voxel_problem(f, raw)
                if problem:
                    problems.append(problem)

    if len(dims) > 1:
        examples = ", ".join(f"{d}D (e.g. {name})" for d, name in sorted(dims.items()))
        problems.append(
            f"images have mixed dimensionality: {examples}; all images (labelled and unlabelled) must match"
        )

    for case in tqdm(inv.labeled, desc="checking labels", unit="file", disable=not progress):
        assert case.label_file is not None
        if case.case_id not in case_geom:
            continue  # image already reported
        img_geom = case_geom[case.case_id]
        lab = case.label_file
        try:
            label_img = sitk.ReadImage(str(lab))
        except RuntimeError as e:
            problems.append(f"{_rel(lab, raw)} cannot be read (corrupt or truncated): {_first_line(e)}; replace it")
            continue
        truncated = _nifti_truncation_problem(lab)
        if truncated:
            problems.append(f"{_rel(lab, raw)} {truncated}; replace the label file")
            continue
        lab_geom = _geometry_of(label_img)
        diff = _geometry_mismatch(img_geom, lab_geom)
        if diff:
            problems.append(
                f"label {_rel(lab, raw)} does not match image {_rel(case.image_files[0], raw)}: {'; '.join(diff)} "
                "(image vs label); the label must have the image's size, spacing, origin and direction"
            )
            continue
        if label_img.GetNumberOfComponentsPerPixel() != 1:
            problems.append(f"label {_rel(lab, raw)} has multi-component pixels; labels must be a single integer map")
            continue
        values = np.unique(sitk.GetArrayViewFromImage(label_img))
        if lab_geom.floating:
            # 1.0000001 printed as "value 1 not declared": name non-integers as such, in the file's own precision.
            fractional = values[np.isfinite(values) & (values != np.round(values))]
            if fractional.size:
                shown = ", ".join(np.format_float_positional(v, unique=True, trim="-") for v in fractional[:5])
                more = f" (and {fractional.size - 5} more distinct values)" if fractional.size > 5 else ""
                problems.append(
                    f"label {_rel(lab, raw)} contains value(s) that are not integers: {shown}{more} (stored as "
                    f"{values.dtype}); label maps hold integer label values only: round them (e.g. numpy.rint) and "
                    "save the label with an integer voxel type (e.g. uint8)"
                )
                values = values[~np.isin(values, fractional)]
            # ITK reads NaN as 0: count NaN/inf in the file itself
            nan, inf = _count_nonfinite(lab, problems, raw)
            values = np.concatenate([values, [np.nan] * bool(nan), [np.inf] * bool(inf)])
        bad = [v for v in values.tolist() if not (float(v).is_integer() and int(v) in allowed_labels)]
        if bad:
            shown = ", ".join(f"{v:g}" for v in bad[:MAX_LISTED_PROBLEMS])
            problems.append(
                f"label {_rel(lab, raw)} contains value(s) {shown} not declared in dataset.json 'labels' "
                f"(declared: {sorted(allowed_labels)}); fix the label or add the value to dataset.json"
            )

    if problems:
        raise DataValidationError.from_problems(f"Dataset {raw} has unreadable or inconsistent files", problems)


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
            f"{_rel(path, raw)} cannot be read fully (corrupt or truncated): {_first_line(e)}; re-export or replace "
            "the file"
        )
        return 0, 0


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    # SimpleITK messages start with a source location; the last line carries the actual reason.
    return lines[-1] if lines else type(e).__name__
