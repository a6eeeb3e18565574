"""Data preparation: nnU-Net's fingerprint, planner and preprocessor, run on the labelled cases only.

The unlabelled images are preprocessed with the same plan into ``<preprocessed>/<dataset>/unlabeled/<data_id>/``,
so no blank label files and no second dataset are ever needed. Label files of unlabelled cases (budget simulation)
are never opened: every nnU-Net step below is handed an explicit list of labelled cases.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import json
import os
import pickle
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nnfiltermatch.files import atomic_write_text, disk_full_reason, format_size
from nnfiltermatch.install_journal import (
    ASIDE,
    INSTALL,
    JOURNAL_NAME,
    JournalError,
    Move,
    has_journal,
    install,
    recover,
)
from nnfiltermatch.inventory import Case, DatasetInventory, build_inventory, sample_labeled_ids, write_labeled_list
from nnfiltermatch.locks import LOCK_NAME, LockError, run_lock

MANIFEST_NAME = "nnfiltermatch_prepare.json"
LABELED_LIST_NAME = "nnfiltermatch_labeled_cases.txt"
UNLABELED_DIRNAME = "unlabeled"
ADDED_LABELS_KEY = "added_labels"  # manifest entries written by add_labels
FILE_RECORDS_KEY = "file_records"  # size, mtime and SHA-256 per input file: only changed files are re-hashed
STAGING_NAME = ".add_labels.partial"
PREPARE_STAGING_NAME = ".prepare.staging"  # new plans, fingerprint, lists until installed
PREPARE_TRASH_NAME = ".prepare.replaced"  # what an install replaced, until the manifest is in
UNRECOVERABLE_SUFFIX = ".unrecoverable"  # the manifest of an install that can be neither completed nor undone
FINGERPRINT_NAME = "dataset_fingerprint.json"
FINGERPRINT_KEY = "fingerprint_sha256"  # manifest: the fingerprint it was planned with
RECOVERY_WAIT_SECONDS = 10.0  # a reader waits this long for a running prepare to finish its renames
PARTIAL_SUFFIX = ".partial"  # preprocessed data being written
CPU_SUFFIX = "_cpu"
DEFAULT_PLANS = "nnUNetPlans"
DEFAULT_PLANNER = "ExperimentPlanner"
PLANNERS_PACKAGE = "nnunetv2.experiment_planning.experiment_planners"
# nnU-Net's planners by the names its -pl takes, with their modules under PLANNERS_PACKAGE. Imported by path, not
# found by nnU-Net's recursive class search, which imports the whole training tree (and crashes on torchvision).
PLANNERS: dict[str, str] = {
    "ExperimentPlanner": "default_experiment_planner",
    "ResEncUNetPlanner": "residual_unets.residual_encoder_unet_planners",
    "nnUNetPlannerResEncM": "residual_unets.residual_encoder_unet_planners",
    "nnUNetPlannerResEncL": "residual_unets.residual_encoder_unet_planners",
    "nnUNetPlannerResEncXL": "residual_unets.residual_encoder_unet_planners",
    "nnUNetPlannerResEncL_noResampling": "resampling.planners_no_resampling",
    "nnUNetPlannerResEncL_torchres": "resampling.resample_with_torch",
    "nnUNetPlannerResEncL_torchres_sepz": "resampling.resample_with_torch",
    "nnUNetPlanner_torchres": "resampling.resample_with_torch",
}


class PreparationError(RuntimeError):
    """A preparation step cannot run; the message says what to fix."""


@contextmanager
def dataset_lock(out: Path, what: str) -> Iterator[None]:
    """Hold ``out/.nnfiltermatch.lock`` (the preprocessed dataset) for the block: one prepare / add-labels at a time.

    Why: two prepares of one dataset interleave their installs (one once reported success with an empty unlabelled
    folder). A held lock is a PreparationError, so the CLI reports it like any refusal (exit 2).
    """
    with ExitStack() as stack:
        try:
            stack.enter_context(run_lock(out / LOCK_NAME, what))
        except LockError as exc:
            raise PreparationError(str(exc)) from exc
        yield


def recover_interrupted_install(dataset_name: str) -> None:
    """Finish an install that a killed prepare left half done, before anything reads the dataset as installed.

    For the readers (train, anything calling ``load_prepared``); prepare and add-labels do it themselves under the
    lock they hold. A journal lives for milliseconds in a running prepare, so while another run holds the lock and
    the journal is still there, wait briefly for it to go, then refuse, naming the holder.
    """
    out = preprocessed_root(dataset_name)
    if not has_journal(out):
        return
    deadline = time.monotonic() + RECOVERY_WAIT_SECONDS
    while True:
        try:
            with run_lock(out / LOCK_NAME, f"finish the interrupted install of {dataset_name}"):
                _recover_install(out)
            return
        except LockError as exc:
            if not has_journal(out):
                return  # the run holding the lock finished it
            if time.monotonic() > deadline:
                raise PreparationError(
                    f"{out / JOURNAL_NAME}: the install of {dataset_name} is unfinished and cannot be finished now "
                    f"({exc})"
                ) from exc
            time.sleep(0.2)


def _recover_install(out: Path) -> None:
    """Complete (or, when its new files are gone, undo) an interrupted install of ``out``, saying so on stderr.

    The caller holds the dataset's lock. One that can be neither (files removed by hand) is made harmless: its
    manifest is renamed, so no command takes the half install for a preparation and the next prepare starts afresh.
    """
    try:
        done = recover(out)
    except JournalError as exc:
        manifest = out / MANIFEST_NAME
        kept = manifest.with_name(manifest.name + UNRECOVERABLE_SUFFIX)
        if manifest.is_file():
            os.replace(manifest, kept)
        (out / JOURNAL_NAME).unlink(missing_ok=True)
        _note(
            f"{exc}. Its manifest was renamed to {kept.name}, so that nothing uses the half install: the next prepare "
            f"plans and preprocesses {out.name} afresh"
        )
        return
    if done is not None:
        _note(done.describe(out))


def _note(message: str) -> None:
    print(f"nnfiltermatch: note: {message}", file=sys.stderr, flush=True)


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
    return env_folder("nnUNet_preprocessed") / dataset_name


def unlabeled_folder(dataset_name: str, data_identifier: str) -> Path:
    """Where the unlabelled images of one plan configuration live, beside nnU-Net's own folder for the labelled."""
    return preprocessed_root(dataset_name) / UNLABELED_DIRNAME / data_identifier


