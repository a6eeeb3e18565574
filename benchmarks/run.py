"""Benchmark runner: the arms (modes) on a dataset and a labelled list, several seeds, test-set metrics, cost.

    .venv/bin/python benchmarks/run.py --dataset hippocampus --labeled 10pct --profile cpu-small
    .venv/bin/python benchmarks/run.py --dataset acdc --labeled 3 --profile cpu-small

Writes ``results/<dataset>/<profile>/<labeled>/results.json`` and ``results.md``: mean and standard deviation over
seeds per mode and class, the gain over supervised paired by seed (with a paired t-test when there are at least
two seeds), the paper's numbers where the protocol is the paper's, and the cost of each mode (seconds per
iteration measured in one process, filter-round seconds and their share of training, peak memory).
Work folders (nnU-Net's three folders per experiment) go to ``--work`` (default ``work_dirs/``).
Datasets come from ``../shared/data`` (or ``--shared``); any folder of the same layout works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnfiltermatch.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

# candidate defaults: a mode plus options, ablated against the mode on validation cases before any becomes a default
VARIANTS: dict[str, dict[str, Any]] = {
    "copypaste": {"mode": "filtermatch", "copy_paste_p": 1.0},  # BCP mixes every unlabelled patch
}
# supervised first: selftrain starts from (reuses) the supervised run of the same seed; "paper" is filtermatch with
# --preset paper at the profile's schedule
MODES = ("supervised", "selftrain", "ssl", "filtermatch", "paper", *VARIANTS)
METRICS = ("dice", "jaccard", "hd95", "asd")


@dataclass(frozen=True)
class Profile:
    """A compute budget: which plan configuration, how long, how many seeds."""

    name: str
    configuration_3d: str
    configuration_2d: str
    epochs: int
    iters_per_epoch: int
    val_iters_per_epoch: int
    seeds: tuple[int, ...]
    preset: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)
    # when set: measure the step cost first and fit iters_per_epoch so that all modes and seeds train in this time
    train_budget_seconds: float | None = None
    # Hippocampus: cases carved out of the training pool (never trained on, labelled or not) to choose defaults on
    validation_cases: int = 0


PROFILES = {
    # sized for a 2-core CPU: about 10 minutes per seed for all three modes on Hippocampus
    # deterministic: paired runs share their random numbers, so a difference between modes is the method's
    "cpu-small": Profile(
        "cpu-small",
        "3d_fullres_cpu",
        "2d_cpu",
        epochs=20,
        iters_per_epoch=50,
        val_iters_per_epoch=5,
        seeds=(0, 1, 2),
        extra={"deterministic": True},
    ),
    # from the supervised learning curve (BENCHMARKS.md s.0, benchmarks/learning_curve.sh): 20,000 iterations of
    # 3d_fullres_cpu, with 20 validation cases held out of the Hippocampus training pool for choosing defaults
    "cpu-long": Profile(
        "cpu-long",
        "3d_fullres_cpu",
        "2d_cpu",
        epochs=200,
        iters_per_epoch=100,
        val_iters_per_epoch=5,
        seeds=(0, 1, 2),
        extra={"deterministic": True},
        validation_cases=20,
    ),
    # fits in about 10 minutes on one H100/H200 for all modes, one seed
    "gpu-short": Profile(
        "gpu-short",
        "3d_fullres",
        "2d",
        epochs=10,
        iters_per_epoch=50,
        val_iters_per_epoch=5,
        seeds=(0,),
        train_budget_seconds=300,
    ),
    # the reference schedule (300 x 250, the paper's settings): a day on a GPU
    "paper": Profile(
        "paper", "3d_fullres", "2d", epochs=300, iters_per_epoch=250, val_iters_per_epoch=50, seeds=(0,), preset="paper"
    ),
}

# method.md, Dice / Jaccard / 95HD (voxels) / ASD (voxels), mean over classes
PAPER = {
    ("acdc", "3"): {
        "supervised": (82.96, 73.01, 9.52, 2.69),
        "ssl": (89.51, 81.59, 2.43, 0.71),
        "filtermatch": (89.56, 81.63, 2.39, 0.63),
    },
    ("acdc", "7"): {
        "supervised": (86.31, 77.55, 4.42, 1.14),
        "ssl": (89.58, 81.65, 2.41, 0.69),
        "filtermatch": (90.06, 82.41, 1.46, 0.44),
    },
    ("la", "8"): {"filtermatch": (91.50, 84.40, float("nan"), float("nan"))},
}


@dataclass
class Experiment:
    dataset_key: str
    dataset_name: str
    labeled_key: str
    labeled_list: Path
    dimension: str  # "3d" or "2d"
    root: Path  # holds nnUNet_preprocessed / nnUNet_results for this labelled list
    raw_root: Path
    test_images: Path
    test_labels: Path
    labels: list[int]
    class_names: dict[int, str]
    validation_images: Path | None = None
    validation_labels: Path | None = None


def _shared(args: argparse.Namespace) -> Path:
    shared = Path(args.shared) if args.shared else REPO.parent / "shared" / "data"
    if not shared.is_dir():
        sys.exit(f"shared data folder {shared} not found: pass --shared PATH (see ../shared/data/README.md)")
    return shared


def _link_case(src_image: Path, src_label: Path, images: Path, labels: Path, case: str) -> None:
    (images / f"{case}_0000.nii.gz").symlink_to(src_image.resolve())
    (labels / f"{case}.nii.gz").symlink_to(src_label.resolve())


def _write_split_dataset(
    raw: Path,
    splits: dict[str, list[str]],
    source_of: Callable[[str], tuple[Path, Path]],
    dataset_json: dict[str, Any],
) -> None:
    """Write the raw dataset ``raw`` once: ``images<Split>/labels<Split>`` of links to ``source_of(case)``.

    Built under a temporary name and renamed, so an interrupted set-up is redone rather than used half-made.
    """
    if raw.is_dir():
        return
    partial = raw.with_name(raw.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for suffix, cases in splits.items():
        (partial / f"images{suffix}").mkdir(parents=True)
        (partial / f"labels{suffix}").mkdir(parents=True)
        for case in cases:
            image, label = source_of(case)
            _link_case(image, label, partial / f"images{suffix}", partial / f"labels{suffix}", case)
    words = {"Ts": "test", "Val": "validation"}
    held_out = ", ".join(f"{len(v)} {words.get(k, k)}" for k, v in splits.items() if k != "Tr" and v)
    dataset_json = {
        **dataset_json,
        "numTraining": len(splits["Tr"]),
        "description": f"{dataset_json.get('description', '')}; benchmark split: {held_out} held out",
    }
    (partial / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    partial.rename(raw)


HIPPOCAMPUS_FRACTIONS = {"10pct": 0.1, "5pct": 0.05, "all": 1.0}


def setup_hippocampus(
    shared: Path, work: Path, labeled_key: str, test_cases: int = 50, validation_cases: int = 0
) -> Experiment:
    """MSD Hippocampus with a seeded held-out test split of 50 cases; the rest is the training pool.

    ``validation_cases`` > 0 carves that many more cases out of the training pool (seed 1), held out of training
    entirely, to choose schedules and defaults on without reading the test cases; it is its own dataset (907).
    ``labeled_key`` ``all``: every training case labelled, the ceiling at a schedule.
    """
    from nnfiltermatch.data.labeled_lists import sample_labeled_ids, write_labeled_list

    if labeled_key not in HIPPOCAMPUS_FRACTIONS:
        sys.exit(f"--labeled for hippocampus: one of {', '.join(HIPPOCAMPUS_FRACTIONS)}")
    src = shared / "hippocampus"
    name = "Dataset907_HippocampusBenchVal" if validation_cases else "Dataset904_HippocampusBench"
    base = work / ("hippocampus_val" if validation_cases else "hippocampus")
    raw_root = base / "nnUNet_raw"
    raw = raw_root / name
    ids = sorted(p.name[: -len("_0000.nii.gz")] for p in (src / "imagesTr").glob("*_0000.nii.gz"))
    test = sorted(np.random.default_rng(0).choice(ids, size=test_cases, replace=False).tolist())
    pool = [i for i in ids if i not in test]
    validation = (
        sorted(np.random.default_rng(1).choice(pool, size=validation_cases, replace=False).tolist())
        if validation_cases
        else []
    )
    train = [i for i in pool if i not in validation]
    _write_split_dataset(
        raw,
        {"Tr": train, "Ts": test, "Val": validation},
        lambda case: (src / "imagesTr" / f"{case}_0000.nii.gz", src / "labelsTr" / f"{case}.nii.gz"),
        json.loads((src / "dataset.json").read_text()),
    )
    fraction = HIPPOCAMPUS_FRACTIONS[labeled_key]
    labeled_list = base / f"labeled_{labeled_key}.txt"
    write_labeled_list(
        sample_labeled_ids(train, fraction, 0) if fraction < 1 else train,
        labeled_list,
        header=f"{fraction:.0%} of the {len(train)} training cases, seed 0",
    )
    return Experiment(
        "hippocampus",
        name,
        labeled_key,
        labeled_list,
        "3d",
        base / labeled_key,
        raw_root,
        raw / "imagesTs",
        raw / "labelsTs",
        [1, 2],
        {1: "anterior", 2: "posterior"},
        raw / "imagesVal" if validation_cases else None,
        raw / "labelsVal" if validation_cases else None,
    )


def _convert_once(folder: Path, name: str, convert: Callable[[Path], object]) -> tuple[Path, Path]:
    """The converted raw dataset ``folder/nnUNet_raw/name``, converting only the first time."""
    raw_root = folder / "nnUNet_raw"
    if not (raw_root / name).is_dir():
        raw_root.mkdir(parents=True, exist_ok=True)
        convert(raw_root)
    return raw_root, raw_root / name


def setup_acdc(shared: Path, work: Path, labeled_key: str, validation_cases: int = 0) -> Experiment:
    """ACDC from the SSL4MIS layout; test = the 20 validation volumes (the test patients are not in shared/).

    ``validation_cases`` > 0 holds that many volumes (both frames of ``validation_cases // 2`` patients drawn with
    seed 1 among the unlabelled training patients of either protocol) out of training entirely, as their own dataset
    (908), to choose schedules and defaults on without reading the test volumes.
    """
    from nnfiltermatch.data.converters_acdc import convert_acdc_h5

    name = "Dataset905_ACDCBench"
    raw_root, raw = _convert_once(
        work / "acdc", name, lambda root: convert_acdc_h5(shared / "acdc", 905, name="ACDCBench", raw_root=root)
    )
    labeled_list = raw / f"labeled_{labeled_key}.txt"
    if labeled_key != "all" and not labeled_list.is_file():
        sys.exit(f"--labeled for acdc: 3, 7 or all (no {labeled_list})")
    validation_images = validation_labels = None
    base = work / "acdc"
    if validation_cases:
        frames = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))
        labelled_patients = {case.split("_")[0] for case in _read_list(raw / "labeled_7.txt")}  # 7 contains 3
        patients = sorted({f.split("_")[0] for f in frames} - labelled_patients)
        held = set(np.random.default_rng(1).choice(patients, size=validation_cases // 2, replace=False).tolist())
        validation = [f for f in frames if f.split("_")[0] in held]
        tests = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesTs").glob("*_0000.nii.gz"))
        source = {f: (raw / "imagesTr" / f"{f}_0000.nii.gz", raw / "labelsTr" / f"{f}.nii.gz") for f in frames}
        source |= {f: (raw / "imagesTs" / f"{f}_0000.nii.gz", raw / "labelsTs" / f"{f}.nii.gz") for f in tests}
        name = "Dataset908_ACDCBenchVal"
        base = work / "acdc_val"
        raw_root = base / "nnUNet_raw"
        split_raw = raw_root / name
        _write_split_dataset(
            split_raw,
            {"Tr": [f for f in frames if f not in validation], "Ts": tests, "Val": validation},
            source.__getitem__,
            json.loads((raw / "dataset.json").read_text()),
        )
        if labeled_key != "all":
            shutil.copyfile(labeled_list, base / labeled_list.name)
        labeled_list = base / labeled_list.name
        raw = split_raw
        validation_images, validation_labels = raw / "imagesVal", raw / "labelsVal"
    if labeled_key == "all":  # the ceiling: every training volume labelled (validation volumes stay held out)
        from nnfiltermatch.data.labeled_lists import write_labeled_list

        labeled_list = base / "labeled_all.txt"
        training = sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))
        write_labeled_list(training, labeled_list, header=f"all {len(training)} training volumes")
    return Experiment(
        "acdc",
        name,
        labeled_key,
        labeled_list,
        "2d",
        base / labeled_key,
        raw_root,
        raw / "imagesTs",
        raw / "labelsTs",
        [1, 2, 3],
        {1: "RV", 2: "Myo", 3: "LV"},
        validation_images,
        validation_labels,
    )


def _read_list(path: Path) -> list[str]:
    """Case IDs of a labelled-cases list (one per line, ``#`` comments)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def setup_la(shared: Path, work: Path, labeled_key: str) -> Experiment:
    """LA (UA-MT layout). The shared subset has no test list: its 8 unlabelled cases double as the test set."""
    from nnfiltermatch.data.converters_la import convert_la_h5

    name = "Dataset906_LABench"
    raw_root, raw = _convert_once(
        work / "la", name, lambda root: convert_la_h5(shared / "la", 906, name="LABench", raw_root=root)
    )
    labeled_list = raw / f"labeled_{labeled_key}.txt"
    test_images, test_labels = raw / "imagesTs", raw / "labelsTs"
    if not test_images.is_dir():  # transductive evaluation on the unlabelled training cases, said in the table
        labeled = set(_read_list(labeled_list))
        test_images, test_labels = work / "la" / "eval_images", work / "la" / "eval_labels"
        if not test_images.is_dir():
            test_images.mkdir(parents=True)
            test_labels.mkdir(parents=True)
            for image in sorted((raw / "imagesTr").glob("*_0000.nii.gz")):
                case = image.name[: -len("_0000.nii.gz")]
                if case not in labeled:
                    _link_case(image, raw / "labelsTr" / f"{case}.nii.gz", test_images, test_labels, case)
    return Experiment(
        "la",
        name,
        labeled_key,
        labeled_list,
        "3d",
        work / "la" / labeled_key,
        raw_root,
        test_images,
        test_labels,
        [1],
        {1: "atrium"},
    )


SETUPS = {"hippocampus": setup_hippocampus, "acdc": setup_acdc, "la": setup_la}


def _use_folders(exp: Experiment) -> None:
    """nnU-Net's folders for this experiment: one prepared labelled set per preprocessed root."""
    os.environ["nnUNet_raw"] = str(exp.raw_root)
    os.environ["nnUNet_preprocessed"] = str(exp.root / "nnUNet_preprocessed")
    os.environ["nnUNet_results"] = str(exp.root / "nnUNet_results")
    for key in ("nnUNet_preprocessed", "nnUNet_results"):
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)


