"""``nnfiltermatch demo``: the whole job on the shipped Hippocampus subset, supervised vs nnFilterMatch.

Prepare with a 10% labelled budget, train both modes on the CPU-sized plan, predict the held-out test split,
evaluate, and print a side-by-side table (also written to ``results.md`` and ``results.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nnfiltermatch.config import resolve_config
from nnfiltermatch.files import atomic_write_text
from nnfiltermatch.method.pool_filter import FilterRound

DEMO_DATASET = "Dataset901_HippocampusSubset"
SHIPPED = Path(__file__).resolve().parents[3] / "data" / DEMO_DATASET
CONFIGURATION = "3d_fullres_cpu"
LABELED_FRACTION = 0.1
CLASS_NAMES = {1: "anterior", 2: "posterior"}


@dataclass(frozen=True)
class DemoSchedule:
    epochs: int
    iters_per_epoch: int
    val_iters_per_epoch: int
    modes: tuple[str, ...]


FULL = DemoSchedule(epochs=30, iters_per_epoch=60, val_iters_per_epoch=5, modes=("supervised", "filtermatch"))
# quick: 2,000 iterations, at which the default mode segments both classes here (8 x 150 did
# not: its pseudo-labels never started and both models stayed at 0.46 mean Dice)
QUICK = DemoSchedule(epochs=10, iters_per_epoch=200, val_iters_per_epoch=4, modes=("supervised", "filtermatch"))


def _set_folders(out: Path) -> dict[str, str]:
    """Honour nnU-Net's environment variables when set; otherwise use folders under ``out``."""
    folders = {}
    for name, sub in (
        ("nnUNet_raw", "nnUNet_raw"),
        ("nnUNet_preprocessed", "nnUNet_preprocessed"),
        ("nnUNet_results", "nnUNet_results"),
    ):
        value = os.environ.get(name) or str(out / sub)
        Path(value).mkdir(parents=True, exist_ok=True)
        os.environ[name] = value
        folders[name] = value
    return folders


def _copy_dataset(raw_root: Path) -> Path:
    if not SHIPPED.is_dir():
        raise FileNotFoundError(f"the shipped demo data is missing: {SHIPPED} (run the demo from a clone of the repo)")
    target = raw_root / DEMO_DATASET
    if not target.is_dir():
        partial = raw_root / (DEMO_DATASET + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        shutil.copytree(SHIPPED, partial)
        partial.rename(target)
    return target


def run_demo(out: Path, quick: bool = False, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Run everything; returns the results dict that is also written to ``out/results.json``."""
    from nnfiltermatch.commands.predict import predict_folder
    from nnfiltermatch.commands.training import train
    from nnfiltermatch.data.preparation import prepare
    from nnfiltermatch.evaluation.evaluate import evaluate_folders
    from nnfiltermatch.runs import FILTER_DIRNAME

    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    folders = _set_folders(out)
    raw = _copy_dataset(Path(folders["nnUNet_raw"]))
    schedule = QUICK if quick else FULL
    started = time.time()
    print(f"[demo] preparing {DEMO_DATASET}: {LABELED_FRACTION:.0%} of imagesTr labelled, the rest unlabelled")
    prepared = prepare(DEMO_DATASET, [CONFIGURATION], labeled_fraction=LABELED_FRACTION, seed=seed, num_processes=1)
    results: dict[str, Any] = {
        "dataset": DEMO_DATASET,
        "configuration": CONFIGURATION,
        "quick": quick,
        "device": device,
        "seed": seed,
        "labeled": prepared.labeled_ids,
        "n_unlabeled": len(prepared.unlabeled_ids),
        "schedule": {k: v for k, v in schedule.__dict__.items() if k != "modes"},
        "modes": {},
    }
    for mode in schedule.modes:
        print(f"[demo] training {mode}: {schedule.epochs} epochs x {schedule.iters_per_epoch} iterations")
        config = resolve_config(
            {
                "mode": mode,
                "seed": seed,
                "epochs": schedule.epochs,
                "iters_per_epoch": schedule.iters_per_epoch,
                "val_iters_per_epoch": schedule.val_iters_per_epoch,
                "save_every": 10,
            }
        )
        t0 = time.time()
        trained = train(DEMO_DATASET, CONFIGURATION, "all", config, device, overwrite=True, final_validation=False)
        train_seconds = time.time() - t0
        pred_dir = out / "predictions" / mode
        t0 = time.time()
        predict_folder(
            raw / "imagesTs", pred_dir, trained.output_folder.parent, folds=["all"], device=device, mirroring=False
        )
        predict_seconds = time.time() - t0
        evaluation = evaluate_folders(raw / "labelsTs", pred_dir, labels=[1, 2], units="voxel", progress=False)
        evaluation.to_json(out / f"evaluation_{mode}.json")
        evaluation.to_csv(out / f"evaluation_{mode}.csv")
        rounds = sorted((trained.output_folder / FILTER_DIRNAME).glob("*.json"))
        filter_seconds = sum(FilterRound.from_json(json.loads(p.read_text())).seconds for p in rounds)
        results["modes"][mode] = {
            "model": str(trained.output_folder),
            "train_seconds": round(train_seconds, 1),
            "filter_seconds": round(filter_seconds, 1),
            "filter_rounds": len(rounds),
            "predict_seconds": round(predict_seconds, 1),
            "per_class": {
                str(label): {m: evaluation.per_class_mean[label][m] for m in ("dice", "jaccard", "hd95", "asd")}
                for label in (1, 2)
            },
            "mean": {m: evaluation.mean_over_classes[m] for m in ("dice", "jaccard", "hd95", "asd")},
            "n_undefined": {str(k): v for k, v in evaluation.n_undefined.items()},
        }
    results["total_seconds"] = round(time.time() - started, 1)
    table = format_results(results)
    print(table)
    atomic_write_text(out / "results.md", table + "\n")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    return results


def format_results(results: dict[str, Any]) -> str:
    """Markdown table: per mode and class Dice / Jaccard / HD95 / ASD (voxels), plus time taken."""
    lines = [
        f"Hippocampus subset, {len(results['labeled'])} labelled / {results['n_unlabeled']} unlabelled training "
        f"cases, 20 test cases, `{results['configuration']}`, {results['schedule']['epochs']} epochs x "
        f"{results['schedule']['iters_per_epoch']} iterations, seed {results['seed']}, device {results['device']}",
        "",
        "| mode | class | Dice | Jaccard | HD95 (vox) | ASD (vox) | train s | filter s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in results["modes"].items():
        rows = [(CLASS_NAMES[int(label)], v) for label, v in r["per_class"].items()] + [("mean", r["mean"])]
        for name, v in rows:
            lines.append(
                f"| {mode} | {name} | {v['dice']:.3f} | {v['jaccard']:.3f} | {v['hd95']:.2f} | {v['asd']:.2f} | "
                f"{r['train_seconds']:.0f} | {r['filter_seconds']:.0f} |"
            )
    lines.append("")
    supervised = results["modes"].get("supervised")
    for mode, r in results["modes"].items():
        if supervised is not None and mode != "supervised":
            gain = 100 * (r["mean"]["dice"] - supervised["mean"]["dice"])
            lines.append(f"{mode} vs supervised: {gain:+.1f} mean Dice points (paired runs: same seed and batches).")
    lines.append(f"Total time {results['total_seconds']:.0f} s (prepare, trainings, prediction, evaluation).")
    return "\n".join(lines)