def planner_class(name: str) -> type:
    """nnU-Net's planner class called ``name`` (as ``-pl`` names it), imported from its module."""
    if name not in PLANNERS:
        raise PreparationError(f"-pl {name}: not one of nnU-Net's planners ({', '.join(PLANNERS)})")
    return getattr(importlib.import_module(f"{PLANNERS_PACKAGE}.{PLANNERS[name]}"), name)


def planner_plans_name(name: str) -> str:
    """The plans name ``name`` writes by default (its ``plans_name`` default, read from nnU-Net, not copied)."""
    return str(inspect.signature(planner_class(name).__init__).parameters["plans_name"].default)


def _planner_of(plans_file: Path) -> str | None:
    """The planner recorded in an existing plans file (nnU-Net's ``experiment_planner_used``), if readable."""
    if not plans_file.is_file():
        return None
    try:
        used = json.loads(plans_file.read_text()).get("experiment_planner_used")
    except (OSError, ValueError):
        return None
    return str(used) if used else None


def resolve_planner(planner: str | None, plans_name: str | None, plans_folder: Path) -> tuple[str, str]:
    """The (planner, plans name) that ``prepare -pl/-p`` means; refuses a pair that does not belong together.

    Why: a fixed planner once wrote a plain U-Net under ``-p nnUNetResEncUNetMPlans``. Rules: ``-pl`` alone writes
    the planner's own plans name; ``-p`` alone takes the planner whose own name it is, else the one that wrote that
    plans file (in ``plans_folder``), else ExperimentPlanner; a name that is another planner's own, or a plans file
    written by another planner, is refused (nnU-Net would merge the two). Other names are custom names, as nnU-Net's
    ``-overwrite_plans_name``.
    """
    if planner is None and plans_name is None:
        return DEFAULT_PLANNER, DEFAULT_PLANS
    own_names = {planner_plans_name(name): name for name in PLANNERS} if plans_name is not None else {}
    if planner is None:
        existing = _planner_of(plans_folder / f"{plans_name}.json")
        planner = own_names.get(str(plans_name)) or (existing if existing in PLANNERS else DEFAULT_PLANNER)
    own = planner_plans_name(planner)
    plans_name = own if plans_name is None else plans_name
    owner = own_names.get(plans_name)
    if owner is not None and owner != planner:
        raise PreparationError(
            f"-p {plans_name} is the plans name of planner {owner}, not of -pl {planner} (which writes {own}): give "
            f"-pl {owner}, or -pl {planner} without -p"
        )
    existing = _planner_of(plans_folder / f"{plans_name}.json")
    if existing is not None and existing != planner:
        raise PreparationError(
            f"{plans_folder / plans_name}.json was planned by {existing}, not {planner}: give -pl {existing} to keep "
            f"it, or another -p, or delete that file and its {plans_name}_* folders to re-plan with {planner}"
        )
    return planner, plans_name


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


