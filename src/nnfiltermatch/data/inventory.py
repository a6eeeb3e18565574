"""Discover and validate the cases of an nnU-Net v2 raw dataset before anything is trained.

Everything downstream (preprocessing, pseudo-labelling, filtering) trusts the inventory built here, so the
checks are strict and their messages name the offending file and say how to fix it. Problems are collected
and reported together so that a user can repair a dataset in one pass instead of one error at a time.

Label-budget simulation: when a labelled list is given, every other ``imagesTr`` case is treated as
unlabelled. Its label file is *never* opened (not even its header); only its presence in a directory listing
is used. This keeps the simulation honest: nothing about a hidden label can leak into training.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnfiltermatch.data.dataset_json import load_dataset_json
from nnfiltermatch.data.image_checks import (
    ImageGeometry,
    geometry_mismatch,
    header_problem,
    label_problems,
    voxel_problem,
)
from nnfiltermatch.data.labeled_lists import id_format_problems
from nnfiltermatch.errors import MAX_LISTED_PROBLEMS, DataValidationError
from nnfiltermatch.files import file_sha256, relative_posix

__all__ = [
    "Case",
    "DatasetInventory",
    "build_inventory",
    "check_case_files",
]

UNLABELED_DIR = "imagesUnlabeled"


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
                    rel = relative_posix(f, self.raw_dir)
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


def _visible_files(folder: Path) -> list[Path]:
    """Non-hidden files of a folder (hidden files such as .DS_Store are not data), dangling symbolic links included.

    A dangling link is not a file, but leaving it out would drop its case (or channel, or label) without a word;
    ``dangling_link_problem`` reports it instead.
    """
    with os.scandir(folder) as it:
        return sorted(
            Path(e.path)
            for e in it
            if not e.name.startswith(".") and (e.is_file() or (e.is_symlink() and not os.path.exists(e.path)))
        )


def dangling_link_problem(path: Path, raw_dir: Path, what: str) -> str | None:
    """Why ``path`` cannot be used if it is a symbolic link that leads nowhere (None for an existing file)."""
    if os.path.exists(path):
        return None
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return (
        f"{relative_posix(path, raw_dir)} is a symbolic link to {target}, which does not exist (a dangling link: moved "
        f"or unmounted data?), so this {what} cannot be read; restore its target or replace the link by the file"
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
                f"{relative_posix(f, raw_dir)} does not match the nnU-Net naming CASE_XXXX{file_ending} (e.g. "
                f"case_001_0000{file_ending}, XXXX = 4-digit channel index, file_ending from dataset.json); "
                "rename it or move it out of the folder"
            )
            continue
        if problem := dangling_link_problem(f, raw_dir, "image"):
            problems.append(problem)  # the case is kept, so that no misleading follow-up error names it
        channels.setdefault(m.group("case"), {})[int(m.group("channel"))] = f

    span = "_0000" if num_channels == 1 else f"_0000.._{num_channels - 1:04d}"
    cases: dict[str, tuple[Path, ...]] = {}
    for case_id, chans in sorted(channels.items()):
        missing = [i for i in range(num_channels) if i not in chans]
        extra = sorted(i for i in chans if i >= num_channels)
        for i in missing:
            missing_file = relative_posix(folder / f"{case_id}_{i:04d}{file_ending}", raw_dir)
            problems.append(
                f"case {case_id!r}: channel file {missing_file} is missing (dataset.json declares {num_channels} "
                f"channel(s), so every case needs {span}); add it or remove the case"
            )
        for i in extra:
            problems.append(
                f"case {case_id!r}: unexpected channel file {relative_posix(chans[i], raw_dir)} (dataset.json declares "
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
    dataset_json, num_channels, file_ending, allowed_labels = load_dataset_json(raw_dir)
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
            if problem := dangling_link_problem(labels_tr / label_name, raw_dir, "label"):
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
        check_case_files(inventory, allowed_labels, progress)
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
            hint = id_format_problems(case_id, tr_all, where="labelled list")
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


def check_case_files(inv: DatasetInventory, allowed_labels: set[int], progress: bool) -> None:
    """Read headers of all images, then labelled and floating-point images and labels in full; raise once with every
    problem found."""
    from tqdm import tqdm

    raw = inv.raw_dir
    problems: list[str] = []
    case_geom: dict[str, ImageGeometry] = {}
    dims: dict[int, str] = {}  # dimensionality -> first file seen with it

    all_cases = [(c, True) for c in inv.labeled] + [(c, False) for c in inv.unlabeled]
    n_files = sum(len(c.image_files) for c, _ in all_cases)
    with tqdm(total=n_files, desc="checking images", unit="file", disable=not progress) as bar:
        for case, is_labeled in all_cases:
            geoms: list[ImageGeometry] = []
            for f in case.image_files:
                bar.update(1)
                g, problem = header_problem(f, raw, inv.file_ending)
                if g is None:
                    problems.append(str(problem))
                    continue
                dims.setdefault(g.dim, relative_posix(f, raw))
                geoms.append(g)
            if len(geoms) != len(case.image_files):
                continue
            for f, g in zip(case.image_files[1:], geoms[1:]):
                diff = geometry_mismatch(geoms[0], g)
                if diff:
                    problems.append(
                        f"case {case.case_id!r}: channel {relative_posix(f, raw)} does not match "
                        f"{relative_posix(case.image_files[0], raw)} ({'; '.join(diff)}); all channels of a case must "
                        "share size, spacing, origin, direction"
                    )
            case_geom[case.case_id] = geoms[0]
            for f, g in zip(case.image_files, geoms):
                # Labelled images are read in full anyway; unlabelled ones only when their voxel type can hold NaN/inf
                # (nnU-Net's reader would silently turn those into 0), so large integer-typed pools stay cheap.
                if not (is_labeled or g.floating):
                    continue
                problem = voxel_problem(f, raw)
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
        problems += label_problems(case.label_file, case.image_files[0], case_geom[case.case_id], raw, allowed_labels)

    if problems:
        raise DataValidationError.from_problems(f"Dataset {raw} has unreadable or inconsistent files", problems)