def configuration_for(exp: Experiment, profile: Profile) -> str:
    return profile.configuration_3d if exp.dimension == "3d" else profile.configuration_2d


def prepare_experiment(exp: Experiment, profile: Profile, num_processes: int) -> Any:
    from nnfiltermatch.data.preparation import prepare

    _use_folders(exp)
    return prepare(
        exp.dataset_name,
        [configuration_for(exp, profile)],
        labeled_list=exp.labeled_list,
        num_processes=num_processes,
        allow_no_unlabeled=exp.labeled_key == "all",
    )


def fit_to_budget(profile: Profile, cost: dict, modes: tuple[str, ...], seconds: float) -> Profile:
    """Iterations per epoch so that every mode and seed trains within ``seconds`` at the measured step times.

    Why: a GPU lease is counted in minutes and cards differ; 15% is kept back for validation steps, filter rounds
    and the loaders' start-up.
    """
    med = cost["median_seconds"]
    per_iteration = sum(med["supervised"] if mode == "supervised" else med["ssl"] for mode in modes)
    # per epoch and mode: validation steps (forward only, about 0.4 of a supervised step) and ~2 s of epoch-end
    # bookkeeping (nnU-Net's progress plot, logs)
    fixed = len(modes) * (profile.val_iters_per_epoch * 0.4 * med["supervised"] + 2.0)
    per_seed = 0.85 * seconds / len(profile.seeds)
    iterations = (per_seed / profile.epochs - fixed) / per_iteration
    return Profile(**{**asdict(profile), "iters_per_epoch": max(5, int(iterations)), "train_budget_seconds": seconds})


