"""Statistics and tables of the benchmark's runs: mean ± std over seeds, the gain over supervised paired by seed with
its paired t-test, the paper's numbers beside ours, and the markdown of ``results.md``."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import numpy as np
from arms import MODES
from protocols import REPO, Experiment, Profile

METRICS = ("dice", "jaccard", "hd95", "asd")

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
