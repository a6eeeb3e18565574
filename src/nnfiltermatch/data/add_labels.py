"""``prepare --add-labels``: move annotated cases from the unlabelled to the labelled set without re-planning, and
record them as the next annotation round."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnfiltermatch.data.dataset_json import load_dataset_json
from nnfiltermatch.data.install import dataset_lock, recover_install
from nnfiltermatch.data.inventory import Case, DatasetInventory, check_case_files, dangling_link_problem
from nnfiltermatch.data.labeled_lists import write_labeled_list
from nnfiltermatch.data.layout import (
    LABELED_LIST_NAME,
    MANIFEST_NAME,
    dataset_name_from_id,
    env_folder,
    preprocessed_root,
    unlabeled_folder,
)
from nnfiltermatch.data.manifest import ADDED_LABELS_KEY, FILE_RECORDS_KEY, current_digest
from nnfiltermatch.data.preprocessing import preprocess_labeled_case
from nnfiltermatch.data.rounds import read_query_export, record_added_labels
from nnfiltermatch.data.workers import run_parallel
from nnfiltermatch.errors import DataValidationError, PreparationError
from nnfiltermatch.files import atomic_write_text
from nnfiltermatch.locks import LockError

STAGING_NAME = ".add_labels.partial"


@dataclass
class AddedLabels:
    """What ``add_labels`` did, for the CLI to report."""

    cases: list[str]
    moved_from_unlabeled_folder: list[str]  # images moved from imagesUnlabeled/ to imagesTr/
    already_in_images_tr: list[str]  # budget simulation: only the lists change
    configurations: list[str]
    stale_configurations: list[str]
    messages: list[str]
    round: dict[str, Any] | None = None  # the rounds.json entry recorded for these labels


def _atomic_copy(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk = fa.read(1 << 20)
            if chunk != fb.read(1 << 20):
                return False
            if not chunk:
                return True


def add_labels(
    dataset: str | int,
    labels_dir: Path,
    configurations: list[str] | None = None,
    query_export: Path | None = None,
) -> AddedLabels:
    """Move annotated cases from the unlabelled to the labelled set without re-planning.

    ``labels_dir`` holds ``CASE<file_ending>`` label files of unlabelled cases (e.g. the top of a ``query``
    ranking, annotated). Everything is validated first (the images' and labels' geometry, label values, as prepare
    checks them); then the cases are preprocessed with the existing plans into a staging folder, and only then are
    files moved: the image from imagesUnlabeled/ to imagesTr/ (budget-simulation cases are already there), the label
    into labelsTr/ and gt_segmentations/, the preprocessed case from the unlabelled to the labelled folder. The
    manifest is written last, with the digest ``prepare`` will compute for the new state, so a later ``prepare``
    (with the original labelled list, too) does not re-plan. ``configurations`` None: every preprocessed one;
    others are marked stale (removed from the manifest) and preprocessed again by the next ``prepare -c``.
    The check of the manifest and all the moves happen under the dataset's lock (as in ``prepare``).

    Then the cases are recorded as the next annotation round in rounds.json (see :mod:`nnfiltermatch.data.rounds`),
    with the settings of the query that chose them: those of ``query_export``, or of the export folder around
    ``labels_dir`` (DIR/labelsTr of ``query --export DIR``) when there is one.
    """
    dataset_name = dataset_name_from_id(dataset)
    out = preprocessed_root(dataset_name)
    if not out.is_dir():
        _require_manifest(out / MANIFEST_NAME, dataset_name)
    query, _ = read_query_export(Path(labels_dir), query_export)
    with dataset_lock(out, f"prepare {dataset_name} --add-labels {labels_dir}"):
        recover_install(out)
        before = json.loads((out / MANIFEST_NAME).read_text())["labeled_ids"] if (out / MANIFEST_NAME).is_file() else []
        added = _add_labels_locked(dataset_name, out, Path(labels_dir), configurations)
        try:
            added.round, notes = record_added_labels(dataset_name, before, added.cases, Path(labels_dir), query)
            added.messages.extend(notes)
        except (OSError, LockError, ValueError) as exc:  # the labels are in; say what is missing, do not fail
            added.messages.append(f"the labels were added but rounds.json was not updated: {exc}")
        return added


def _require_manifest(manifest_file: Path, dataset_name: str) -> None:
    if not manifest_file.is_file():
        raise PreparationError(
            f"{manifest_file} not found: prepare the dataset first (`nnfiltermatch prepare -d {dataset_name}`), "
            "train, query, annotate, then add the labels"
        )


def _add_labels_locked(dataset_name: str, out: Path, labels_dir: Path, configurations: list[str] | None) -> AddedLabels:
    raw_dir = env_folder("nnUNet_raw") / dataset_name
    manifest_file = out / MANIFEST_NAME
    _require_manifest(manifest_file, dataset_name)
    manifest: dict[str, Any] = json.loads(manifest_file.read_text())
    plans_name = manifest["plans_name"]
    dataset_json_raw, num_channels, file_ending, allowed_labels = load_dataset_json(raw_dir)

    labels_dir = Path(labels_dir)
    if not labels_dir.is_dir():
        raise PreparationError(f"--add-labels {labels_dir}: not a folder; give the folder of CASE{file_ending} labels")
    files = sorted(p for p in labels_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    labels = {p.name[: -len(file_ending)]: p for p in files if p.name.endswith(file_ending)}
    problems = [
        f"{p} does not end in {file_ending} (dataset.json file_ending)"
        for p in files
        if p.stem and p not in labels.values()
    ]
    # A dangling link is not a file either, but skipping it silently would drop a label the user means to add.
    dangling = [p for p in sorted(labels_dir.iterdir()) if not p.name.startswith(".") and not p.exists()]
    problems += [str(dangling_link_problem(p, labels_dir, "label")) for p in dangling]
    if not labels and not dangling:
        raise PreparationError(f"--add-labels {labels_dir}: no CASE{file_ending} label files in it")

    labeled, unlabeled = set(manifest["labeled_ids"]), set(manifest["unlabeled_ids"])
    images: dict[str, list[Path]] = {}
    from_unlabeled: list[str] = []
    for case_id in sorted(labels):
        if case_id in labeled:
            problems.append(f"{labels[case_id].name}: case {case_id!r} is already labelled")
            continue
        if case_id not in unlabeled:
            base = case_id[:-5] if len(case_id) > 5 and case_id[-5] == "_" and case_id[-4:].isdigit() else None
            hint = (
                f" (label files are named CASE{file_ending}, without the channel suffix: {base}{file_ending})"
                if base in unlabeled
                else ""
            )
            problems.append(f"{labels[case_id].name}: {case_id!r} is not an unlabelled case of {dataset_name}{hint}")
            continue
        names = [f"{case_id}_{i:04d}{file_ending}" for i in range(num_channels)]
        in_unl = [raw_dir / "imagesUnlabeled" / n for n in names]
        in_tr = [raw_dir / "imagesTr" / n for n in names]
        if all(p.is_file() for p in in_unl):
            images[case_id] = in_unl
            from_unlabeled.append(case_id)
        elif all(p.is_file() for p in in_tr):
            images[case_id] = in_tr
        else:
            problems.append(f"case {case_id!r}: no images {names[0]} ... in imagesUnlabeled/ or imagesTr/ of {raw_dir}")
    if problems:
        raise DataValidationError.from_problems(f"--add-labels {labels_dir}", problems)

    # The raw inputs must still be what the manifest describes, or the new digest would hide other changes.
    old_digest, _, current_records = current_digest(
        raw_dir, sorted(labeled), plans_name, manifest.get(FILE_RECORDS_KEY)
    )
    if old_digest != manifest.get("inputs_digest"):
        raise PreparationError(
            f"{raw_dir} changed since the last prepare (files added, removed or modified): run `nnfiltermatch "
            f"prepare -d {dataset_name}` with your usual options first, then add the labels"
        )
    cases = [Case(c, tuple(images[c]), labels[c]) for c in sorted(labels)]
    check = DatasetInventory(raw_dir, dataset_json_raw, cases, [], num_channels, file_ending)
    check_case_files(check, allowed_labels, progress=False)  # geometry, label values, NaNs, truncation

    prepared_configs: dict[str, dict[str, Any]] = manifest.get("configurations") or {}
    chosen = list(prepared_configs) if configurations is None else list(configurations)
    unknown = [c for c in chosen if c not in prepared_configs]
    if unknown:
        raise PreparationError(
            f"-c {' '.join(unknown)}: not preprocessed (preprocessed: {', '.join(prepared_configs) or 'none'}); run "
            f"`nnfiltermatch prepare -d {dataset_name} -c {' '.join(unknown)}` first"
        )
    by_identifier: dict[str, str] = {}
    for name in chosen:
        by_identifier.setdefault(prepared_configs[name]["data_identifier"], name)
    stale = [n for n, v in prepared_configs.items() if v["data_identifier"] not in by_identifier]

    plans = json.loads((out / f"{plans_name}.json").read_text())
    dataset_json = json.loads((out / "dataset.json").read_text())
    staging = out / STAGING_NAME
    if staging.exists():
        shutil.rmtree(staging)
    messages: list[str] = []
    try:
        for data_identifier, configuration in by_identifier.items():
            (staging / data_identifier).mkdir(parents=True)
            jobs = [(str(staging / data_identifier / c.case_id), c, plans, configuration, dataset_json) for c in cases]
            run_parallel(preprocess_labeled_case, jobs, 1, f"{configuration}: preprocessing newly labelled cases")

        # commit: raw files, preprocessed files, ground truth, then the manifest last
        for case in cases:
            assert case.label_file is not None
            target = raw_dir / "labelsTr" / f"{case.case_id}{file_ending}"
            target.parent.mkdir(exist_ok=True)
            if target.is_file() and not _same_bytes(target, case.label_file):
                backup = target.with_name(target.name + ".before-add-labels")
                os.replace(target, backup)
                messages.append(f"labelsTr/{target.name} existed with other content: kept as {backup.name}")
            if not target.is_file():
                _atomic_copy(case.label_file, target)
            if case.case_id in from_unlabeled:
                for image in case.image_files:
                    _atomic_copy(image, raw_dir / "imagesTr" / image.name)
                for image in case.image_files:
                    image.unlink()
        for data_identifier in by_identifier:
            for produced in sorted((staging / data_identifier).iterdir()):
                os.replace(produced, out / data_identifier / produced.name)
        for value in {v["data_identifier"] for v in prepared_configs.values()}:
            for case in cases:
                for suffix in (".b2nd", ".pkl"):
                    (unlabeled_folder(dataset_name, value) / f"{case.case_id}{suffix}").unlink(missing_ok=True)
        gt = out / "gt_segmentations"
        gt.mkdir(exist_ok=True)
        for case in cases:
            assert case.label_file is not None
            _atomic_copy(case.label_file, gt / f"{case.case_id}{file_ending}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    splits = out / "splits_final.json"
    if splits.exists():
        splits.unlink()
        messages.append(
            f"removed {splits.name}: nnU-Net makes a new 5-fold split of the {len(labeled) + len(cases)} labelled "
            "cases at the next training of a fold (fold models trained before used the old split)"
        )
    for name in stale:
        del prepared_configs[name]
    if stale:
        messages.append(
            f"configuration(s) {', '.join(stale)} not updated: run `nnfiltermatch prepare -d {dataset_name} -c "
            f"{' '.join(stale)}` before training them"
        )
    new_labeled = sorted(labeled | set(labels))
    new_digest, inventory, file_records = current_digest(raw_dir, new_labeled, plans_name, current_records)
    added_entry = {
        "cases": sorted(labels),
        "labels_dir": str(labels_dir.resolve()),
        "moved_from_imagesUnlabeled": sorted(from_unlabeled),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "previous_inputs_digest": manifest.get("inputs_digest"),
    }
    manifest.update(
        {
            "inputs_digest": new_digest,
            FILE_RECORDS_KEY: file_records,
            "labeled_ids": inventory.labeled_ids,
            "unlabeled_ids": inventory.unlabeled_ids,
            "configurations": prepared_configs,
            ADDED_LABELS_KEY: [*(manifest.get(ADDED_LABELS_KEY) or []), added_entry],
        }
    )
    header = f"labelled cases of {dataset_name} used by nnfiltermatch prepare (incl. prepare --add-labels)"
    write_labeled_list(inventory.labeled_ids, out / LABELED_LIST_NAME, header=header)
    atomic_write_text(manifest_file, json.dumps(manifest, indent=2))
    if not inventory.unlabeled_ids:
        messages.append("no unlabelled cases are left: only --mode supervised can train on this dataset now")
    return AddedLabels(
        cases=sorted(labels),
        moved_from_unlabeled_folder=sorted(from_unlabeled),
        already_in_images_tr=sorted(set(labels) - set(from_unlabeled)),
        configurations=list(by_identifier.values()),
        stale_configurations=stale,
        messages=messages,
    )