def _evaluate(exp: Experiment, images: Path, labels: Path, model: Path, pred_dir: Path, device: str) -> dict:
    """Predict one split with the final model and evaluate it in voxels; the label maps are not kept."""
    from nnfiltermatch.commands.predict import predict_folder
    from nnfiltermatch.evaluation.evaluate import evaluate_folders

    if pred_dir.exists():
        shutil.rmtree(pred_dir)
    t0 = time.time()
    predict_folder(images, pred_dir, model, folds=["all"], device=device, mirroring=False)
    seconds = time.time() - t0
    evaluation = evaluate_folders(labels, pred_dir, labels=exp.labels, units="voxel", progress=False)
    evaluation.to_json(pred_dir.parent / f"evaluation_{pred_dir.name}.json")
    shutil.rmtree(pred_dir)
    return {
        "per_class": {str(k): v for k, v in evaluation.per_class_mean.items()},
        "mean": evaluation.mean_over_classes,
        "n_undefined": {str(k): v for k, v in evaluation.n_undefined.items()},
        "predict_seconds": seconds,
    }


def arm_config(arm: str, overrides: dict[str, Any], profile: Profile) -> Any:
    """The training configuration of one arm. ``paper``: the reference's recipe (``--preset paper``) at this
    schedule, its epoch-based settings scaled from its 300 epochs (filter rounds at 1/3 and 2/3, warm-up 20 or 5 of
    300, flips from 1/3)."""
    from nnfiltermatch.config import paper_values, resolve_config

    if arm in VARIANTS:
        return resolve_config({**overrides, **VARIANTS[arm]}, preset=profile.preset)
    if arm != "paper":
        return resolve_config({**overrides, "mode": arm}, preset=profile.preset)
    reference = paper_values(overrides.get("labeled_fraction"))
    third = max(1, round(profile.epochs / 3))
    scaled = {
        "filter_start": third,
        "filter_every": third,
        "flip_from_epoch": third,
        "warmup_epochs": max(1, round(reference["warmup_epochs"] * profile.epochs / reference["epochs"])),
    }
    return resolve_config({**overrides, **scaled, "mode": "filtermatch"}, preset="paper")


