"""Data preparation: nnU-Net's fingerprint, planner and preprocessor, run on the labelled cases only.

The unlabelled images are preprocessed with the same plan into ``<preprocessed>/<dataset>/unlabeled/<data_id>/``,
so no blank label files and no second dataset are ever needed. Label files of unlabelled cases (budget simulation)
are never opened: every nnU-Net step below is handed an explicit list of labelled cases.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nnfiltermatch.data.install import (
    PREPARE_STAGING_NAME,
    dataset_lock,
    install_preparation,
    partial_usage,
    recover_install,
    remove_leftovers,
)
from nnfiltermatch.data.install_journal import has_journal
from nnfiltermatch.data.inventory import Case, DatasetInventory, build_inventory
from nnfiltermatch.data.labeled_lists import read_labeled_list, sample_labeled_ids, write_labeled_list
from nnfiltermatch.data.layout import (
    FINGERPRINT_NAME,
    LABELED_LIST_NAME,
    MANIFEST_NAME,
    dataset_name_from_id,
    env_folder,
    preprocessed_root,
    unlabeled_folder,
)
from nnfiltermatch.data.manifest import (
    ADDED_LABELS_KEY,
    FILE_RECORDS_KEY,
    FINGERPRINT_KEY,
    PreparedDataset,
    inputs_digest,
    install_problems,
    load_prepared,
)
from nnfiltermatch.data.planners import DEFAULT_PLANNER, add_cpu_configuration, planner_class, resolve_planner
from nnfiltermatch.data.preprocessing import preprocess_configuration
from nnfiltermatch.data.workers import workers_die_with_us
from nnfiltermatch.errors import PreparationError
from nnfiltermatch.files import atomic_write_text, disk_full_reason, file_sha256, format_size


def _nnunet_case_dict(cases: Iterable[Case]) -> dict[str, dict[str, Any]]:
    """The ``{case: {'images': [...], 'label': ...}}`` mapping nnU-Net's planning classes iterate over."""
    return {c.case_id: {"images": [str(p) for p in c.image_files], "label": str(c.label_file)} for c in cases}


def _fingerprint_and_plan(
    inventory: DatasetInventory,
    dataset_name: str,
    plans_name: str,
    num_processes: int,
    staging: Path,
    planner_name: str = DEFAULT_PLANNER,
) -> dict:
    """nnU-Net's fingerprint extractor and planner ``planner_name``, restricted to the labelled cases, writing under
    ``staging``.

    nnU-Net writes into ``$nnUNet_preprocessed/<dataset>/``; pointing that variable at a staging folder for the
    duration keeps the current preparation untouched until the new one is complete (nnU-Net 2.8 reads its folder
    variables when used). The current plans are copied in first, so nnU-Net keeps custom configurations as usual.
    """
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    labeled = _nnunet_case_dict(inventory.labeled)
    staged = staging / dataset_name
    staged.mkdir(parents=True, exist_ok=True)
    current_plans = preprocessed_root(dataset_name) / f"{plans_name}.json"
    if current_plans.is_file():
        shutil.copyfile(current_plans, staged / current_plans.name)
    shutil.copyfile(inventory.raw_dir / "dataset.json", staged / "dataset.json")

    saved = {key: os.environ.get(key) for key in ("nnUNet_preprocessed", "nnUNet_n_proc_DA")}
    os.environ["nnUNet_preprocessed"] = str(staging)
    # The planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0 (single-threaded augmentation).
    if saved["nnUNet_n_proc_DA"] == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        extractor = DatasetFingerprintExtractor(dataset_name, num_processes=max(1, num_processes))
        # nnU-Net has no option to restrict the cases; its constructor lists all of imagesTr, so narrow it here.
        extractor.dataset = labeled
        with workers_die_with_us(fingerprint_extractor):
            extractor.run(overwrite_existing=True)

        planner = planner_class(planner_name)(dataset_name, plans_name=plans_name)
        planner.dataset = labeled  # same reason: plan from the labelled cases only
        planner.dataset_json["numTraining"] = len(labeled)
        plans = planner.plan_experiment()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    for name in ("dataset_fingerprint.json", f"{plans_name}.json"):
        if not (staged / name).is_file():
            raise PreparationError(f"nnU-Net did not write {name} into {staged}: is nnunetv2 2.8 installed?")
    for base in ("3d_fullres", "2d"):
        add_cpu_configuration(plans, base)
    atomic_write_text(staged / f"{plans_name}.json", json.dumps(plans, indent=2))
    return plans


