"""dataset.json of an nnU-Net v2 raw dataset: channels, labels and file ending, checked before anything is read
with them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nnfiltermatch.errors import DataValidationError


def load_dataset_json(raw_dir: Path) -> tuple[dict, int, str, set[int]]:
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