def _inputs_digest(
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


def _nnunet_case_dict(cases: Iterable[Case]) -> dict[str, dict[str, Any]]:
    """The ``{case: {'images': [...], 'label': ...}}`` mapping nnU-Net's planning classes iterate over."""
    return {c.case_id: {"images": [str(p) for p in c.image_files], "label": str(c.label_file)} for c in cases}


def add_cpu_configuration(plans: dict, base: str) -> str | None:
    """Add ``<base>_cpu``: same preprocessed data, one stage less, half the patch, features 8..64, batch 2.

    Inherits from ``base`` so it reuses its preprocessed folder; trains about ten times faster on a CPU, which is
    what tests, the demo and CPU benchmarks use.
    """
    configs = plans["configurations"]
    if base not in configs or "architecture" not in configs[base]:
        return None
    src = configs[base]
    arch = copy.deepcopy(src["architecture"])
    kwargs = arch["arch_kwargs"]
    n_stages = max(2, int(kwargs["n_stages"]) - 1)
    strides = [list(s) if isinstance(s, (list, tuple)) else [s] * len(src["patch_size"]) for s in kwargs["strides"]]
    strides = strides[:n_stages]
    total_stride = np.prod(np.array(strides), axis=0)
    patch = [max(int(t), int(p // 2 // t * t)) for p, t in zip(src["patch_size"], total_stride)]
    kwargs["n_stages"] = n_stages
    kwargs["strides"] = strides
    kwargs["kernel_sizes"] = kwargs["kernel_sizes"][:n_stages]
    kwargs["features_per_stage"] = [min(8 * 2**i, 64) for i in range(n_stages)]
    for key in ("n_conv_per_stage", "n_blocks_per_stage"):
        if key in kwargs:
            kwargs[key] = kwargs[key][:n_stages]
    if "n_conv_per_stage_decoder" in kwargs:
        kwargs["n_conv_per_stage_decoder"] = kwargs["n_conv_per_stage_decoder"][: n_stages - 1]
    name = base + CPU_SUFFIX
    configs[name] = {"inherits_from": base, "patch_size": patch, "batch_size": 2, "architecture": arch}
    return name


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def _die_with_parent(parent_pid: int, initializer: Callable[..., Any] | None = None, initargs: tuple = ()) -> None:
    """Worker initializer: end this worker as soon as the process that started it dies, even by SIGKILL.

    A spawned worker otherwise waits on its task queue forever (it holds the queue's write end itself), with
    multiprocessing's resource tracker kept alive by it: a killed ``prepare`` left both running with parent 1, still
    writing into folders the next ``prepare`` deletes. Linux: the kernel sends SIGKILL (PR_SET_PDEATHSIG); elsewhere a
    thread polls the parent ID. Then ``initializer(*initargs)``, if one was given.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="watch-parent", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    if initializer is not None:
        initializer(*initargs)


class _ParentBoundContext:
    """A multiprocessing context whose ``Pool`` workers run ``_die_with_parent`` first."""

    def __init__(self, context: Any) -> None:
        self._context = context

    def Pool(
        self, processes: int | None = None, initializer: Any = None, initargs: tuple = (), *args: Any, **kw: Any
    ) -> Any:
        return self._context.Pool(processes, _die_with_parent, (os.getpid(), initializer, initargs), *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _ParentBoundMultiprocessing:
    """Stands in for the ``multiprocessing`` module inside one nnU-Net module: only ``get_context`` differs."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def get_context(self, method: str | None = None) -> _ParentBoundContext:
        return _ParentBoundContext(self._module.get_context(method))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


@contextmanager
def _workers_die_with_us(module: Any) -> Iterator[None]:
    """While inside, pools that ``module`` creates with ``multiprocessing.get_context(...).Pool`` get workers that die
    with this process: nnU-Net's fingerprint extractor starts its own spawn pool and takes no initializer."""
    original = getattr(module, "multiprocessing", None)
    if original is None:  # another nnU-Net version: nothing to bind
        yield
        return
    module.multiprocessing = _ParentBoundMultiprocessing(original)
    try:
        yield
    finally:
        module.multiprocessing = original


def _run_parallel(fn: Callable[..., Any], jobs: list[tuple], num_processes: int, desc: str) -> None:
    """Run ``fn(*job)`` for every job with a progress bar; in-process for one worker (cheaper than spawning).

    The workers die with this process (``_die_with_parent``), so a killed prepare leaves no process behind.
    """
    if not jobs:
        return
    with tqdm(total=len(jobs), desc=desc, unit="case") as bar:
        if num_processes <= 1:
            for job in jobs:
                fn(*job)
                bar.update()
            return
        with ProcessPoolExecutor(
            max_workers=num_processes,
            mp_context=get_context("spawn"),
            initializer=_die_with_parent,
            initargs=(os.getpid(),),
        ) as pool:
            for future in [pool.submit(fn, *job) for job in jobs]:
                future.result()
                bar.update()


def _preprocessing_context(plans: dict, configuration: str) -> tuple[Any, Any, Any]:
    """nnU-Net's plans and configuration managers and the configuration's preprocessor (built in each worker)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    return plans_manager, configuration_manager, configuration_manager.preprocessor_class(verbose=False)


def _preprocess_labeled_case(
    out_truncated: str, case: Case, plans: dict, configuration: str, dataset_json: dict
) -> None:
    plans_manager, configuration_manager, preprocessor = _preprocessing_context(plans, configuration)
    preprocessor.run_case_save(
        out_truncated,
        [str(p) for p in case.image_files],
        str(case.label_file),
        plans_manager,
        configuration_manager,
        dataset_json,
    )


def _preprocess_unlabeled_case(
    out_truncated: str, case: Case, plans: dict, configuration: str, dataset_json: dict
) -> None:
    import blosc2
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params

    plans_manager, configuration_manager, preprocessor = _preprocessing_context(plans, configuration)
    data, _, properties = preprocessor.run_case(
        [str(p) for p in case.image_files], None, plans_manager, configuration_manager, dataset_json
    )
    data = np.ascontiguousarray(data, dtype=np.float32)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(configuration_manager.patch_size), data.itemsize)
    blosc2.set_nthreads(1)
    blosc2.asarray(
        data,
        urlpath=out_truncated + ".b2nd",
        chunks=chunks,
        blocks=blocks,
        cparams={"codec": blosc2.Codec.LZ4HC, "clevel": 5, "nthreads": 1},
    )
    with open(out_truncated + ".pkl", "wb") as handle:
        pickle.dump(properties, handle)


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
        with _workers_die_with_us(fingerprint_extractor):
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
    from nnfiltermatch.inventory import read_labeled_list

    _recover_install(out)  # before the manifest is read: it must describe what is installed
    manifest_file = out / MANIFEST_NAME
    manifest: dict[str, Any] = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {}
    labeled_ids: list[str] | None = None
    if labeled_list is not None:
        labeled_ids = read_labeled_list(Path(labeled_list))
    elif labeled_fraction is not None:
        labeled_ids = sample_labeled_ids(training_case_ids(raw_dir), labeled_fraction, seed)
    labeled_ids = _with_added_labels(labeled_ids, manifest, raw_dir, manifest_file)
    inventory = build_inventory(raw_dir, labeled_ids, allow_empty_unlabeled=allow_no_unlabeled)
    digest, file_records = _inputs_digest(inventory, plans_name, manifest.get(FILE_RECORDS_KEY))

    _remove_leftovers(out)
    staging = out / PREPARE_STAGING_NAME
    staged: Path | None = None  # planning output waiting to be installed with the first configuration
    step = "planning"
    installed: list[str] = []
    mismatch = _install_problems(out, manifest, plans_name) if manifest.get("inputs_digest") == digest else []
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
                FINGERPRINT_KEY: _sha256(staging / dataset_name / FINGERPRINT_NAME),
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
            folders = _preprocess_configuration(
                inventory, dataset_name, plans, configuration, dataset_json, num_processes
            )
            manifest["configurations"][configuration] = {
                "data_identifier": data_identifier,
                "seconds": round(time.time() - start, 2),
            }
            step = f"installing {configuration}"
            _install(out, manifest, staged, folders, f"prepare {dataset_name}, installing {configuration}")
            staged = None
            installed.append(configuration)
        step = "writing the manifest"
        if staged is not None:  # no configuration to preprocess: install the new plans alone
            _install(out, manifest, staged, [], f"prepare {dataset_name}, installing the plans {plans_name}")
            staged = None
        else:
            atomic_write_text(manifest_file, json.dumps(manifest, indent=2))
    except BaseException as exc:
        full = None if isinstance(exc, PreparationError) else disk_full_reason(exc, out)
        written, cases_written = _partial_usage(out)
        _remove_leftovers(out)
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _install_problems(out: Path, manifest: dict[str, Any], plans_name: str) -> list[str]:
    """How the installed plans, fingerprint, lists and ground truth differ from what ``manifest`` describes.

    A journalled install never leaves such a mix, but a version without the journal did (a kill in the middle of
    its renames left the old manifest over new plans and fingerprint, and no labelled list), and it must not count
    as prepared. Cheap: two small files read, one folder listed.
    """
    from nnfiltermatch.inventory import read_labeled_list

    problems = [f"{name} is missing" for name in (f"{plans_name}.json", "dataset.json") if not (out / name).is_file()]
    labeled = list(manifest.get("labeled_ids") or [])
    fingerprint = out / FINGERPRINT_NAME
    if not fingerprint.is_file():
        problems.append(f"{FINGERPRINT_NAME} is missing")
    elif manifest.get(FINGERPRINT_KEY) and _sha256(fingerprint) != manifest[FINGERPRINT_KEY]:
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


def _partial_usage(out: Path) -> tuple[int, int]:
    """Bytes in the ``.partial`` folders of a failed prepare and how many cases they completed (one .pkl each)."""
    written = cases = 0
    for parent in (out, out / UNLABELED_DIRNAME):
        for partial in parent.glob(f"*{PARTIAL_SUFFIX}") if parent.is_dir() else []:
            for f in partial.rglob("*"):
                if f.is_file():
                    written += f.stat().st_size
                    cases += f.suffix == ".pkl"
    return written, cases


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


def _preprocess_configuration(
    inventory: DatasetInventory,
    dataset_name: str,
    plans: dict,
    configuration: str,
    dataset_json: dict,
    num_processes: int,
) -> list[tuple[Path, Path]]:
    """Preprocess labelled and unlabelled cases into ``.partial`` folders; returns (final, partial) pairs to install.

    The final folders are not touched here: a failure leaves them as they were (the caller removes the partials).
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    targets = [
        (preprocessed_root(dataset_name) / data_identifier, inventory.labeled, _preprocess_labeled_case, "labelled"),
        (
            unlabeled_folder(dataset_name, data_identifier),
            inventory.unlabeled,
            _preprocess_unlabeled_case,
            "unlabelled",
        ),
    ]
    folders = []
    for final, cases, fn, what in targets:
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        folders.append((final, partial))
        jobs = [(str(partial / c.case_id), c, plans, configuration, dataset_json) for c in cases]
        _run_parallel(fn, jobs, num_processes, f"{configuration}: preprocessing {what} cases")
    return folders


def _install(
    out: Path, manifest: dict[str, Any], staged: Path | None, folders: list[tuple[Path, Path]], what: str = "prepare"
) -> None:
    """Put a finished preparation in place by renames only, the manifest last, journalled (:mod:`install_journal`).

    The new manifest is written first under a temporary name (the one write that needs disk space), so a full disk
    stops before anything is moved. Each installed file or folder that is replaced is first set aside into a trash
    folder, deleted once the manifest is in. An exception during the renames undoes them; a kill leaves the journal,
    with which the next run (prepare, add-labels, train) completes the install before it reads anything.
    """
    trash = out / PREPARE_TRASH_NAME
    if trash.exists():  # left by a failed run (never by an unfinished journal: it was recovered at the start)
        shutil.rmtree(trash)
    trash.mkdir()
    new_manifest = out / f".{MANIFEST_NAME}.new"
    atomic_write_text(new_manifest, json.dumps(manifest, indent=2))
    moves: list[Move] = []

    def rel(path: Path) -> str:
        return path.relative_to(out).as_posix()

    if staged is not None:
        splits = out / "splits_final.json"  # the old split names cases that may no longer be labelled
        if splits.exists():
            moves.append(Move(ASIDE, rel(splits), rel(trash / splits.name)))
        for child in sorted(staged.iterdir()):
            if (out / child.name).exists():
                moves.append(Move(ASIDE, child.name, rel(trash / child.name)))
            moves.append(Move(INSTALL, rel(child), child.name))
    for i, (final, partial) in enumerate(folders):
        if final.exists():
            moves.append(Move(ASIDE, rel(final), rel(trash / f"{i}_{final.name}")))
        moves.append(Move(INSTALL, rel(partial), rel(final)))
    moves.append(Move(INSTALL, rel(new_manifest), MANIFEST_NAME))
    delete = [PREPARE_TRASH_NAME] + ([rel(staged.parent)] if staged is not None else [])
    install(out, moves, delete, what)


def _remove_leftovers(out: Path) -> None:
    """Temporary folders of an interrupted or failed prepare (never read by training: they have their own names).

    Not while an install journal is unfinished: its next run needs them (to complete it or to undo it).
    """
    if has_journal(out):
        return
    for folder in (out / PREPARE_STAGING_NAME, out / PREPARE_TRASH_NAME):
        shutil.rmtree(folder, ignore_errors=True)
    (out / f".{MANIFEST_NAME}.new").unlink(missing_ok=True)
    for parent in (out, out / UNLABELED_DIRNAME):
        if parent.is_dir():
            for partial in parent.glob(f"*{PARTIAL_SUFFIX}"):
                if partial.is_dir():
                    shutil.rmtree(partial, ignore_errors=True)


# ----- adding labels after an active-learning query ---------------------------------------------------------------
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


def _current_digest(
    raw_dir: Path, labeled_ids: list[str], plans_name: str, known: dict[str, Any] | None = None
) -> tuple[str, DatasetInventory, dict[str, Any]]:
    """The digest ``prepare`` computes for this labelled set, its inventory and file records (images are not
    checked; only files whose size or mtime differ from ``known`` are read, to hash them)."""
    inventory = build_inventory(raw_dir, labeled_ids, allow_empty_unlabeled=True, check_contents=False, progress=False)
    digest, records = _inputs_digest(inventory, plans_name, known)
    return digest, inventory, records


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

    Then the cases are recorded as the next annotation round in rounds.json (see :mod:`nnfiltermatch.rounds`),
    with the settings of the query that chose them: those of ``query_export``, or of the export folder around
    ``labels_dir`` (DIR/labelsTr of ``query --export DIR``) when there is one.
    """
    from nnfiltermatch.rounds import read_query_export, record_added_labels

    dataset_name = dataset_name_from_id(dataset)
    out = preprocessed_root(dataset_name)
    if not out.is_dir():
        _require_manifest(out / MANIFEST_NAME, dataset_name)
    query, _ = read_query_export(Path(labels_dir), query_export)
    with dataset_lock(out, f"prepare {dataset_name} --add-labels {labels_dir}"):
        _recover_install(out)
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
    from nnfiltermatch.inventory import (
        DataValidationError,
        _check_contents,
        _dangling_link_problem,
        _load_dataset_json,
    )

    raw_dir = env_folder("nnUNet_raw") / dataset_name
    manifest_file = out / MANIFEST_NAME
    _require_manifest(manifest_file, dataset_name)
    manifest: dict[str, Any] = json.loads(manifest_file.read_text())
    plans_name = manifest["plans_name"]
    dataset_json_raw, num_channels, file_ending, allowed_labels = _load_dataset_json(raw_dir)

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
    problems += [str(_dangling_link_problem(p, labels_dir, "label")) for p in dangling]
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
    old_digest, _, current_records = _current_digest(
        raw_dir, sorted(labeled), plans_name, manifest.get(FILE_RECORDS_KEY)
    )
    if old_digest != manifest.get("inputs_digest"):
        raise PreparationError(
            f"{raw_dir} changed since the last prepare (files added, removed or modified): run `nnfiltermatch "
            f"prepare -d {dataset_name}` with your usual options first, then add the labels"
        )
    cases = [Case(c, tuple(images[c]), labels[c]) for c in sorted(labels)]
    check = DatasetInventory(raw_dir, dataset_json_raw, cases, [], num_channels, file_ending)
    _check_contents(check, allowed_labels, progress=False)  # geometry, label values, NaNs, truncation

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
            _run_parallel(_preprocess_labeled_case, jobs, 1, f"{configuration}: preprocessing newly labelled cases")

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
    new_digest, inventory, file_records = _current_digest(raw_dir, new_labeled, plans_name, current_records)
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