def _teacher_as_model(model: Path, state: dict, target: Path) -> Path | None:
    """A copy of the model folder whose final weights are the run's EMA teacher (None: the run has no teacher).

    Why: whether to predict with the teacher is chosen on the validation cases, and the teacher of the same run
    answers it without training again.
    """
    import torch

    from nnfiltermatch.runs import (
        DIGEST_KEY,
        STATE_KEY,
        checkpoint_weight_sets,
        load_checkpoint_safely,
        weights_digests,
    )

    if state.get("teacher") is None:
        return None
    if target.exists():
        shutil.rmtree(target)
    (target / "fold_all").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(model / name, target / name)
    checkpoint = load_checkpoint_safely(model / "fold_all" / "checkpoint_final.pth")
    checkpoint["network_weights"] = state["teacher"]
    # the weights changed on purpose: store their checksum, or loading the copy would (rightly) refuse it
    checkpoint["init_args"][STATE_KEY][DIGEST_KEY] = weights_digests(checkpoint_weight_sets(checkpoint))
    torch.save(checkpoint, target / "fold_all" / "checkpoint_final.pth")
    return target


def _schedule(profile: Profile, prepared: Any, seed: int) -> dict[str, Any]:
    """The training settings every arm of a profile shares, for one seed."""
    return {
        "seed": seed,
        "epochs": profile.epochs,
        "iters_per_epoch": profile.iters_per_epoch,
        "val_iters_per_epoch": profile.val_iters_per_epoch,
        "save_every": 10,
        "labeled_fraction": prepared.labeled_fraction,
        **profile.extra,
    }


