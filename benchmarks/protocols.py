"""The benchmark's protocols: compute profiles, and the dataset set-ups (Hippocampus, ACDC, LA) and label budgets.

A set-up lays out nnU-Net's raw dataset once under the work folder (a seeded held-out test split and, for a profile
with ``validation_cases``, a validation carve-out that training never reads), writes the labelled-cases list of the
label budget (``--labeled``) and names the folders the experiment prepares, trains and evaluates in.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


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


@dataclass
class Experiment:
    """One protocol laid out on disk: the dataset, its labelled list, and the folders it trains and is scored in."""

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


def shared_folder(given: str | Path | None) -> Path:
    """The shared data folder: ``given`` (``--shared``), or ``../shared/data`` beside the repository."""
    shared = Path(given) if given else REPO.parent / "shared" / "data"
    if not shared.is_dir():
        sys.exit(f"shared data folder {shared} not found: pass --shared PATH (see ../shared/data/README.md)")
    return shared


def _link_case(src_image: Path, src_label: Path, images: Path, labels: Path, case: str) -> None:
    (images / f"{case}_0000.nii.gz").symlink_to(src_image.resolve())
    (labels / f"{case}.nii.gz").symlink_to(src_label.resolve())


def write_split_dataset(
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
    write_split_dataset(
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
        labelled_patients = {case.split("_")[0] for case in read_case_list(raw / "labeled_7.txt")}  # 7 contains 3
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
        write_split_dataset(
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


def read_case_list(path: Path) -> list[str]:
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
        labeled = set(read_case_list(labeled_list))
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


def use_folders(exp: Experiment) -> None:
    """nnU-Net's folders for this experiment: one prepared labelled set per preprocessed root."""
    os.environ["nnUNet_raw"] = str(exp.raw_root)
    os.environ["nnUNet_preprocessed"] = str(exp.root / "nnUNet_preprocessed")
    os.environ["nnUNet_results"] = str(exp.root / "nnUNet_results")
    for key in ("nnUNet_preprocessed", "nnUNet_results"):
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)


def configuration_for(exp: Experiment, profile: Profile) -> str:
    return profile.configuration_3d if exp.dimension == "3d" else profile.configuration_2d


def prepare_experiment(exp: Experiment, profile: Profile, num_processes: int, planner: str | None = None) -> Any:
    """Plan and preprocess the experiment's configuration with nnU-Net's ``planner`` (its ``-pl`` name; default
    nnU-Net's ExperimentPlanner), the ``_cpu`` configurations added to the plans it writes."""
    from nnfiltermatch.data.preparation import prepare

    use_folders(exp)
    return prepare(
        exp.dataset_name,
        [configuration_for(exp, profile)],
        labeled_list=exp.labeled_list,
        num_processes=num_processes,
        allow_no_unlabeled=exp.labeled_key == "all",
        planner=planner,
    )