def prepare(
    dataset: str | int,
    configurations: list[str],
    labeled_list: Path | None = None,
    labeled_fraction: float | None = None,
    seed: int = 0,
    plans_name: str | None = None,
    num_processes: int = 2,
    allow_no_unlabeled: bool = False,
    planner: str | None = None,
) -> PreparedDataset:
    """Validate, plan and preprocess; a second call with the same inputs does no work.

    ``planner`` (``-pl``) and ``plans_name`` (``-p``) as nnU-Net takes them, resolved by :func:`resolve_planner`
    (default ExperimentPlanner / nnUNetPlans); the ``_cpu`` configurations are added to whichever plans are written.

    Everything is written under temporary names and installed by renames once a configuration is complete, with the
    manifest last: a failure (a full disk included) leaves the previous preparation as it was, and a kill during the
    renames leaves their journal, with which the next run completes the install first. The whole run, from
    reading the manifest to writing it, holds the dataset's lock, so a concurrent prepare or add-labels is refused.
    """
    if labeled_list is not None and labeled_fraction is not None:
        raise PreparationError("give either --labeled-list or --labeled-fraction, not both")
    dataset_name = dataset_name_from_id(dataset)
    raw_dir = env_folder("nnUNet_raw") / dataset_name
    if not raw_dir.is_dir():
        raise PreparationError(
            f"{raw_dir} does not exist: put the raw dataset there (imagesTr, labelsTr, dataset.json)"
        )
    out = preprocessed_root(dataset_name)
    planner, plans_name = resolve_planner(planner, plans_name, out)
    # the lock creates ``out`` if needed and removes it again if a refused or failed first prepare leaves it empty
    with dataset_lock(out, f"prepare {dataset_name}"):
        return _prepare_locked(
            dataset_name,
            raw_dir,
            out,
            configurations,
            labeled_list,
            labeled_fraction,
            seed,
            plans_name,
            num_processes,
            allow_no_unlabeled,
            planner,
        )


def _prepare_locked(
    dataset_name: str,
    raw_dir: Path,
    out: Path,
    configurations: list[str],
    labeled_list: Path | None,
    labeled_fraction: float | None,
    seed: int,
    plans_name: str,
    num_processes: int,
    allow_no_unlabeled: bool,
    planner: str = DEFAULT_PLANNER,
) -> PreparedDataset:
    recover_install(out)  # before the manifest is read: it must describe what is installed
    manifest_file = out / MANIFEST_NAME
    manifest: dict[str, Any] = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    labeled_ids: list[str] | None = None
    if labeled_list is not None:
        labeled_ids = read_labeled_list(Path(labeled_list))
    elif labeled_fraction is not None:
        labeled_ids = sample_labeled_ids(training_case_ids(raw_dir), labeled_fraction, seed)
    labeled_ids = _with_added_labels(labeled_ids, manifest, raw_dir, manifest_file)
    inventory = build_inventory(raw_dir, labeled_ids, allow_empty_unlabeled=allow_no_unlabeled)
    digest, file_records = inputs_digest(inventory, plans_name, manifest.get(FILE_RECORDS_KEY))

    remove_leftovers(out)
    staging = out / PREPARE_STAGING_NAME
    staged: Path | None = None  # planning output waiting to be installed with the first configuration
    step = "planning"
    installed: list[str] = []
    mismatch = install_problems(out, manifest, plans_name) if manifest.get("inputs_digest") == digest else []
    try:
        if manifest.get("inputs_digest") != digest or mismatch:
            previous_added = list(manifest.get(ADDED_LABELS_KEY) or [])
            if mismatch:
                print(
                    f"The files installed in {out} do not match its manifest ({'; '.join(mismatch)}): an install was "
                    "interrupted (by a version without an install journal?) or files were changed by hand. "
                    "Re-planning."
                )
            elif manifest and manifest.get("plans_name") != plans_name:
                print(
                    f"{dataset_name} was prepared with the plans {manifest.get('plans_name')}: planning {plans_name} "
                    f"with {planner}; from now on train and query work on {plans_name} (the other plans' files stay)."
                )
            elif manifest:
                print(
                    f"Inputs changed since the last prepare of {dataset_name} (labelled cases or files): re-planning."
                )
            start = time.time()
            plans = _fingerprint_and_plan(inventory, dataset_name, plans_name, num_processes, staging, planner)
            staged = staging / dataset_name
            manifest = {
                "inputs_digest": digest,
                "plans_name": plans_name,
                "planner": planner,
                "labeled_ids": inventory.labeled_ids,
                "unlabeled_ids": inventory.unlabeled_ids,
                "labeled_list_source": str(labeled_list) if labeled_list else None,
                "labeled_fraction": labeled_fraction,
                "seed": seed,
                "configurations": {},
                "planning_seconds": round(time.time() - start, 2),
                FINGERPRINT_KEY: file_sha256(staging / dataset_name / FINGERPRINT_NAME),
            }
            if manifest_added := [e for e in previous_added if set(e.get("cases", [])) & set(inventory.labeled_ids)]:
                manifest[ADDED_LABELS_KEY] = manifest_added  # kept, so a later prepare with the list keeps them too
            header = f"labelled cases of {dataset_name} used by nnfiltermatch prepare"
            write_labeled_list(inventory.labeled_ids, staged / LABELED_LIST_NAME, header=header)
            _copy_gt_segmentations(inventory, staged)
        else:
            plans = json.loads((out / f"{plans_name}.json").read_text())
        manifest["planner"] = planner  # resolve_planner checked it against the plans file (older manifests lack it)
        manifest[FILE_RECORDS_KEY] = file_records  # new timestamps of unchanged files are learnt, not re-hashed

        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        dataset_json = json.loads(((staged or out) / "dataset.json").read_text())
        plans_manager = PlansManager(plans)
        for configuration in configurations:
            if configuration not in plans["configurations"]:
                raise PreparationError(f"-c {configuration}: not in the plans ({', '.join(plans['configurations'])})")
            data_identifier = plans_manager.get_configuration(configuration).data_identifier
            done = {v["data_identifier"] for v in manifest["configurations"].values()}
            unlabeled_in = unlabeled_folder(dataset_name, data_identifier)
            if data_identifier in done and (out / data_identifier).is_dir() and unlabeled_in.is_dir():
                print(f"{configuration}: {data_identifier} already preprocessed with these inputs, nothing to do.")
                manifest["configurations"].setdefault(
                    configuration, {"data_identifier": data_identifier, "seconds": 0.0}
                )
                continue
            step = f"preprocessing {configuration}"
            start = time.time()
            folders = preprocess_configuration(
                inventory, dataset_name, plans, configuration, dataset_json, num_processes
            )
            manifest["configurations"][configuration] = {
                "data_identifier": data_identifier,
                "seconds": round(time.time() - start, 2),
            }
            step = f"installing {configuration}"
            install_preparation(out, manifest, staged, folders, f"prepare {dataset_name}, installing {configuration}")
            staged = None
            installed.append(configuration)
        step = "writing the manifest"
        if staged is not None:  # no configuration to preprocess: install the new plans alone
            install_preparation(out, manifest, staged, [], f"prepare {dataset_name}, installing the plans {plans_name}")
            staged = None
        else:
            atomic_write_text(manifest_file, json.dumps(manifest, indent=2))
    except BaseException as exc:
        full = None if isinstance(exc, PreparationError) else disk_full_reason(exc, out)
        written, cases_written = partial_usage(out)
        remove_leftovers(out)
        if full is None:
            raise
        total = len(inventory.labeled) + len(inventory.unlabeled)
        need = (
            f" (it needs about {format_size(written / cases_written * total)}, estimated from the {cases_written} of "
            f"{total} cases written before the failure)"
            if cases_written
            else ""
        )
        changed = (
            f"{', '.join(installed)} had been prepared completely and {'is' if len(installed) == 1 else 'are'} "
            "installed; otherwise nothing was changed"
            if installed
            else "Nothing was changed"
        )
        raise PreparationError(
            f"no space left on the disk of {out} while {step} ({full}). {changed}: the raw data in {raw_dir} was "
            f"only read, the previous preparation in {out} (if any) is as it was, and the partial output was removed. "
            f"Free up space on that disk{need}; the previous preprocessed data stays until the new one is complete, "
            "so both must fit. Or set nnUNet_preprocessed to a folder on a larger disk. Then run prepare again."
        ) from exc
    finally:
        if not has_journal(out):  # else the journal's next run needs the staged files
            shutil.rmtree(staging, ignore_errors=True)
    return load_prepared(dataset_name)