def _settings_differ(kept: dict, config: Any) -> list[str]:
    """The training settings in which a finished run differs from ``config`` (a setting added since that run had
    its default value then)."""
    from nnfiltermatch.config import TrainConfig

    defaults, ours, theirs = TrainConfig().to_dict(), config.to_dict(), kept["config"]
    differ = [k for k, v in ours.items() if k != "extra" and theirs.get(k, defaults.get(k, v)) != v]
    # extra holds what training records (the labelled cases): compared where the kept run recorded it too
    their_extra = theirs.get("extra") or {}
    differ += [f"extra.{k}" for k, v in ours["extra"].items() if their_extra.get(k, v) != v]
    return sorted(differ)


def _other_finished_runs(out: Path, profile: Profile, prepared: Any, split: str, taken: set) -> list[dict]:
    """Finished runs of this schedule in ``out`` for arms or seeds not asked for this time (e.g. an arm run on
    fewer seeds), so that results.json holds every run of the schedule; each says its own seed."""
    found = []
    for done in sorted((out / "runs").glob("*/run.json")):
        kept = json.loads(done.read_text())
        arm = next((a for a in MODES if done.parent.name == f"{a}_seed{kept['seed']}"), None)
        if arm is None or (arm, kept["seed"]) in taken or kept.get("split", "test") != split:
            continue
        if not _settings_differ(kept, arm_config(arm, _schedule(profile, prepared, kept["seed"]), profile)):
            found.append({**kept, "mode": arm})
    return found


