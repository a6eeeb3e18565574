"""Reports and plots: the semi-supervised side of training progress, next to nnU-Net's own progress.png."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

from nnfiltermatch.files import atomic_write_bytes, atomic_write_text
from nnfiltermatch.runs import (
    LATEST_QUERY,
    collect_filter_rounds,
    current_checkpoint,
    load_checkpoint_safely,
    resolve_fold_dir,
    trainer_state,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SSL_PROGRESS_PNG = "progress_ssl.png"


def plot_ssl_progress(logging: dict[str, list[Any]], output_folder: Path) -> Path | None:
    """Supervised vs unsupervised loss, confident fraction, unlabelled weight and pool size per epoch."""
    n = min(len(logging.get(k, [])) for k in ("sup_losses", "unsup_losses", "confident_fraction", "pool_size"))
    if n == 0:
        return None
    epochs = list(range(n))
    fig, axes = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    axes[0].plot(epochs, logging["sup_losses"][:n], label="supervised loss", color="tab:blue")
    axes[0].plot(epochs, logging["unsup_losses"][:n], label="unsupervised loss", color="tab:orange")
    if "val_losses" in logging:
        axes[0].plot(epochs, logging["val_losses"][:n], label="validation loss", color="tab:red", ls="--")
    axes[0].set_ylabel("loss")
    axes[0].legend(loc="upper right")
    axes[1].plot(epochs, logging["confident_fraction"][:n], label="unlabelled voxels above tau", color="tab:green")
    if "unsup_weight" in logging:
        axes[1].plot(epochs, logging["unsup_weight"][:n], label="unlabelled loss weight", color="tab:purple")
    if "ema_fg_dice" in logging:
        axes[1].plot(epochs, logging["ema_fg_dice"][:n], label="pseudo Dice (moving avg.)", color="black")
    axes[1].set_ylim(-0.02, max(1.02, max((w for w in logging.get("unsup_weight", [0])[:n]), default=0) + 0.05))
    axes[1].legend(loc="lower right")
    axes[2].step(epochs, logging["pool_size"][:n], where="post", color="tab:brown")
    axes[2].set_ylabel("unlabelled pool size")
    axes[2].set_xlabel("epoch")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return atomic_write_bytes(Path(output_folder) / SSL_PROGRESS_PNG, buffer.getvalue())


# ----- the HTML report --------------------------------------------------------------------------------------------
REPORT_NAME = "report.html"
_NOT_EVALUATIONS = {"plans.json", "dataset.json", "dataset_fingerprint.json", "nnfiltermatch_config.json", "debug.json"}
_COLOURS = {"kept": "#1f77b4", "dropped": "#ff7f0e", "cut": "#d62728"}


class ReportError(ValueError):
    """The report cannot be built; the message names the folder or file and what is missing."""


def _figure_png(fig: Any) -> str:
    """A matplotlib figure as a base64 data URI, so the HTML file needs nothing beside it."""
    import base64

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _series(logging: dict[str, list[Any]], key: str) -> list[float]:
    values = []
    for v in logging.get(key) or []:
        try:
            values.append(float(v))
        except (TypeError, ValueError):
            values.append(float("nan"))
    return values


def _mark_epochs(ax: Any, warmup: int | None, filter_epochs: list[int]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if warmup:
        ax.axvline(warmup - 0.5, color="grey", ls=":", lw=1)
    for e in filter_epochs:
        ax.axvline(e - 0.5, color=_COLOURS["cut"], ls="--", lw=0.8, alpha=0.6)


def learning_curves_png(
    logging: dict[str, list[Any]],
    warmup: int | None,
    filter_epochs: list[int],
    class_names: dict[int, str] | None = None,
) -> str | None:
    """Losses, pseudo-Dice with its moving average (and per class), learning rate, unlabelled weight."""
    n = len(logging.get("train_losses") or [])
    if n == 0:
        return None
    epochs = list(range(n))
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5))
    ax = axes[0][0]
    for key, label, style in (
        ("train_losses", "training loss (total)", {"color": "tab:blue"}),
        ("sup_losses", "supervised loss", {"color": "tab:cyan", "ls": "--"}),
        ("unsup_losses", "unsupervised loss", {"color": "tab:orange"}),
        ("val_losses", "validation loss", {"color": "tab:red"}),
    ):
        values = _series(logging, key)[:n]
        if values:
            ax.plot(epochs[: len(values)], values, label=label, **style)
    ax.set_title("losses")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    per_class = logging.get("dice_per_class_or_region") or []
    for i in range(len(per_class[0]) if per_class else 0):
        ax.plot(
            epochs[: len(per_class)],
            [float(d[i]) for d in per_class[:n]],
            lw=0.8,
            ls=":",
            label=(class_names or {}).get(i + 1, f"class {i + 1}"),
        )
    ax.plot(epochs, _series(logging, "mean_fg_dice")[:n], color="tab:green", label="pseudo-Dice (mean foreground)")
    ax.plot(epochs, _series(logging, "ema_fg_dice")[:n], color="black", lw=2, label="moving average (best checkpoint)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("validation pseudo-Dice")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.plot(epochs, _series(logging, "lrs")[:n], color="tab:purple")
    ax.set_title("learning rate")
    ax = axes[1][1]
    if logging.get("unsup_weight"):
        ax.plot(epochs, _series(logging, "unsup_weight")[:n], color="tab:purple", label="unlabelled loss weight")
    if logging.get("confident_fraction"):
        ax.plot(
            epochs, _series(logging, "confident_fraction")[:n], color="tab:green", label="unlabelled voxels above tau"
        )
    ax.set_ylim(-0.02, 1.02 + max([0.0, *(w for w in _series(logging, "unsup_weight") if w == w)]) - 1.0)
    ax.set_title("semi-supervised step")
    ax.legend(fontsize=8)
    for ax in axes.flat:
        _mark_epochs(ax, warmup, filter_epochs)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def pool_png(logging: dict[str, list[Any]], rounds: list[dict[str, Any]]) -> str | None:
    """Unlabelled pool size per epoch; each filter round's drop is annotated."""
    pool = _series(logging, "pool_size")
    if not pool or max(pool) <= 0:  # supervised runs log an empty pool
        return None
    fig, ax = plt.subplots(figsize=(13, 3.2))
    ax.step(range(len(pool)), pool, where="mid", color="tab:brown", lw=2)
    for record in rounds:
        e = int(record["epoch"])
        ax.axvline(e - 0.5, color=_COLOURS["cut"], ls="--", lw=0.8)
        dropped = int(record.get("pool_before", 0)) - int(record.get("pool_after", 0))
        ax.annotate(f"round {e}: -{dropped}", (e - 0.4, max(pool) * 1.04 + 0.5), fontsize=8, va="bottom")
    ax.set_ylim(0, max(pool) * 1.2 + 1)
    ax.set_xlabel("epoch")
    _mark_epochs(ax, None, [])
    ax.set_ylabel("cases in the pool")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def filter_cut(record: dict[str, Any]) -> float | None:
    """The threshold of a round: halfway between the highest dropped and the lowest kept score (None: none dropped)."""
    cases = record.get("cases") or []
    dropped = [float(c["score"]) for c in cases if not c.get("kept", True)]
    kept = [float(c["score"]) for c in cases if c.get("kept", True)]
    if not dropped:
        return None
    if not kept:
        return max(dropped)
    return (max(dropped) + min(kept)) / 2.0


