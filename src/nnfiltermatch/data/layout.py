"""Where nnU-Net keeps a dataset, and the names of nnfiltermatch's files in its preprocessed folder.

nnU-Net's three folders come from its environment variables (nnUNet_raw, nnUNet_preprocessed, nnUNet_results); a
dataset is found in them by its ID, as nnU-Net's ``-d`` finds it. The unlabelled images are preprocessed into
``<preprocessed>/<dataset>/unlabeled/<data_identifier>/``, beside nnU-Net's own folder for the labelled ones.
"""

from __future__ import annotations

import os
from pathlib import Path

from nnfiltermatch.errors import PreparationError

MANIFEST_NAME = "nnfiltermatch_prepare.json"
LABELED_LIST_NAME = "nnfiltermatch_labeled_cases.txt"
FINGERPRINT_NAME = "dataset_fingerprint.json"
UNLABELED_DIRNAME = "unlabeled"
PARTIAL_SUFFIX = ".partial"  # preprocessed data being written


def env_folder(name: str) -> Path:
    """One of nnU-Net's folders, with a clear error when its environment variable is not set."""
    value = os.environ.get(name)
    if not value:
        raise PreparationError(
            f"environment variable {name} is not set. nnfiltermatch uses nnU-Net's folders: export nnUNet_raw, "
            "nnUNet_preprocessed and nnUNet_results (see nnU-Net's documentation/setting_up_paths.md)."
        )
    return Path(value)


def dataset_name_from_id(dataset: str | int) -> str:
    """Resolve ``4`` / ``'004'`` / ``'Dataset004_Hippocampus'`` to the raw folder name, like nnU-Net does."""
    text = str(dataset)
    if text.startswith("Dataset"):
        return text
    try:
        number = int(text)
    except ValueError as exc:
        raise PreparationError(
            f"-d {text!r}: give a dataset ID (e.g. 4) or a name like Dataset004_Hippocampus"
        ) from exc
    prefix = f"Dataset{number:03d}_"
    candidates: set[str] = set()
    for env in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        folder = os.environ.get(env)
        if folder and Path(folder).is_dir():
            candidates.update(p.name for p in Path(folder).iterdir() if p.name.startswith(prefix) and p.is_dir())
    if len(candidates) != 1:
        raise PreparationError(_dataset_lookup_error(number, prefix, candidates))
    return candidates.pop()


def _dataset_lookup_error(number: int, prefix: str, candidates: set[str]) -> str:
    """Why ``dataset_name_from_id`` found no single folder, naming unset nnU-Net variables as such (not "=None")."""
    names = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
    unset = [e for e in names if not os.environ.get(e)]
    how = "see nnU-Net's documentation/setting_up_paths.md"
    if len(unset) == len(names):
        return (
            f"dataset ID {number}: cannot look for {prefix}*: none of the environment variables nnUNet_raw, "
            "nnUNet_preprocessed, nnUNet_results is set. nnfiltermatch uses nnU-Net's folders: export all three, e.g. "
            "`export nnUNet_raw=/data/nnUNet_raw nnUNet_preprocessed=/data/nnUNet_preprocessed "
            f"nnUNet_results=/data/nnUNet_results` ({how})."
        )
    places = []
    for e in names:
        value = os.environ.get(e)
        places.append(
            f"{e} (not set)" if not value else f"{e}={value}" + ("" if Path(value).is_dir() else " (missing)")
        )
    found = f"found {sorted(candidates)}" if candidates else "found none"
    message = f"dataset ID {number}: expected exactly one folder {prefix}* ({found}; looked in {', '.join(places)})"
    if unset:
        message += (
            f"; {' and '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set: export each to its folder, e.g. "
            f"`export {unset[0]}=/data/{unset[0]}` ({how})"
        )
    return message


def preprocessed_root(dataset_name: str) -> Path:
    """The dataset's folder under nnUNet_preprocessed: nnU-Net's plans and data, and nnfiltermatch's files."""
    return env_folder("nnUNet_preprocessed") / dataset_name


def unlabeled_folder(dataset_name: str, data_identifier: str) -> Path:
    """Where the unlabelled images of one plan configuration live, beside nnU-Net's own folder for the labelled."""
    return preprocessed_root(dataset_name) / UNLABELED_DIRNAME / data_identifier