def run_experiment(
    exp: Experiment,
    profile: Profile,
    device: str,
    out: Path,
    modes: tuple[str, ...],
    prepared: Any,
    split: str = "test",
) -> dict:
    """Train every mode and seed, evaluate on ``split`` (``test`` also evaluates the validation cases, if any)."""
    from nnfiltermatch.commands.training import TrainResult, train
    from nnfiltermatch.commands.training_checks import finished_with, record_labelled_cases
    from nnfiltermatch.method.pool_filter import FilterRound
    from nnfiltermatch.runs import FILTER_DIRNAME, STATE_KEY, TRAINER_NAMES, load_checkpoint_safely, output_folder_for

    _use_folders(exp)
    configuration = configuration_for(exp, profile)
    runs: list[dict[str, Any]] = []
    for seed in profile.seeds:
        for mode in modes:
            run_dir = out / "runs" / f"{mode}_seed{seed}"
            done = run_dir / "run.json"
            config = arm_config(mode, _schedule(profile, prepared, seed), profile)
            record_labelled_cases(config, prepared)
            if done.is_file():  # resumable benchmark: finished runs are kept, if they ran this schedule
                kept = json.loads(done.read_text())
                differs = _settings_differ(kept, config)
                if differs:
                    sys.exit(
                        f"{done} was trained with other settings ({', '.join(differs)}): pass another --results "
                        "folder for this schedule, or delete that run to redo it"
                    )
                if kept.get("split", "test") != split:
                    sys.exit(f"{done} was evaluated on the {kept.get('split', 'test')} split, not {split}")
                runs.append(kept)
                continue
            print(f"[benchmark] {exp.dataset_key} {exp.labeled_key} {profile.name}: {mode} seed {seed}", flush=True)
            folder = output_folder_for(
                exp.dataset_name, TRAINER_NAMES[config.mode], prepared.plans_name, configuration, "all"
            )
            if config.deterministic and finished_with(folder, config):
                # the same deterministic computation finished already (e.g. a learning-curve run that did not read
                # the test cases): reuse the model, with the training time its log recorded
                trained = TrainResult(folder, folder / "checkpoint_final.pth")
                logged = load_checkpoint_safely(trained.final_checkpoint)["logging"]
                train_seconds = logged["epoch_end_timestamps"][-1] - logged["epoch_start_timestamps"][0]
                print(f"[benchmark] reusing the finished identical run in {folder}", flush=True)
            else:
                t0 = time.time()
                trained = train(
                    exp.dataset_name, configuration, "all", config, device, overwrite=True, final_validation=False
                )
                train_seconds = time.time() - t0
            if trained.supervised_stage_reused:  # selftrain's stage 1 is the supervised run: count its time too
                train_seconds += next(
                    (r["train_seconds"] for r in runs if r["mode"] == "supervised" and r["seed"] == seed), 0.0
                )
            model = trained.output_folder.parent
            validation = (
                _evaluate(exp, exp.validation_images, exp.validation_labels, model, run_dir / "validation", device)
                if exp.validation_images is not None
                else None
            )
            # the test cases are read only by final runs (split test), never while choosing a schedule or a default
            test = (
                _evaluate(exp, exp.test_images, exp.test_labels, model, run_dir / "test", device)
                if split == "test"
                else None
            )
            reported = test if test is not None else validation
            assert reported is not None
            rounds = [
                FilterRound.from_json(json.loads(p.read_text()))
                for p in sorted((trained.output_folder / FILTER_DIRNAME).glob("*.json"))
            ]
            state = load_checkpoint_safely(trained.final_checkpoint)["init_args"][STATE_KEY]
            teacher_model = (
                _teacher_as_model(model, state, exp.root / "teacher_model")
                if exp.validation_images is not None
                else None
            )
            validation_teacher = (
                _evaluate(
                    exp,
                    exp.validation_images,
                    exp.validation_labels,
                    teacher_model,
                    run_dir / "validation_teacher",
                    device,
                )
                if teacher_model is not None
                else None
            )
            record = {
                "mode": mode,
                "seed": seed,
                "split": split,
                "train_seconds": train_seconds,
                "predict_seconds": reported["predict_seconds"],
                "filter_seconds": sum(r.seconds for r in rounds),
                "filter_rounds": len(rounds),
                "supervised_stage_reused": trained.supervised_stage_reused,
                "ssl_start_epoch": state.get("ssl_start_epoch"),  # None: pseudo-labels never started
                "per_class": reported["per_class"],
                "mean": reported["mean"],
                "n_undefined": reported["n_undefined"],
                "validation": validation,
                "validation_teacher": validation_teacher,  # the same run predicting with its EMA teacher
                "config": config.to_dict(),
                "commit": _commit(),  # the code this run trained with (seeds of one table can differ)
            }
            atomic_write_text(done, json.dumps(record, indent=2, default=float))
            runs.append(record)
    runs += _other_finished_runs(out, profile, prepared, split, {(r["mode"], r["seed"]) for r in runs})
    return {
        "configuration": configuration,
        "labeled_ids": prepared.labeled_ids,
        "n_unlabeled": len(prepared.unlabeled_ids),
        "split": split,
        "runs": runs,
    }


def measure_cost(exp: Experiment, configuration: str, device: str, steps: int) -> dict:
    """Seconds per iteration of supervised and ssl in one process (interleaved), and peak memory per mode."""
    import subprocess

    _use_folders(exp)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "step_cost.py"),
            "-d",
            exp.dataset_name,
            "-c",
            configuration,
            "--device",
            device,
            "--steps",
            str(steps),
            "--out",
            str(exp.root / "step_cost"),
            *(["--compute-only"] if device == "cuda" else []),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads((exp.root / "step_cost" / "step_cost.json").read_text())


