"""Labelled lists: text files of bare case IDs, read strictly, sampled reproducibly and written atomically.

A labelled list names the labelled cases of a label-budget simulation; every other ``imagesTr`` case is treated as
unlabelled.
"""

from __future__ import annotations

import codecs
import math
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from nnfiltermatch.errors import MAX_LISTED_PROBLEMS, DataValidationError
from nnfiltermatch.files import atomic_write_text

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
        problems += id_format_problems(case_id, known, where=f"line {line_of[case_id][0]}")
    if problems:
        raise DataValidationError.from_problems(f"Labelled list {path} is invalid", problems)
    return ids


def id_format_problems(case_id: str, known: set[str] | None, where: str) -> list[str]:
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
