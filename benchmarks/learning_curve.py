"""The supervised learning curve on the validation cases: Dice against iterations, and what each doubling gained.

    bash benchmarks/learning_curve.sh                # trains the schedules (run.py --split validation)
    .venv/bin/python benchmarks/learning_curve.py    # this: results/<dataset>/learning_curve_<labeled>.{json,md,png}

Reads ``results/<dataset>/<profile>_<E>x<I>/<labeled>_validation/results.json`` and, for the profile's own
schedule when it has no such folder, the validation metrics of its final runs (``<profile>/<labeled>/results.json``,
split test: the same models, scored on the same validation cases). The schedule is converged when a doubling gains
less than 1 Dice point (the gain issue's criterion); the table says where that holds, if anywhere.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

from nnfiltermatch.files import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
CLASS_NAMES = {"hippocampus": {"1": "anterior", "2": "posterior"}, "acdc": {"1": "RV", "2": "Myo", "3": "LV"}}


def _point(data: dict, epochs: int, iters_per_epoch: int, source: Path) -> dict | None:
    """One schedule's supervised validation scores; ``None`` when that run scored no validation cases."""
    runs = [r for r in data["runs"] if r["mode"] == "supervised"]
    scores = [r if r.get("split") == "validation" else r.get("validation") for r in runs]
    if not runs or any(score is None for score in scores):
        return None
    return {
        "iterations": epochs * iters_per_epoch,
        "epochs": epochs,
        "iters_per_epoch": iters_per_epoch,
        "configuration": data.get("configuration"),
        "seeds": [r["seed"] for r in runs],
        "dice": [score["mean"]["dice"] for score in scores],
        "per_class_dice": {k: [score["per_class"][k]["dice"] for score in scores] for k in scores[0]["per_class"]},
        "train_seconds": [r["train_seconds"] for r in runs],
        "commit": data.get("commit"),
        "source": str(source.relative_to(REPO)) if source.is_relative_to(REPO) else str(source),
    }


def collect(results: Path, dataset: str, profile: str, labeled: str) -> list[dict]:
    points: dict[int, dict] = {}
    for source in sorted((results / dataset).glob(f"{profile}_*x*/{labeled}_validation/results.json")):
        match = re.fullmatch(rf"{re.escape(profile)}_(\d+)x(\d+)", source.parents[1].name)
        point = _point(json.loads(source.read_text()), int(match[1]), int(match[2]), source) if match else None
        if point:
            points[point["iterations"]] = point
    final = results / dataset / profile / labeled / "results.json"
    if final.is_file():
        data = json.loads(final.read_text())
        point = _point(data, data["profile"]["epochs"], data["profile"]["iters_per_epoch"], final)
        if point and point["iterations"] not in points:
            points[point["iterations"]] = point
    return [points[k] for k in sorted(points)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="hippocampus")
    parser.add_argument("--profile", default="cpu-long")
    parser.add_argument("--labeled", default="10pct")
    parser.add_argument("--results", type=Path, default=REPO / "results")
    args = parser.parse_args()
    points = collect(args.results, args.dataset, args.profile, args.labeled)
    if not points:
        raise SystemExit("no learning-curve runs found: run benchmarks/learning_curve.sh first")
    lines = [
        "| iterations | schedule | seeds | mean Dice % | per class % | gain over half the iterations | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    previous: float | None = None
    for point in points:
        dice = 100 * statistics.fmean(point["dice"])
        classes = " / ".join(f"{100 * statistics.fmean(v):.1f}" for v in point["per_class_dice"].values())
        gain = f"{dice - previous:+.1f}" if previous is not None else "-"
        lines.append(
            f"| {point['iterations']} | {point['epochs']} x {point['iters_per_epoch']} | "
            f"{', '.join(map(str, point['seeds']))} | {dice:.1f} | {classes} | {gain} | "
            f"{statistics.fmean(point['train_seconds']):.0f} |"
        )
        previous = dice
    table = "\n".join(lines) + "\n"
    stem = args.results / args.dataset / f"learning_curve_{args.labeled}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps({"points": points}, indent=2))
    atomic_write_text(stem.with_suffix(".md"), table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [p["iterations"] for p in points]
    ax.plot(xs, [100 * statistics.fmean(p["dice"]) for p in points], "o-", label="mean")
    names = CLASS_NAMES.get(args.dataset, {})
    for label in points[0]["per_class_dice"]:
        ys = [100 * statistics.fmean(p["per_class_dice"][label]) for p in points]
        ax.plot(xs, ys, ".--", label=names.get(label, f"class {label}"))
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"training iterations ({points[-1]['configuration'] or '?'}, batch 2)")
    ax.set_ylabel("validation Dice %")
    ax.set_title(f"supervised, {args.dataset} {args.labeled}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    partial = stem.parent / (stem.name + ".partial.png")
    fig.savefig(partial, dpi=120)
    partial.replace(stem.with_suffix(".png"))
    print(table)


if __name__ == "__main__":
    main()
