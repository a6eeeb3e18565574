"""The active-learning loop benchmark: is the next model better if we label the cases `query` picks, or random ones?

    .venv/bin/python benchmarks/al_loop.py                       # Hippocampus, cpu-long schedule (hours)
    .venv/bin/python benchmarks/al_loop.py --quick               # the shipped subset, minutes: a smoke run

Each arm (strategy, seed) runs the annotation rounds the README describes, by the same commands a user types:
round 0 trains on ``--start`` labelled cases (drawn with the seed, the same for every strategy of that seed, trained
once and copied); each round then runs ``query --export`` (``-n --add`` picks), reveals the hidden true labels of
the picks into the export's ``labelsTr/`` (the annotator), ``prepare --add-labels`` and ``train --round K``. Every
round's model is scored once on the test cases (Hippocampus: the 50-case test split of ``benchmarks/run.py``; the
20 validation cases stay unread). Arms have their own ``nnUNet_preprocessed`` and ``nnUNet_results``; the raw
dataset (links to ../shared/data) is shared.

Writes ``results/al_loop/<profile>/runs/<arm>_round<K>.json`` as each round lands (resumable: finished rounds are
kept), then ``results.json``, ``results.md`` (test Dice per strategy and labelled count, the area under the budget
curve, the paired difference to ``random`` per round) and ``dice_vs_labels.png`` with the all-labels ceiling of
``benchmarks/run.py`` at the same schedule when it exists.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nnfiltermatch.files import atomic_write_text

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
from protocols import PROFILES, Profile, setup_hippocampus, shared_folder, write_split_dataset  # noqa: E402

REPO = BENCHMARKS.parent
BASELINE = "random"
STRATEGIES = ("random", "foreground-random", "entropy")


@dataclass(frozen=True)
class Loop:
    """One loop protocol: the data, the budget steps and the training schedule of every round."""

    name: str
    configuration: str
    start: int
    add: int
    rounds: int
    epochs: int
    iters_per_epoch: int
    val_iters_per_epoch: int
    labels: tuple[int, ...] = (1, 2)


def quick_loop() -> Loop:
    return Loop("quick", "3d_fullres_cpu", start=4, add=2, rounds=1, epochs=2, iters_per_epoch=5, val_iters_per_epoch=2)


def profile_loop(profile: Profile, start: int, add: int, rounds: int) -> Loop:
    return Loop(
        profile.name, profile.configuration_3d, start, add, rounds, profile.epochs, profile.iters_per_epoch,
        profile.val_iters_per_epoch,
    )  # fmt: skip


@dataclass(frozen=True)
class Data:
    raw_root: Path
    dataset_name: str
    pool: list[str]  # training cases, labels hidden until picked
    test_images: Path
    test_labels: Path

    @property
    def dataset_id(self) -> str:
        """``DatasetXXX_Name`` -> ``XXX``: the ID the commands take (907 with cpu-long's validation carve-out)."""
        return str(int(self.dataset_name[len("Dataset") : len("Dataset") + 3]))


def setup_data(args: argparse.Namespace, loop: Loop) -> Data:
    """Hippocampus with run.py's split (907; 904 for a profile without validation cases), or for ``--quick`` the
    shipped subset's 40 / 20 cases (909)."""
    work = args.work.resolve() / "al_loop"
    if loop.name == "quick":
        src = REPO / "data" / "Dataset901_HippocampusSubset"
        name = "Dataset909_HippocampusLoopQuick"
        raw = work / "quick" / "nnUNet_raw" / name
        pool = sorted(p.name[: -len("_0000.nii.gz")] for p in (src / "imagesTr").glob("*_0000.nii.gz"))
        test = sorted(p.name[: -len("_0000.nii.gz")] for p in (src / "imagesTs").glob("*_0000.nii.gz"))[:4]
        sources = {c: (src / "imagesTr" / f"{c}_0000.nii.gz", src / "labelsTr" / f"{c}.nii.gz") for c in pool}
        sources |= {c: (src / "imagesTs" / f"{c}_0000.nii.gz", src / "labelsTs" / f"{c}.nii.gz") for c in test}
        write_split_dataset(
            raw, {"Tr": pool, "Ts": test}, sources.__getitem__, json.loads((src / "dataset.json").read_text())
        )
        return Data(raw.parent, name, pool, raw / "imagesTs", raw / "labelsTs")
    exp = setup_hippocampus(
        shared_folder(args.shared), work, "10pct", validation_cases=PROFILES[loop.name].validation_cases
    )
    raw = exp.raw_root / exp.dataset_name
    pool = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTr").glob("*.nii.gz"))
    return Data(exp.raw_root, exp.dataset_name, pool, exp.test_images, exp.test_labels)


class Arm:
    """One (strategy, seed) arm: its nnU-Net folders and the commands of its rounds."""

    def __init__(self, work: Path, data: Data, loop: Loop, name: str, seed: int) -> None:
        self.root, self.data, self.loop, self.name, self.seed = work / name, data, loop, name, seed
        self.env = {
            **os.environ,
            "nnUNet_raw": str(data.raw_root),
            "nnUNet_preprocessed": str(self.root / "nnUNet_preprocessed"),
            "nnUNet_results": str(self.root / "nnUNet_results"),
            "nnUNet_compile": "0",
        }

    def command(self, *args: str) -> None:
        """One ``nnfiltermatch`` command, as a user runs it; its output goes to the arm's log."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / "commands.log").open("a") as log:
            log.write(f"\n$ nnfiltermatch {' '.join(args)}\n")
            log.flush()
            done = subprocess.run(
                [sys.executable, "-m", "nnfiltermatch.cli", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        if done.returncode:
            raise SystemExit(
                f"{self.name}: `nnfiltermatch {' '.join(args)}` failed (rc {done.returncode}); see {log.name}"
            )

    def recorded_rounds(self) -> int:
        """The last annotation round in the arm's rounds.json (0 before the first ``--add-labels``)."""
        record = self.root / "nnUNet_preprocessed" / self.data.dataset_name / "rounds.json"
        if not record.is_file():
            return 0
        return max((int(r["round"]) for r in json.loads(record.read_text())["rounds"]), default=0)

    def model_args(self, round_number: int) -> list[str]:
        return ["-d", self.data.dataset_id, "-c", self.loop.configuration, "-f", "all", "--mode", "supervised",
                "--round", str(round_number)]  # fmt: skip

    def prepare(self, labelled: list[str]) -> None:
        listing = self.root / "labelled_start.txt"
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(listing, "\n".join(labelled) + "\n")
        self.command("prepare", "-d", self.data.dataset_id, "-c", self.loop.configuration,
                     "--labeled-list", str(listing), "-np", "1")  # fmt: skip

    def train(self, round_number: int) -> float:
        loop = self.loop
        started = time.time()
        self.command(
            "train", *self.model_args(round_number), "--seed", str(self.seed), "--deterministic", "--epochs",
            str(loop.epochs), "--iters-per-epoch", str(loop.iters_per_epoch), "--val-iters-per-epoch",
            str(loop.val_iters_per_epoch), "--save-every", "10", "--no-final-validation", "--overwrite", "--device",
            "cpu",
        )  # fmt: skip
        return time.time() - started

    def query_and_annotate(self, round_number: int, strategy: str) -> list[str]:
        """``query --export`` with the model of round K-1, then the oracle writes the picks' true labels."""
        export = self.root / f"export_round{round_number}"
        self.command("query", *self.model_args(round_number - 1), "--strategy", strategy, "--seed", str(self.seed),
                     "-n", str(self.loop.add), "--export", str(export), "--overwrite", "--device", "cpu")  # fmt: skip
        with (export / "selection.csv").open() as f:
            picks = [row["case"] for row in csv.DictReader(f)]
        for case in picks:
            shutil.copyfile(
                self.data.raw_root / self.data.dataset_name / "labelsTr" / f"{case}.nii.gz",
                export / "labelsTr" / f"{case}.nii.gz",
            )
        self.command("prepare", "-d", self.data.dataset_id, "--add-labels", str(export / "labelsTr"))
        return picks

    def score(self, round_number: int) -> dict[str, Any]:
        """Test Dice of round K's model (voxels, no mirroring, as benchmarks/run.py scores)."""
        from nnfiltermatch.evaluation.evaluate import evaluate_folders

        predictions = self.root / f"test_round{round_number}"
        self.command("predict", "-i", str(self.data.test_images), "-o", str(predictions),
                     *self.model_args(round_number), "--no-mirroring", "--overwrite", "--device", "cpu")  # fmt: skip
        evaluation = evaluate_folders(
            self.data.test_labels, predictions, labels=list(self.loop.labels), units="voxel", progress=False
        )
        shutil.rmtree(predictions)
        return {
            "per_class": {str(k): v for k, v in evaluation.per_class_mean.items()},
            "mean": evaluation.mean_over_classes,
        }


def run_arm(work: Path, out: Path, data: Data, loop: Loop, strategy: str, seed: int) -> list[dict[str, Any]]:
    """Every round of one arm, each kept as a JSON file the moment it is scored."""
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    start = Arm(work, data, loop, f"start_seed{seed}", seed)
    first = runs / f"start_seed{seed}_round0.json"
    start_cases = sorted(np.random.default_rng(seed).choice(data.pool, size=loop.start, replace=False).tolist())
    if not first.is_file():
        shutil.rmtree(start.root, ignore_errors=True)
        start.prepare(start_cases)
        seconds = start.train(0)
        record = {"round": 0, "labelled": start_cases, "added": [], "train_seconds": seconds, **start.score(0)}
        atomic_write_text(first, json.dumps(record, indent=2))
    records = [json.loads(first.read_text())]
    arm = Arm(work, data, loop, f"{strategy}_seed{seed}", seed)
    done = sorted(runs.glob(f"{arm.name}_round*.json"), key=lambda p: int(p.stem.rsplit("round", 1)[1]))
    if not done or arm.recorded_rounds() != len(done):
        # resume after the last scored round only where the arm's folder is in that state (a round killed after its
        # --add-labels cannot be undone): otherwise start the arm again from round 0 (deterministic: same result)
        for stale in done:
            stale.unlink()
        done = []
        shutil.rmtree(arm.root, ignore_errors=True)
        for folder in ("nnUNet_preprocessed", "nnUNet_results"):
            shutil.copytree(start.root / folder, arm.root / folder, symlinks=True)
    records += [json.loads(p.read_text()) for p in done]
    for round_number in range(len(records), loop.rounds + 1):
        print(f"[al-loop] {strategy} seed {seed}: round {round_number}", flush=True)
        added = arm.query_and_annotate(round_number, strategy)
        seconds = arm.train(round_number)
        labelled = sorted(records[-1]["labelled"] + added)
        record = {"round": round_number, "labelled": labelled, "added": added, "train_seconds": seconds,
                  **arm.score(round_number)}  # fmt: skip
        atomic_write_text(runs / f"{arm.name}_round{round_number}.json", json.dumps(record, indent=2))
        records.append(record)
    return records


def budget_area(counts: list[int], dice: list[float]) -> float:
    """Area under the Dice-vs-labelled-cases curve over its range, as a mean Dice (trapezoids)."""
    if len(counts) < 2:
        return dice[0]
    return float(np.trapezoid(dice, counts) / (counts[-1] - counts[0]))


def summarise(loop: Loop, arms: dict[str, dict[int, list[dict]]], ceiling: float | None) -> tuple[dict, str]:
    """Per strategy and round: labelled count, mean test Dice over seeds, per-seed values, gain over random."""
    seeds = sorted(set.intersection(*(set(by_seed) for by_seed in arms.values())))
    summary: dict[str, Any] = {"seeds": seeds, "ceiling": ceiling, "strategies": {}}
    for strategy, by_seed in arms.items():
        dice = [[r["mean"]["dice"] for r in by_seed[s]] for s in seeds]
        counts = [len(r["labelled"]) for r in by_seed[seeds[0]]]
        summary["strategies"][strategy] = {
            "labelled": counts,
            "dice": dice,  # [seed][round]
            "mean_dice": [statistics.fmean(column) for column in zip(*dice)],
            "budget_area": [budget_area(counts, row) for row in dice],
        }
    lines = [
        f"### Active-learning loop, {loop.name}: +{loop.add} cases per round from {loop.start}, seeds "
        f"{', '.join(map(str, seeds))}",
        "",
        f"`{loop.configuration}`, {loop.epochs} x {loop.iters_per_epoch} iterations per round, supervised; test Dice % "
        "(mean over seeds; per seed in brackets); area = mean Dice under the budget curve",
        "",
        "| strategy | " + " | ".join(f"{n} labelled" for n in summary["strategies"][BASELINE]["labelled"])
        + " | area | area - random (per seed) |",
        "|---|" + "---|" * (loop.rounds + 3),
    ]  # fmt: skip
    base = summary["strategies"].get(BASELINE)
    for strategy, row in summary["strategies"].items():
        cells = [
            f"{100 * m:.1f} ({', '.join(f'{100 * d[k]:.1f}' for d in row['dice'])})"
            for k, m in enumerate(row["mean_dice"])
        ]
        area = statistics.fmean(row["budget_area"])
        paired = (
            ", ".join(f"{100 * (a - b):+.1f}" for a, b in zip(row["budget_area"], base["budget_area"]))
            if base and strategy != BASELINE
            else "-"
        )
        lines.append(f"| {strategy} | {' | '.join(cells)} | {100 * area:.1f} | {paired} |")
    if base:
        lines += ["", "Paired difference to random per round (mean over seeds, Dice points):", ""]
        for strategy, row in summary["strategies"].items():
            if strategy == BASELINE:
                continue
            diffs = [
                statistics.fmean(100 * (a[k] - b[k]) for a, b in zip(row["dice"], base["dice"]))
                for k in range(len(row["mean_dice"]))
            ]
            lines.append(f"- {strategy}: " + ", ".join(f"round {k} {d:+.1f}" for k, d in enumerate(diffs)))
    if ceiling is not None:
        lines += ["", f"Ceiling (every training case labelled, same schedule, benchmarks/run.py): {100 * ceiling:.1f}"]
    return summary, "\n".join(lines) + "\n"


def plot(summary: dict, loop: Loop, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for strategy, row in summary["strategies"].items():
        ax.plot(row["labelled"], [100 * m for m in row["mean_dice"]], "o-", label=strategy)
    if summary["ceiling"] is not None:
        ax.axhline(100 * summary["ceiling"], color="grey", linestyle="--", label="all labels")
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("test Dice % (mean over seeds)")
    ax.set_title(f"active learning, {loop.configuration}, seeds {', '.join(map(str, summary['seeds']))}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    partial = path.with_name(path.stem + ".partial.png")
    fig.savefig(partial, dpi=120)
    partial.replace(path)


def _ceiling(results: Path, loop: Loop) -> float | None:
    source = results / "hippocampus" / loop.name / "all" / "results.json"
    if loop.name == "quick" or not source.is_file():
        return None
    runs = json.loads(source.read_text())["runs"]
    return statistics.fmean(r["mean"]["dice"] for r in runs if r["mode"] == "supervised")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--profile", choices=["cpu-long", "cpu-small"], default="cpu-long")
    parser.add_argument("--quick", action="store_true", help="the shipped subset, 2 epochs x 5 iterations, 1 round")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--start", type=int, default=5, help="labelled cases of round 0 (default 5)")
    parser.add_argument("--add", type=int, default=5, help="cases labelled per round (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="annotation rounds after round 0 (default 3)")
    parser.add_argument("--shared", type=Path, help="default ../shared/data")
    parser.add_argument("--work", type=Path, default=REPO / "work_dirs")
    parser.add_argument("--results", type=Path, default=REPO / "results")
    args = parser.parse_args()
    if BASELINE not in args.strategies:
        parser.error(f"--strategies must include {BASELINE}: every strategy is compared with it")
    if min(args.start, args.add, args.rounds) < 1:
        parser.error("--start, --add and --rounds must be at least 1")
    loop = quick_loop() if args.quick else profile_loop(PROFILES[args.profile], args.start, args.add, args.rounds)
    data = setup_data(args, loop)
    if loop.start + loop.add * loop.rounds > len(data.pool):
        parser.error(f"{loop.start} + {loop.rounds} x {loop.add} cases exceed the pool of {len(data.pool)}")
    out = args.results / "al_loop" / loop.name
    work = args.work.resolve() / "al_loop" / loop.name
    started = time.time()
    arms = {s: {seed: run_arm(work, out, data, loop, s, seed) for seed in args.seeds} for s in args.strategies}
    summary, table = summarise(loop, arms, _ceiling(args.results, loop))
    command = " ".join(["python", "benchmarks/al_loop.py", *sys.argv[1:]])
    payload = {"loop": asdict(loop), "command": command, "wall_seconds": time.time() - started, **summary}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2))
    atomic_write_text(out / "results.md", table + f"\nReproduce: `{command}`\n")
    plot(summary, loop, out / "dice_vs_labels.png")
    print(table)


if __name__ == "__main__":
    main()