def round_histogram_png(record: dict[str, Any]) -> str | None:
    """Score histogram of one filter round, kept and dropped cases stacked, the cut marked."""
    import numpy as np

    cases = record.get("cases") or []
    if not cases:
        return None
    kept = [float(c["score"]) for c in cases if c.get("kept", True)]
    dropped = [float(c["score"]) for c in cases if not c.get("kept", True)]
    values = kept + dropped
    low, high = min(values), max(values)
    if high <= low:
        low, high = low - 0.5 * abs(low or 1) * 1e-3, high + 0.5 * abs(high or 1) * 1e-3
    width = (high - low) / min(30, max(6, len(values) // 2))
    cut = filter_cut(record)
    anchor = low if cut is None else cut  # a bin edge on the cut: no bin mixes dropped and kept cases
    first = anchor - math.ceil((anchor - low) / width + 1e-9) * width
    count = math.ceil((high - first) / width + 1e-9) + 1
    bins = np.array([first + i * width for i in range(count + 1)])
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.hist(
        [dropped, kept],
        bins=bins,
        stacked=True,
        color=[_COLOURS["dropped"], _COLOURS["kept"]],
        label=[
            f"dropped ({len(dropped)})",
            f"kept ({len(kept)})",
        ],
    )
    if cut is not None:
        ax.axvline(cut, color=_COLOURS["cut"], lw=2, label=f"cut {cut:.4g}")
    ax.set_xlabel(f"case score ({record.get('score', 'mean')} voxel entropy)")
    ax.set_ylabel("cases")
    ax.set_title(f"filter round at epoch {record['epoch']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _figure_png(fig)


# ----- evaluation summaries ---------------------------------------------------------------------------------------
def _is_our_evaluation(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("cases"), list) and "per_class" in data and "labels" in data


def find_evaluation(fold_dir: Path) -> Path | None:
    """The newest ``nnfiltermatch evaluate -o`` summary in the fold or model folder, if any."""
    candidates = []
    for folder in (fold_dir, fold_dir.parent):
        for path in folder.glob("*.json"):
            if path.name in _NOT_EVALUATIONS:
                continue
            try:
                if _is_our_evaluation(json.loads(path.read_text())):
                    candidates.append(path)
            except (OSError, ValueError):
                continue
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def evaluation_table(data: dict[str, Any], labels: dict[int, str]) -> tuple[list[str], list[list[str]], str]:
    """Per-case rows, worst mean Dice first: (header, rows, note)."""
    by_case: dict[str, dict[int, dict[str, Any]]] = {}
    for row in data.get("cases") or []:
        by_case.setdefault(str(row["case"]), {})[int(row["label"])] = row
    classes = [int(v) for v in data.get("labels") or sorted({k for r in by_case.values() for k in r})]

    def number(value: Any, digits: int) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    def mean_dice(rows: dict[int, dict[str, Any]]) -> float:
        values = [float(rows[c]["dice"]) for c in classes if c in rows and rows[c].get("dice") is not None]
        return sum(values) / len(values) if values else float("nan")

    ordered = sorted(by_case.items(), key=lambda kv: (mean_dice(kv[1]), kv[0]))
    header = ["case", "mean Dice"]
    for c in classes:
        name = labels.get(c, f"class {c}")
        header += [f"{name} Dice", f"{name} HD95"]
    rows = []
    for case, per in ordered:
        cells = [case, number(mean_dice(per), 4)]
        for c in classes:
            cells += [number((per.get(c) or {}).get("dice"), 4), number((per.get(c) or {}).get("hd95"), 2)]
        rows.append(cells)
    means = data.get("per_class") or {}
    summary = "; ".join(
        f"{labels.get(c, f'class {c}')}: Dice {number((means.get(str(c)) or {}).get('mean', {}).get('dice'), 4)}"
        for c in classes
    )
    units = "mm" if data.get("units") == "mm" else "voxels"
    note = f"{len(rows)} cases, distances in {units}; mean per class: {summary}"
    return header, rows, note


# ----- annotation rounds (rounds.json) ---------------------------------------------------------------------------
def _last_finite(values: list[float]) -> tuple[float, int] | None:
    for epoch in range(len(values) - 1, -1, -1):
        if math.isfinite(values[epoch]):
            return values[epoch], epoch
    return None


def model_scores(fold_dir: Path, checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """A round model's numbers: validation pseudo-Dice (the moving average at its last epoch) and, when there is
    one, a real Dice: an ``evaluate -o`` summary in the folder first, else nnU-Net's final validation summary."""
    scores: dict[str, Any] = {"pseudo_dice": None, "epoch": None, "dice": None, "dice_source": None, "note": ""}
    if checkpoint is None:
        path = current_checkpoint(fold_dir) if fold_dir.is_dir() else None
        if path is None:
            scores["note"] = "no checkpoint (folder missing or not trained)"
            return scores
        try:
            checkpoint = load_checkpoint_safely(path)
        except ValueError as exc:
            scores["note"] = f"unreadable checkpoint: {exc}"
            return scores
    last = _last_finite(_series(checkpoint.get("logging") or {}, "ema_fg_dice"))
    if last is not None:
        scores["pseudo_dice"], scores["epoch"] = last
    evaluation = find_evaluation(fold_dir)
    if evaluation is not None:
        try:
            dice = json.loads(evaluation.read_text()).get("mean_over_classes", {}).get("dice")
            if dice is not None:
                scores["dice"], scores["dice_source"] = float(dice), f"evaluate: {evaluation.name}"
        except (OSError, ValueError, AttributeError):
            pass
    validation = fold_dir / "validation" / "summary.json"
    if scores["dice"] is None and validation.is_file():
        try:
            dice = (json.loads(validation.read_text()).get("foreground_mean") or {}).get("Dice")
            if dice is not None:
                scores["dice"], scores["dice_source"] = float(dice), "nnU-Net final validation"
        except (OSError, ValueError, AttributeError):
            pass
    return scores


def _chosen_by(query: dict[str, Any] | None) -> str:
    if not query:
        return "-"
    how = str(query.get("strategy") or "?")
    if query.get("strategy") in ("random", "foreground-random"):
        how += f" (seed {query.get('seed')})"
    elif query.get("reduce"):
        how += f" ({query.get('reduce')}{', ROI' if query.get('roi') else ''})"
    if query.get("n") is not None:
        how += f", top {query.get('n')} of {query.get('n_ranked', '?')}"
    folder = Path(str(query.get("model_dir") or "?")).name
    model_round = query.get("model_round")
    return f"{how}; model {folder}" + (f" (round {model_round})" if model_round is not None else "")


def annotation_rounds(
    data: dict[str, Any], fold_dir: Path, checkpoint: dict[str, Any]
) -> tuple[list[str], list[list[str]], list[tuple[int, str, float | None, float | None]]]:
    """The rounds table (one row per round model, a round without one gets one row) and the points to plot:
    (labelled cases, model name without the round, pseudo-Dice, Dice)."""
    from nnfiltermatch.rounds import base_trainer_name, split_model_folder_name

    header = ["round", "labelled", "added", "chosen by", "model", "validation pseudo-Dice", "Dice", "Dice from"]
    rows: list[list[str]] = []
    points: list[tuple[int, str, float | None, float | None]] = []
    here = fold_dir.resolve()
    for entry in sorted(data.get("rounds") or [], key=lambda r: int(r["round"])):
        base = [str(entry["round"]), str(entry.get("labelled", "")), str(len(entry.get("added") or []))]
        chosen = _chosen_by(entry.get("query"))
        models = entry.get("models") or []
        if not models:
            rows.append([*base, chosen, "no model recorded yet", "n/a", "n/a", ""])
        for model in models:
            folder = Path(str(model.get("folder")))
            model_fold = folder / f"fold_{model.get('fold')}"
            current = model_fold.resolve() == here
            scores = model_scores(model_fold, checkpoint if current else None)
            pseudo, dice = scores["pseudo_dice"], scores["dice"]
            name = f"{folder.name}/fold_{model.get('fold')}" + (" (this report)" if current else "")
            rows.append(
                [
                    *base,
                    chosen,
                    name + (f": {scores['note']}" if scores["note"] else ""),
                    "n/a" if pseudo is None else f"{pseudo:.4f} (epoch {scores['epoch']})",
                    "n/a" if dice is None else f"{dice:.4f}",
                    scores["dice_source"] or "",
                ]
            )
            parts = split_model_folder_name(folder.name)
            series = folder.name if parts is None else base_trainer_name(parts[0])
            points.append((int(entry.get("labelled") or 0), f"{series} fold {model.get('fold')}", pseudo, dice))
    return header, rows, points


def annotation_rounds_png(points: list[tuple[int, str, float | None, float | None]]) -> str | None:
    """Dice (solid) and validation pseudo-Dice (dashed) against labelled cases, one colour per model."""
    series: dict[str, list[tuple[int, float | None, float | None]]] = {}
    for labelled, name, pseudo, dice in points:
        series.setdefault(name, []).append((labelled, pseudo, dice))
    if not any(len(v) > 1 for v in series.values()):
        return None
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for i, (name, values) in enumerate(sorted(series.items())):
        values.sort()
        colour = f"C{i % 10}"
        for index, style, what in ((1, "--", "pseudo-Dice"), (2, "-", "Dice")):
            xy = [(v[0], v[index]) for v in values if v[index] is not None]
            if xy:
                ax.plot(*zip(*xy), style, marker="o", color=colour, label=f"{name}: {what}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("labelled cases")
    ax.set_ylabel("Dice")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _figure_png(fig)


def annotation_rounds_section(fold_dir: Path, checkpoint: dict[str, Any]) -> str | None:
    """The report's rounds section, or None when the dataset has no rounds.json (nnUNet_preprocessed not set)."""
    import html

    from nnfiltermatch.rounds import load_rounds, rounds_file_for_model

    path = rounds_file_for_model(fold_dir.parent)
    if path is None:
        return None
    try:
        data = load_rounds("", path)
    except ValueError as exc:
        return f"<p>{html.escape(str(exc))}</p>"
    assert data is not None
    header, rows, points = annotation_rounds(data, fold_dir, checkpoint)
    plot = annotation_rounds_png(points)
    image = f'<img alt="annotation rounds" src="{plot}">' if plot else ""
    note = (
        f"{html.escape(str(path))}: per round, the labelled cases (round 0: the set you started from), the cases "
        "added by <code>prepare --add-labels</code>, the query that chose them, and each model trained in the round. "
        "Validation pseudo-Dice: nnU-Net's moving average at the model's last epoch, on its validation patches; "
        "Dice: an <code>evaluate -o</code> summary in the fold or model folder when there is one, else nnU-Net's "
        "final validation."
    )
    return f'<p class="note">{note}</p>' + _table(header, rows, numeric_from=5) + image


# ----- the latest query ranking (query_latest.json, query_ranking_*.csv) ----------------------------------------
QUERY_TOP = 10  # cases of the ranking shown; the CSV has them all


def find_latest_query(model_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The latest query of this model: what ``query_latest.json`` records (where its CSV went, its settings), else
    the newest ``query_ranking_<strategy>.csv`` in the model folder (a query of an older version). None: no query."""
    pointer = model_dir / LATEST_QUERY
    if pointer.is_file():
        try:
            info = json.loads(pointer.read_text())
            return info, Path(str(info["ranking"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # unreadable: fall back to the CSVs in the folder
    found = sorted(model_dir.glob("query_ranking_*.csv"), key=lambda p: p.stat().st_mtime_ns)
    if not found:
        return None
    return {"strategy": found[-1].stem.removeprefix("query_ranking_")}, found[-1]


def query_ranking_section(fold_dir: Path, checkpoint_path: Path) -> str | None:
    """The report's section on the latest query ranking: its top cases with score and reason, and where the full
    ranking is. None when the model was never queried."""
    import csv
    import html

    latest = find_latest_query(fold_dir.parent)
    if latest is None:
        return None
    info, csv_path = latest
    strategy = str(info.get("strategy") or "?")
    if not csv_path.is_file():
        return (
            f"<p>The latest query ({html.escape(strategy)}, {html.escape(str(info.get('time', 'time unknown')))}) "
            f"wrote its ranking to {html.escape(str(csv_path))}, which no longer exists. Run <code>nnfiltermatch "
            "query</code> again to rank the unlabelled cases.</p>"
        )
    try:
        with open(csv_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        return f"<p>{html.escape(str(csv_path))}: cannot read the ranking ({html.escape(str(exc))}).</p>"
    table = []
    for row in rows[:QUERY_TOP]:
        try:
            score = f"{float(row.get('score') or 'nan'):.5g}"
        except ValueError:
            score = str(row.get("score"))
        # a CSV of an older version has no reason column: say what the score is
        reason = row.get("reason") or f"{strategy} score ({row.get('source') or 'source not recorded'})"
        table.append([str(row.get("rank", "")), str(row.get("case", "")), score, reason])
    how = strategy
    if info.get("reduce") and strategy not in ("random", "foreground-random"):
        how += f" ({info['reduce']}{', ROI' if info.get('roi') else ''})"
    if strategy in ("random", "foreground-random") and info.get("seed") is not None:
        how += f" (seed {info['seed']})"
    ranked = info.get("n_ranked")
    counts = f"{len(rows)} case(s) listed" + (f" of {ranked} ranked" if ranked is not None else "")
    if info.get("n_excluded"):
        counts += f", {info['n_excluded']} left out (predicted foreground <= {info.get('min_foreground_ml')} mL)"
    model = ""
    if info.get("checkpoint"):
        model = f" with {info['checkpoint']} of fold(s) {', '.join(info.get('folds') or ['?'])}"
    when = f" on {str(info['time']).replace('T', ' ')}" if info.get("time") else ""
    parts = [
        f"Latest query: {html.escape(how)}{html.escape(model)}{html.escape(when)}; {html.escape(counts)}. "
        f"The full ranking: <code>{html.escape(str(csv_path))}</code>."
    ]
    if csv_path.stat().st_mtime < checkpoint_path.stat().st_mtime:
        parts.append(
            f"It is older than {html.escape(checkpoint_path.name)} (the training went on since): query again for "
            "the current weights."
        )
    if info.get("pngs"):
        parts.append(f"PNGs of the top cases: <code>{html.escape(str(info['pngs']))}</code>.")
    if info.get("export"):
        parts.append(f"Exported for annotation: <code>{html.escape(str(info['export']))}</code>.")
    shown = f"the first {len(table)}" if len(rows) > len(table) else "every listed case"
    parts.append(f"Shown: {shown}, first pick first.")
    return f'<p class="note">{" ".join(parts)}</p>' + _table(["rank", "case", "score", "reason"], table, 4)


# ----- nnU-Net's own final validation (fold_X/validation/summary.json) ------------------------------------------
def _label_key(key: str) -> tuple[int, str]:
    try:
        return int(key), key
    except ValueError:  # a region, e.g. "(1, 2)"
        return 1 << 30, key


def nnunet_validation_section(fold_dir: Path, labels: dict[int, str]) -> str | None:
    """Mean Dice (and IoU) per class from nnU-Net's final validation, when ``validation/summary.json`` is there."""
    import html

    folder = fold_dir / "validation"
    summary = folder / "summary.json"
    if not summary.is_file():
        return None
    try:
        data = json.loads(summary.read_text())
        means = data["mean"]
        foreground = data.get("foreground_mean") or {}
        cases = len(data.get("metric_per_case") or [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"<p>{html.escape(str(summary))}: not a summary of nnU-Net's validation ({html.escape(str(exc))}).</p>"

    def number(value: Any) -> str:
        try:
            value = float(value)
        except (TypeError, ValueError):
            return "n/a"
        return "n/a" if math.isnan(value) else f"{value:.4f}"

    rows = []
    for key in sorted(means, key=_label_key):
        metrics = means[key] or {}
        name = labels.get(_label_key(key)[0], f"class {key}")
        rows.append([name, key, number(metrics.get("Dice")), number(metrics.get("IoU"))])
    rows.append(["mean over foreground classes", "", number(foreground.get("Dice")), number(foreground.get("IoU"))])
    softmax = len(list(folder.glob("*.npz")))
    parts = [
        f"{html.escape(str(summary))}: nnU-Net's final validation of this fold, {cases} case(s), with the "
        "checkpoint it was run with (checkpoint_final.pth, or checkpoint_best.pth after <code>--val_best</code>; "
        "nnU-Net does not record which)."
    ]
    if softmax:
        parts.append(
            f"Softmax of {softmax} case(s) saved (<code>--npz</code>): nnUNetv2_find_best_configuration and "
            "nnUNetv2_ensemble can use this fold."
        )
    else:
        parts.append("No softmax saved: <code>nnfiltermatch train ... --val --npz</code> writes it for ensembling.")
    if fold_dir.name == "fold_all":
        parts.append(
            "With <code>-f all</code> the validation cases are training cases: these numbers are optimistic; "
            "evaluate on held-out cases (<code>predict</code> + <code>evaluate</code>) for a real estimate."
        )
    return f'<p class="note">{" ".join(parts)}</p>' + _table(["class", "label", "Dice", "IoU"], rows, 2)


# ----- the configuration table, defaults marked ------------------------------------------------------------------
_NOT_DEFAULTS = {"extra", "labeled_fraction", "mode", "preset"}  # bookkeeping, and the choices defaults follow


def _config_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """Each option's default for this run's mode and preset; options that scale with the schedule (warm-up, ramp,
    filter epochs) at this run's ``--epochs``. Empty when the stored configuration cannot be resolved."""
    from nnfiltermatch.config import resolve_config

    given = {"mode": config.get("mode") or "filtermatch", "labeled_fraction": config.get("labeled_fraction")}
    preset = str(config.get("preset") or "default")
    try:
        defaults = resolve_config(given, preset=preset).to_dict()
        scaled = resolve_config({**given, "epochs": config.get("epochs")}, preset=preset).to_dict()
    except (ValueError, TypeError):
        return {}
    for name in ("warmup_epochs", "rampup_epochs", "filter_epochs"):
        defaults[name] = scaled[name]
    return defaults


def _unset_default(name: str, config: dict[str, Any]) -> tuple[Any, str]:
    """The default of an option whose default is "unset" (None): what it came to in this run (None: nothing to
    show) and how it is derived."""
    epochs = config.get("epochs")
    mode = config.get("mode") or "filtermatch"
    if name == "batch_size":
        return (config.get("extra") or {}).get("batch_size_used"), "the plan's batch size"
    if name in ("filter_start", "filter_every"):
        if mode != "filtermatch":
            return None, f"no filter in mode {mode}"
        if not isinstance(epochs, int):
            return None, "epochs/3"
        if name == "filter_start":
            return max(1, round(epochs / 3)), "epochs/3"
        return max(1, math.ceil(epochs / 3)), "ceil(epochs/3)"
    if name == "warmup_epochs":
        return None, "10% of epochs"
    if name == "rampup_epochs":
        return None, "20% of epochs"
    return None, "unset"


def _config_cell(name: str, value: Any, config: dict[str, Any], defaults: dict[str, Any], paper: dict) -> str:
    """One value of the configuration table, with how it relates to its default."""
    if name == "labeled_fraction":
        return "not recorded" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
    if name in _NOT_DEFAULTS or name not in defaults:
        return "not set" if value is None else _config_value(value) or '""'
    text = _config_value(value) or '""'
    default = defaults[name]
    if value is None or default is None:  # a default derived from the run (the plan's batch size, the schedule)
        came_to, how = _unset_default(name, config)
        if value is None:
            return f"{how} (default)" if came_to is None else f"{came_to} (default: {how})"
        if name == "batch_size":  # the plan's value is not in the model folder once --batch-size replaced it
            return f"{text} (set with --batch-size; default: {how})"
        if came_to is not None and value == came_to:
            return f"{text} (default: {how})"
        return f"{text} (default: {how}{'' if came_to is None else f' = {came_to}'})"
    if value == default:
        return f"{text} (preset paper)" if name in paper else f"{text} (default)"
    return f"{text} (default {_config_value(default)})"


def config_rows(config: dict[str, Any]) -> list[list[str]]:
    """The configuration table: every option with its value, ``(default)`` when it is the default of the run's mode
    and preset, ``(preset paper)`` when it is the preset's, else ``(default X)``; never an empty cell."""
    from nnfiltermatch.config import paper_values

    defaults = _config_defaults(config)
    paper = paper_values(config.get("labeled_fraction")) if config.get("preset") == "paper" else {}
    return [[name, _config_cell(name, value, config, defaults, paper)] for name, value in sorted(config.items())]


# ----- assembling the page ----------------------------------------------------------------------------------------
_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1240px;
       color: #222; background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 1.8em; }
h3 { margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 8px 0 16px 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f0f3f7; } tr:nth-child(even) td { background: #fafafa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; }
.meta td:first-child { font-weight: 600; } .note { color: #555; font-size: 0.9em; }
nav a { margin-right: 14px; } .round { display: flex; gap: 18px; align-items: flex-start; flex-wrap: wrap; }
.dropped td { background: #fff4e6 !important; }
"""


def _table(header: list[str] | None, rows: list[list[str]], numeric_from: int = 1, css: str = "") -> str:
    import html

    head = "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{html.escape(str(c))}</td>' if i >= numeric_from else f"<td>{html.escape(str(c))}</td>"
            for i, c in enumerate(row)
        )
        body.append(f"<tr>{cells}</tr>")
    cls = f' class="{css}"' if css else ""
    return f"<table{cls}>{head}<tbody>{''.join(body)}</tbody></table>"


def _best(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return f"{max(finite):.4f} (epoch {values.index(max(finite))})" if finite else "n/a"


def _config_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "" if value is None else str(value)


def build_report(
    model_dir: Path, output: Path | None = None, evaluation: Path | None = None, fold: str | int | None = None
) -> Path:
    """Write one self-contained HTML page about a trained fold; returns its path (default ``fold_X/report.html``)."""
    import html
    import time

    fold_dir = resolve_fold_dir(model_dir, fold)
    checkpoint_path = current_checkpoint(fold_dir)
    assert checkpoint_path is not None
    checkpoint = load_checkpoint_safely(checkpoint_path)
    logging: dict[str, list[Any]] = checkpoint.get("logging") or {}
    state = trainer_state(checkpoint)
    config_file = fold_dir / "nnfiltermatch_config.json"
    config: dict[str, Any] = (
        json.loads(config_file.read_text()) if config_file.is_file() else dict(state.get("config") or {})
    )
    rounds = collect_filter_rounds(fold_dir, checkpoint)
    dataset_json_file = fold_dir.parent / "dataset.json"
    labels: dict[int, str] = {}
    if dataset_json_file.is_file():
        for name, value in (json.loads(dataset_json_file.read_text()).get("labels") or {}).items():
            if isinstance(value, int) and value > 0:
                labels[value] = str(name)
    if evaluation is None:
        evaluation = find_evaluation(fold_dir)
    elif not Path(evaluation).is_file():
        raise ReportError(
            f"--evaluation {evaluation} does not exist: give the JSON written by `nnfiltermatch evaluate -o`"
        )
    evaluation_data = None
    if evaluation is not None:
        try:
            evaluation_data = json.loads(Path(evaluation).read_text())
        except (OSError, ValueError) as exc:
            raise ReportError(f"--evaluation {evaluation}: cannot read it as JSON ({exc})") from exc
        if not _is_our_evaluation(evaluation_data):
            raise ReportError(
                f"--evaluation {evaluation} is not a summary of `nnfiltermatch evaluate -o` (no cases/per_class/labels)"
            )

    # where pseudo-labels actually started (they wait for every class, see --ssl-start-dice), else the warm-up
    weights = logging.get("unsup_weight") or []
    started = [epoch for epoch, weight in enumerate(weights) if weight and weight > 0]
    warmup = started[0] if started else config.get("warmup_epochs")
    filter_epochs = [int(r["epoch"]) for r in rounds]
    epochs_done = len(logging.get("train_losses") or [])
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)

    timestamps = list(zip(logging.get("epoch_start_timestamps") or [], logging.get("epoch_end_timestamps") or []))
    epoch_seconds = [float(b) - float(a) for a, b in timestamps]
    meta = [
        ["model folder", str(fold_dir.parent)],
        ["fold", fold_dir.name.removeprefix("fold_")],
        ["trainer", str(checkpoint.get("trainer_name", ""))],
        ["mode", str(state.get("mode") or config.get("mode") or "")],
        ["configuration", str((checkpoint.get("init_args") or {}).get("configuration", ""))],
        ["checkpoint read", f"{checkpoint_path.name} (epochs completed: {checkpoint.get('current_epoch')})"],
        ["epochs", f"{epochs_done} of {config.get('epochs', '?')} planned"],
        ["labelled fraction", str(config.get("labeled_fraction"))],
        [
            "unlabelled pool",
            f"{int(_series(logging, 'pool_size')[0])} at the start, {len(state['pool'])} now"
            if logging.get("pool_size") and state.get("pool") is not None
            else "not used",
        ],
        [
            "best pseudo-Dice (moving average)",
            _best(_series(logging, "ema_fg_dice")),
        ],
        [
            "time per epoch (median)",
            f"{sorted(epoch_seconds)[len(epoch_seconds) // 2]:.1f} s" if epoch_seconds else "n/a",
        ],
    ]
    sections.append(("summary", "Summary", _table(None, meta, numeric_from=2, css="meta")))
    annotation = annotation_rounds_section(fold_dir, checkpoint)
    if annotation is not None:
        sections.append(("annotation-rounds", "Annotation rounds", annotation))

    curves = learning_curves_png(logging, warmup, filter_epochs, labels)
    body = (
        f'<img alt="learning curves" src="{curves}">'
        f'<p class="note">Dotted grey line: end of warm-up; dashed red lines: filter rounds.</p>'
        if curves
        else "<p>No epoch was logged.</p>"
    )
    sections.append(("curves", "Learning curves", body))

    pool = pool_png(logging, rounds)
    sections.append(
        ("pool", "Unlabelled pool", f'<img alt="pool size" src="{pool}">' if pool else "<p>No unlabelled pool.</p>")
    )

    parts = []
    for record in rounds:
        hist = round_histogram_png(record)
        cut = filter_cut(record)
        dropped = sorted(
            (c for c in record.get("cases") or [] if not c.get("kept", True)), key=lambda c: float(c["score"])
        )
        listing = (
            _table(["dropped case", "score"], [[c["case"], f"{float(c['score']):.5g}"] for c in dropped], css="dropped")
            if dropped
            else "<p>No case dropped.</p>"
        )
        scoring = html.escape(str(record.get("scoring", "window")))
        info = (
            f"pool {record.get('pool_before')} &rarr; {record.get('pool_after')}, scored by {scoring} in "
            f"{float(record.get('seconds', 0.0)):.1f} s; cut {'n/a' if cut is None else f'{cut:.5g}'}"
        )
        image = f'<img alt="filter round {record["epoch"]}" src="{hist}">' if hist else ""
        parts.append(
            f'<h3>Round at epoch {int(record["epoch"])}</h3><p class="note">{info}</p>'
            f'<div class="round"><div>{image}</div><div>{listing}</div></div>'
        )
    sections.append(("rounds", "Filter rounds", "".join(parts) if parts else "<p>No filter round in this run.</p>"))

    source = config_file if config_file.is_file() else "from the checkpoint"
    sections.append(
        (
            "config",
            "Configuration",
            f'<p class="note">{html.escape(str(source))}: "(default)" marks a value the run got by default for its '
            'mode and preset (options that scale with the schedule at its --epochs), "(default X)" one that was '
            "set, with what the default would have been.</p>" + _table(["option", "value"], config_rows(config), 2),
        )
    )

    validation = nnunet_validation_section(fold_dir, labels)
    if validation is not None:
        sections.append(("nnunet-validation", "nnU-Net's final validation", validation))
    query = query_ranking_section(fold_dir, checkpoint_path)
    if query is not None:
        sections.append(("query", "Latest query ranking (which cases to annotate next)", query))

    if evaluation_data is not None:
        header, rows, note = evaluation_table(evaluation_data, labels)
        sections.append(
            (
                "evaluation",
                "Per-case evaluation (worst first)",
                f'<p class="note">{html.escape(str(evaluation))}: {html.escape(note)}</p>' + _table(header, rows),
            )
        )
    else:
        sections.append(
            (
                "evaluation",
                "Per-case evaluation",
                "<p>No evaluation summary found: predict a labelled test set and run <code>nnfiltermatch evaluate -r "
                "labelsTs --pred predictions -o summary.json</code>, then pass <code>--evaluation summary.json</code> "
                "(or save it in the model folder).</p>",
            )
        )

    nav = " ".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t, _ in sections)
    content = "".join(f'<section id="{a}"><h2>{html.escape(t)}</h2>{b}</section>' for a, t, b in sections)
    title = f"nnfiltermatch report: {fold_dir.parent.parent.name} / {fold_dir.parent.name} / {fold_dir.name}"
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<p class="note">Written {time.strftime("%Y-%m-%d %H:%M")} from {html.escape(str(checkpoint_path))}</p>'
        f"<nav>{nav}</nav>{content}</body></html>\n"
    )
    return atomic_write_text(Path(output) if output is not None else fold_dir / REPORT_NAME, page)