def _commit() -> str:
    """The code a result was measured with: the commit, marked when the working tree had changes."""
    import subprocess

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+changes" if git("status", "--porcelain", "--", "src") else "")


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def _shown(path: Path) -> str:
    """A path as the table shows it: relative to the repository when inside it, so tables do not name a machine."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _seeds_of(runs: list[dict], modes: list[str]) -> str:
    """``0, 1, 2``, or ``0, 1 (selftrain: 0)`` where an arm ran on other seeds than the rest."""
    by_mode = {m: sorted(r["seed"] for r in runs if r["mode"] == m) for m in modes}
    common = max(by_mode.values(), key=len, default=[])
    others = [f"{m}: {', '.join(map(str, seeds))}" for m, seeds in by_mode.items() if seeds != common]
    return ", ".join(map(str, common)) + (f" ({'; '.join(others)})" if others else "")


def p_value_text(p: float) -> str:
    """``< 0.001`` or ``= 0.123``: a p-value the way a reader expects it printed."""
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def summarise(exp: Experiment, profile: Profile, result: dict, cost: dict) -> tuple[dict, str]:
    from scipy.stats import ttest_rel

    runs = sorted(result["runs"], key=lambda r: (r["seed"], MODES.index(r["mode"])))  # seed order, as printed
    modes = [m for m in MODES if any(r["mode"] == m for r in runs)]
    summary: dict[str, Any] = {"modes": {}, "gain_over_supervised": {}}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        entry: dict[str, Any] = {"mean": {}, "per_class": {}}
        for metric in METRICS:
            entry["mean"][metric] = _mean_std([r["mean"][metric] for r in mine])
            for label in exp.labels:
                entry["per_class"].setdefault(str(label), {})[metric] = _mean_std(
                    [r["per_class"][str(label)][metric] for r in mine]
                )
        entry["train_seconds"] = statistics.fmean(r["train_seconds"] for r in mine)
        entry["filter_seconds"] = statistics.fmean(r["filter_seconds"] for r in mine)
        summary["modes"][mode] = entry
    sup = {r["seed"]: r["mean"]["dice"] for r in runs if r["mode"] == "supervised"}
    for mode in modes:
        if mode == "supervised" or not sup:
            continue
        pairs = [(r["mean"]["dice"], sup[r["seed"]]) for r in runs if r["mode"] == mode and r["seed"] in sup]
        gains = [a - b for a, b in pairs]
        p_value = float(ttest_rel([a for a, _ in pairs], [b for _, b in pairs]).pvalue) if len(pairs) > 1 else None
        summary["gain_over_supervised"][mode] = {
            "dice_gain_mean": statistics.fmean(gains),
            "seeds": [r["seed"] for r in runs if r["mode"] == mode and r["seed"] in sup],
            "per_seed": gains,
            "paired_t_p": p_value,
        }
    paper = PAPER.get((exp.dataset_key, exp.labeled_key))
    split = result.get("split", "test")
    split_labels = exp.test_labels if split == "test" else exp.validation_labels
    assert split_labels is not None
    n_cases = len([p for p in split_labels.iterdir() if not p.name.startswith(".")])
    lines = [
        f"### {exp.dataset_key}, labelled list `{exp.labeled_key}` ({len(result['labeled_ids'])} labelled / "
        f"{result['n_unlabeled']} unlabelled), profile `{profile.name}`",
        "",
        f"`{result['configuration']}`, {profile.epochs} epochs x {profile.iters_per_epoch} iterations, seeds "
        f"{_seeds_of(runs, modes)}; {split}: {n_cases} cases of {_shown(split_labels)}; metrics in voxels, "
        "mean ± std over seeds of the per-volume mean"
        + (
            f"; iterations per epoch fitted to a {profile.train_budget_seconds:.0f} s training budget from the "
            "measured step cost"
            if profile.train_budget_seconds
            else ""
        ),
        "",
        "| mode | class | Dice % | Jaccard % | HD95 | ASD | train s | filter s |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(pair: tuple[float, float], scale: float = 1.0, digits: int = 2) -> str:
        return f"{pair[0] * scale:.{digits}f} ± {pair[1] * scale:.{digits}f}"

    for mode in modes:
        entry = summary["modes"][mode]
        rows = [(exp.class_names[label], entry["per_class"][str(label)]) for label in exp.labels]
        rows.append(("mean", entry["mean"]))
        for name, v in rows:
            lines.append(
                f"| {mode} | {name} | {fmt(v['dice'], 100)} | {fmt(v['jaccard'], 100)} | "
                f"{fmt(v['hd95'])} | {fmt(v['asd'])} | {entry['train_seconds']:.0f} | "
                f"{entry['filter_seconds']:.0f} |"
            )
        if paper and mode in paper:
            d, j, h, a = paper[mode]
            lines.append(f"| {mode} (paper) | mean | {d:.2f} | {j:.2f} | {h:.2f} | {a:.2f} | | |")
    lines.append("")
    for mode, gain in summary["gain_over_supervised"].items():
        p = f", paired t-test p {p_value_text(gain['paired_t_p'])}" if gain["paired_t_p"] is not None else ""
        per_seed = ", ".join(f"seed {s} {g * 100:+.2f}" for s, g in zip(gain["seeds"], gain["per_seed"]))
        lines.append(
            f"- {mode} vs supervised: mean Dice gain {gain['dice_gain_mean'] * 100:+.2f} points ({per_seed}){p}"
        )
    for mode in modes:
        if mode != "supervised":
            starts = [r.get("ssl_start_epoch", "?") for r in runs if r["mode"] == mode]
            shown = ", ".join("never" if e is None else str(e) for e in starts)
            lines.append(f"- {mode}: pseudo-labels from epoch (per seed) {shown}")
    if "median_seconds" in cost:
        med = cost["median_seconds"]
        train_total = summary["modes"].get("filtermatch", {}).get("train_seconds")
        filt = summary["modes"].get("filtermatch", {}).get("filter_seconds")
        share = (
            f"; filter rounds took {filt:.0f} s of {train_total:.0f} s filtermatch training ({filt / train_total:.0%})"
            if train_total
            else ""
        )
        memory = "peak memory" if cost.get("device") == "cuda" else "resident memory the steps add"
        lines.append(
            f"- cost: {med['supervised']:.3f} s / supervised step, {med['ssl']:.3f} s / semi-supervised "
            f"step (ratio {cost['ratio_ssl_over_supervised']:.2f}, one process, median of "
            f"{cost['steps']} steps); {memory} {cost['peak_mib']['supervised']:.0f} vs "
            f"{cost['peak_mib']['ssl']:.0f} MiB{share}"
        )
        if "compute_only" in cost:
            c = cost["compute_only"]
            lines.append(
                f"- compute only (one batch reused, no data-loading waits): {c['median_seconds']['supervised']:.3f} "
                f"vs {c['median_seconds']['ssl']:.3f} s, ratio {c['ratio_ssl_over_supervised']:.2f}"
            )
    summary["cost"] = cost
    return summary, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(SETUPS), required=True)
    parser.add_argument("--labeled", required=True, help="hippocampus: 10pct|5pct; acdc: 3|7; la: 4|8")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu-small")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the profile's seeds")
    parser.add_argument("--epochs", type=int, help="override the profile's epochs (recorded in results.json)")
    parser.add_argument("--iters-per-epoch", type=int, help="override the profile's iterations per epoch")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=[m for m in MODES if m not in VARIANTS])
    parser.add_argument("--device", default=None)
    parser.add_argument("--shared", help="folder with hippocampus/, acdc/, la/ (default ../shared/data)")
    parser.add_argument("--work", type=Path, default=REPO / "work_dirs")
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument("--cost-steps", type=int, default=30, help="steps of the cost measurement (0: skip it)")
    parser.add_argument(
        "--train-budget",
        type=float,
        metavar="SECONDS",
        help="measure the step cost first, then set iterations per epoch so all runs train in about SECONDS "
        "(gpu-short: 300 by default)",
    )
    parser.add_argument("--num-processes", type=int, default=2, help="preprocessing processes (default 2)")
    parser.add_argument(
        "--split",
        choices=("test", "validation"),
        default="test",
        help="test (final runs: also evaluates the validation cases) or validation (choosing a schedule or a "
        "default: the test cases are not read); validation needs a profile with validation cases (cpu-long)",
    )
    args = parser.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    profile = PROFILES[args.profile]
    if args.seeds:
        profile = Profile(**{**asdict(profile), "seeds": tuple(args.seeds)})
    if args.epochs:
        profile = Profile(**{**asdict(profile), "epochs": args.epochs})
    if args.iters_per_epoch:
        profile = Profile(**{**asdict(profile), "iters_per_epoch": args.iters_per_epoch})
    if profile.validation_cases and args.dataset == "la":
        sys.exit(f"profile {profile.name} holds out validation cases: LA's 16 shared cases have none to spare")
    setup_options = {"validation_cases": profile.validation_cases} if profile.validation_cases else {}
    exp = SETUPS[args.dataset](_shared(args), args.work.resolve(), args.labeled, **setup_options)
    if args.split == "validation" and exp.validation_images is None:
        sys.exit(f"--split validation: profile {profile.name} holds out no validation cases (use cpu-long)")
    # a schedule other than the profile's, or the validation split, gets a folder of its own
    schedule = f"_{profile.epochs}x{profile.iters_per_epoch}" if args.epochs or args.iters_per_epoch else ""
    labeled_dir = args.labeled + ("_validation" if args.split == "validation" else "")
    out = args.results / args.dataset / (profile.name + schedule) / labeled_dir
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    modes = tuple(args.modes)
    prepared = prepare_experiment(exp, profile, args.num_processes)
    cost = None
    budget = args.train_budget or profile.train_budget_seconds
    if budget:
        cost = measure_cost(exp, configuration_for(exp, profile), device, args.cost_steps)
        if "median_seconds" not in cost:
            sys.exit(f"step-cost measurement failed:\n{cost['error']}")
        profile = fit_to_budget(profile, cost, modes, budget)
        print(f"[benchmark] {budget:.0f} s training budget: {profile.epochs} x {profile.iters_per_epoch}", flush=True)
    result = run_experiment(exp, profile, device, out, modes, prepared, args.split)
    if cost is None:
        cost = measure_cost(exp, result["configuration"], device, args.cost_steps) if args.cost_steps else {}
    summary, table = summarise(exp, profile, result, cost)
    command = " ".join(["python", "benchmarks/run.py", *sys.argv[1:]])
    payload = {
        "dataset": exp.dataset_key,
        "labeled": exp.labeled_key,
        "profile": asdict(profile),
        "device": device,
        "machine": platform.platform(),
        "command": command,
        "commit": _commit(),
        "wall_seconds": time.time() - started,
        **result,
        "summary": summary,
    }
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2, default=float))
    atomic_write_text(out / "results.md", table + f"\nReproduce: `{command}`\n")
    print(table)


if __name__ == "__main__":
    main()
