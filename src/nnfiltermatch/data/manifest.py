"""The manifest: what ``prepare`` installed (plans, labelled and unlabelled cases, configurations) and the digest
of the inputs it was made from, read back by train, query and add-labels.

The digest describes every input file by its size and SHA-256, never by its timestamp, so a copied dataset is not
taken for a changed one; the per-file records kept beside it let the next prepare hash only the files whose size
or mtime changed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnfiltermatch.data.install import recover_interrupted_install
from nnfiltermatch.data.inventory import DatasetInventory, build_inventory
from nnfiltermatch.data.labeled_lists import read_labeled_list
from nnfiltermatch.data.layout import FINGERPRINT_NAME, LABELED_LIST_NAME, MANIFEST_NAME, preprocessed_root
from nnfiltermatch.data.planners import DEFAULT_PLANNER, PLANNERS, planner_plans_name
from nnfiltermatch.errors import PreparationError
from nnfiltermatch.files import file_sha256

ADDED_LABELS_KEY = "added_labels"  # manifest entries written by add_labels
FILE_RECORDS_KEY = "file_records"  # size, mtime and SHA-256 per input file: only changed files are re-hashed
FINGERPRINT_KEY = "fingerprint_sha256"  # manifest: the fingerprint it was planned with


@dataclass
class PreparedDataset:
    """What ``prepare`` wrote, read back by the trainer and the CLI."""

    dataset_name: str
    plans_name: str
    labeled_ids: list[str]
    unlabeled_ids: list[str]
    configurations: list[str]
    planner: str = DEFAULT_PLANNER

    @property
    def labeled_fraction(self) -> float:
        total = len(self.labeled_ids) + len(self.unlabeled_ids)
        return len(self.labeled_ids) / total if total else 1.0


def load_prepared(dataset_name: str) -> PreparedDataset:
    """The installed preparation, as its manifest describes it; an interrupted install is finished first."""
    recover_interrupted_install(dataset_name)
    manifest_file = preprocessed_root(dataset_name) / MANIFEST_NAME
    if not manifest_file.is_file():
        raise PreparationError(
            f"{manifest_file} not found: run `nnfiltermatch prepare -d {dataset_name}` before training."
        )
    manifest = json.loads(manifest_file.read_text())
    return PreparedDataset(
        dataset_name=dataset_name,
        plans_name=manifest["plans_name"],
        labeled_ids=manifest["labeled_ids"],
        unlabeled_ids=manifest["unlabeled_ids"],
        configurations=sorted(manifest.get("configurations", {})),
        planner=manifest.get("planner", DEFAULT_PLANNER),
    )


def inputs_digest(
    inventory: DatasetInventory, plans_name: str, known: dict[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """Digest of the inputs by content (size and SHA-256 per file, never timestamps), and the per-file records
    to keep in the manifest (``FILE_RECORDS_KEY``), with which the next prepare hashes only files whose size or
    mtime changed."""
    inputs = inventory.fingerprint_inputs(known)
    records = {**inputs["labeled_files"], **inputs["unlabeled_files"]}
    for key in ("labeled_files", "unlabeled_files"):
        inputs[key] = {rel: {"size": r["size"], "sha256": r["sha256"]} for rel, r in inputs[key].items()}
    payload = json.dumps({"inputs": inputs, "plans": plans_name}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest(), records


def current_digest(
    raw_dir: Path, labeled_ids: list[str], plans_name: str, known: dict[str, Any] | None = None
) -> tuple[str, DatasetInventory, dict[str, Any]]:
    """The digest ``prepare`` computes for this labelled set, its inventory and file records (images are not
    checked; only files whose size or mtime differ from ``known`` are read, to hash them)."""
    inventory = build_inventory(raw_dir, labeled_ids, allow_empty_unlabeled=True, check_contents=False, progress=False)
    digest, records = inputs_digest(inventory, plans_name, known)
    return digest, inventory, records


def check_prepared_plans(prepared: PreparedDataset, plans_name: str | None) -> None:
    """``-p`` of train must be the plans the dataset is prepared with (the manifest names one set of plans)."""
    if plans_name is None or plans_name == prepared.plans_name:
        return
    how = f"-p {plans_name}"
    try:
        how = next(f"-pl {name}" for name in PLANNERS if planner_plans_name(name) == plans_name)
    except StopIteration:
        pass
    raise PreparationError(
        f"-p {plans_name}: {prepared.dataset_name} is prepared with the plans {prepared.plans_name}, not "
        f"{plans_name}. Run `nnfiltermatch prepare -d {prepared.dataset_name} {how} -c CONFIGURATION` first (models "
        f"trained on {prepared.plans_name} keep their folders), or leave -p out to train on {prepared.plans_name}"
    )


def install_problems(out: Path, manifest: dict[str, Any], plans_name: str) -> list[str]:
    """How the installed plans, fingerprint, lists and ground truth differ from what ``manifest`` describes.

    A journalled install never leaves such a mix, but a version without the journal did (a kill in the middle of
    its renames left the old manifest over new plans and fingerprint, and no labelled list), and it must not count
    as prepared. Cheap: two small files read, one folder listed.
    """
    problems = [f"{name} is missing" for name in (f"{plans_name}.json", "dataset.json") if not (out / name).is_file()]
    labeled = list(manifest.get("labeled_ids") or [])
    fingerprint = out / FINGERPRINT_NAME
    if not fingerprint.is_file():
        problems.append(f"{FINGERPRINT_NAME} is missing")
    elif manifest.get(FINGERPRINT_KEY) and file_sha256(fingerprint) != manifest[FINGERPRINT_KEY]:
        problems.append(f"{FINGERPRINT_NAME} is not the one planned with")
    listed_file = out / LABELED_LIST_NAME
    try:
        listed = read_labeled_list(listed_file) if listed_file.is_file() else None
    except Exception:  # any unreadable list is a mismatch, reported as such
        listed = None
    if listed is None:
        problems.append(f"{LABELED_LIST_NAME} is missing or unreadable")
    elif sorted(listed) != sorted(labeled):
        problems.append(f"{LABELED_LIST_NAME} lists {len(listed)} cases, not the manifest's {len(labeled)}")
    gt = out / "gt_segmentations"
    if (out / "dataset.json").is_file() and gt.is_dir():
        ending = json.loads((out / "dataset.json").read_text()).get("file_ending", ".nii.gz")
        found = sorted(p.name[: -len(ending)] for p in gt.iterdir() if p.name.endswith(ending))
        if found != sorted(labeled):
            problems.append(f"gt_segmentations holds {len(found)} cases, not the manifest's {len(labeled)} labelled")
    elif not gt.is_dir():
        problems.append("gt_segmentations is missing")
    return problems
