"""The headline table: one row per protocol, from the final runs of ``benchmarks/run.py`` (split test).

    .venv/bin/python benchmarks/headline.py --profile cpu-long

Reads ``results/<dataset>/<profile>/<labeled>/results.json`` for each protocol and, for the ceiling (every
training case labelled, supervised, same schedule), ``results/<dataset>/<profile>/all/results.json``. Writes
``results/headline.json`` (Dice as fractions, in seed order) and ``results/headline.md``: per protocol supervised,
self-training, the default mode, the ceiling, the share of the gap closed ``(ours - supervised) / (ceiling -
supervised)``, the paired gain per seed and its paired t-test.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from result_tables import p_value_text  # benchmarks/result_tables.py, beside this script

from nnfiltermatch.config import TrainConfig
from nnfiltermatch.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = (("hippocampus", "10pct"), ("acdc", "3"), ("hippocampus", "5pct"), ("acdc", "7"))
DEFAULT_MODE = TrainConfig().mode


def _by_seed(runs: list[dict], arm: str, key: Any) -> dict[int, float]:
    return {r["seed"]: key(r) for r in runs if r["mode"] == arm}


def headline_row(result: dict, ceiling: dict | None) -> dict[str, Any]:
    """One protocol: every arm's Dice per seed (seeds the arms share), per class, the gap closed, the paired test."""
    from scipy.stats import ttest_rel

    runs = result["runs"]
    arms = sorted({r["mode"] for r in runs})
    arm_seeds = {arm: sorted({r["seed"] for r in runs if r["mode"] == arm}) for arm in arms}
    # the paired comparison: the seeds both supervised and the default mode ran; other arms give their own seeds
    paired = [a for a in ("supervised", DEFAULT_MODE) if a in arm_seeds] or arms
    seeds = sorted(set.intersection(*(set(arm_seeds[a]) for a in paired)))
    dice = {arm: [_by_seed(runs, arm, lambda r: r["mean"]["dice"])[s] for s in arm_seeds[arm]] for arm in arms}
    labels = sorted(runs[0]["per_class"], key=int)
    per_class = {
        arm: {
            label: [
                _by_seed(runs, arm, lambda r, label=label: r["per_class"][label]["dice"])[s] for s in arm_seeds[arm]
            ]
            for label in labels
        }
        for arm in arms
    }
    hd95 = {arm: [_by_seed(runs, arm, lambda r: r["mean"]["hd95"])[s] for s in arm_seeds[arm]] for arm in arms}
    row: dict[str, Any] = {
        "dataset": result["dataset"],
        "labeled": result["labeled"],
        "profile": result["profile"]["name"],
        "configuration": result["configuration"],
        "iterations": result["profile"]["epochs"] * result["profile"]["iters_per_epoch"],
        "seeds": seeds,
        "default_mode": DEFAULT_MODE,
        "n_labeled": len(result["labeled_ids"]),
        "n_unlabeled": result["n_unlabeled"],
        "commit": result.get("commit"),
        "arm_seeds": arm_seeds,
        "dice": dice,
        "per_class_dice": per_class,
        "hd95": hd95,
    }
    if ceiling is not None:
        ceiling_runs = [r for r in ceiling["runs"] if r["mode"] == "supervised"]
        row["dice"]["ceiling"] = [r["mean"]["dice"] for r in sorted(ceiling_runs, key=lambda r: r["seed"])]
        row["ceiling_seeds"] = sorted(r["seed"] for r in ceiling_runs)
        row["per_class_dice"]["ceiling"] = {
            label: [r["per_class"][label]["dice"] for r in sorted(ceiling_runs, key=lambda r: r["seed"])]
            for label in labels
        }
    if "supervised" in dice and DEFAULT_MODE in dice:
        ours, supervised = (
            [_by_seed(runs, a, lambda r: r["mean"]["dice"])[s] for s in seeds] for a in (DEFAULT_MODE, "supervised")
        )
        gains = [a - b for a, b in zip(ours, supervised)]
        row["gain_per_seed"] = gains
        row["paired_t_p"] = float(ttest_rel(ours, supervised).pvalue) if len(seeds) > 1 else None
        if "ceiling" in row["dice"]:
            gap = statistics.fmean(row["dice"]["ceiling"]) - statistics.fmean(supervised)
            row["gap_closed"] = statistics.fmean(gains) / gap if gap > 0 else None
    return row


def _mean(values: list[float] | None, seeds: list[int] | None = None, paired: list[int] | None = None) -> str:
    """Mean Dice %; an arm run on other seeds than the paired comparison says which."""
    if not values:
        return "-"
    text = f"{100 * statistics.fmean(values):.1f}"
    return (
        text
        if seeds is None or seeds == paired
        else f"{text} (seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))})"
    )


def format_table(rows: list[dict]) -> str:
    lines = [
        "| protocol | iterations | supervised | self-training | ssl | paper recipe | "
        f"{DEFAULT_MODE} (default) | ceiling | gain per seed | gap closed | seeds | p |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        dice = row["dice"]
        gains = ", ".join(f"{100 * g:+.1f}" for g in row.get("gain_per_seed", []))
        closed = row.get("gap_closed")
        p = row.get("paired_t_p")
        seeds = row.get("arm_seeds", {})

        def arm(name: str, row: dict = row, dice: dict = dice, seeds: dict = seeds) -> str:
            return _mean(dice.get(name), seeds.get(name), row["seeds"])

        ceiling_seeds = row.get("ceiling_seeds")
        lines.append(
            f"| {row['dataset']} {row['labeled']} ({row['n_labeled']} / {row['n_unlabeled']}) | {row['iterations']} | "
            f"{arm('supervised')} | {arm('selftrain')} | {arm('ssl')} | {arm('paper')} | {arm(DEFAULT_MODE)} | "
            f"{_mean(dice.get('ceiling'), ceiling_seeds, ceiling_seeds)} | {gains} | "
            f"{'-' if closed is None else f'{closed:.0%}'} | {', '.join(map(str, row['seeds']))} | "
            f"{'-' if p is None else p_value_text(p).removeprefix('= ')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu-long")
    parser.add_argument("--results", type=Path, default=REPO / "results")
    args = parser.parse_args()
    rows = []
    for dataset, labeled in PROTOCOLS:
        source = args.results / dataset / args.profile / labeled / "results.json"
        if not source.is_file():
            print(f"{dataset} {labeled}: no {source} yet, left out")
            continue
        result = json.loads(source.read_text())
        if result.get("split", "test") != "test":
            raise SystemExit(f"{source} is a validation-split run: the headline reports final (test) runs only")
        ceiling_file = args.results / dataset / args.profile / "all" / "results.json"
        ceiling = json.loads(ceiling_file.read_text()) if ceiling_file.is_file() else None
        rows.append(headline_row(result, ceiling))
    atomic_write_text(args.results / "headline.json", json.dumps({"rows": rows}, indent=2))
    table = format_table(rows)
    atomic_write_text(args.results / "headline.md", table)
    print(table)


if __name__ == "__main__":
    main()