def _with_added_labels(
    labeled_ids: list[str] | None, manifest: dict[str, Any], raw_dir: Path, manifest_file: Path
) -> list[str] | None:
    """A labelled list plus the cases ``prepare --add-labels`` labelled since: the same list must not undo them.

    Without a list every imagesTr case is labelled anyway (add_labels put the new ones there).
    """
    added = [c for entry in manifest.get(ADDED_LABELS_KEY) or [] for c in entry.get("cases", [])]
    if labeled_ids is None or not added:
        return labeled_ids
    in_images_tr = set(training_case_ids(raw_dir))
    extra = sorted({c for c in added if c in in_images_tr} - set(labeled_ids))
    if extra:
        print(
            f"{len(extra)} case(s) labelled by `prepare --add-labels` stay labelled ({', '.join(extra[:8])}"
            f"{' ...' if len(extra) > 8 else ''}); delete {manifest_file} to start again from the list alone."
        )
    return [*labeled_ids, *extra]


def training_case_ids(raw_dir: Path) -> list[str]:
    """Case IDs in imagesTr from file names alone (no file is opened), for sampling a labelled list."""
    file_ending = json.loads((raw_dir / "dataset.json").read_text()).get("file_ending", ".nii.gz")
    suffix = "_0000" + file_ending
    ids = sorted(p.name[: -len(suffix)] for p in (raw_dir / "imagesTr").glob("*" + suffix))
    if not ids:
        raise PreparationError(f"{raw_dir / 'imagesTr'} has no *{suffix} files")
    return ids


def _copy_gt_segmentations(inventory: DatasetInventory, out: Path) -> None:
    """nnU-Net's final validation reads labels from here; only labelled cases may appear."""
    gt = out / "gt_segmentations"
    if gt.exists():
        shutil.rmtree(gt)
    gt.mkdir(parents=True)
    for case in inventory.labeled:
        assert case.label_file is not None
        shutil.copyfile(case.label_file, gt / (case.case_id + inventory.file_ending))
