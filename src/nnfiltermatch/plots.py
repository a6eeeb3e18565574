"""The figures: the semi-supervised side of training progress (progress_ssl.png, next to nnU-Net's progress.png)
and the report's plots, each a PNG data URI."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import matplotlib

from nnfiltermatch.files import atomic_write_bytes
from nnfiltermatch.method.pool_filter import FilterRound

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


# ----- the report's figures, each a PNG data URI ------------------------------------------------------------------
_COLOURS = {"kept": "#1f77b4", "dropped": "#ff7f0e", "cut": "#d62728"}


def _figure_png(fig: Any) -> str:
    """A matplotlib figure as a base64 data URI, so the HTML file needs nothing beside it."""
    import base64

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def logged_series(logging: dict[str, list[Any]], key: str) -> list[float]:
    """One per-epoch series of nnU-Net's logger as floats, NaN where an entry is not a number."""
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
        values = logged_series(logging, key)[:n]
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
    ax.plot(
        epochs, logged_series(logging, "mean_fg_dice")[:n], color="tab:green", label="pseudo-Dice (mean foreground)"
    )
    ax.plot(
        epochs, logged_series(logging, "ema_fg_dice")[:n], color="black", lw=2, label="moving average (best checkpoint)"
    )
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("validation pseudo-Dice")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.plot(epochs, logged_series(logging, "lrs")[:n], color="tab:purple")
    ax.set_title("learning rate")
    ax = axes[1][1]
    if logging.get("unsup_weight"):
        ax.plot(epochs, logged_series(logging, "unsup_weight")[:n], color="tab:purple", label="unlabelled loss weight")
    if logging.get("confident_fraction"):
        ax.plot(
            epochs,
            logged_series(logging, "confident_fraction")[:n],
            color="tab:green",
            label="unlabelled voxels above tau",
        )
    ax.set_ylim(-0.02, 1.02 + max([0.0, *(w for w in logged_series(logging, "unsup_weight") if w == w)]) - 1.0)
    ax.set_title("semi-supervised step")
    ax.legend(fontsize=8)
    for ax in axes.flat:
        _mark_epochs(ax, warmup, filter_epochs)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def pool_png(logging: dict[str, list[Any]], rounds: list[FilterRound]) -> str | None:
    """Unlabelled pool size per epoch; each filter round's drop is annotated."""
    pool = logged_series(logging, "pool_size")
    if not pool or max(pool) <= 0:  # supervised runs log an empty pool
        return None
    fig, ax = plt.subplots(figsize=(13, 3.2))
    ax.step(range(len(pool)), pool, where="mid", color="tab:brown", lw=2)
    for record in rounds:
        e = record.epoch
        ax.axvline(e - 0.5, color=_COLOURS["cut"], ls="--", lw=0.8)
        dropped = record.pool_before - record.pool_after
        ax.annotate(f"round {e}: -{dropped}", (e - 0.4, max(pool) * 1.04 + 0.5), fontsize=8, va="bottom")
    ax.set_ylim(0, max(pool) * 1.2 + 1)
    ax.set_xlabel("epoch")
    _mark_epochs(ax, None, [])
    ax.set_ylabel("cases in the pool")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _figure_png(fig)


def filter_cut(record: FilterRound) -> float | None:
    """The threshold of a round: halfway between the highest dropped and the lowest kept score (None: none dropped)."""
    dropped = [c.score for c in record.cases if not c.kept]
    kept = [c.score for c in record.cases if c.kept]
    if not dropped:
        return None
    if not kept:
        return max(dropped)
    return (max(dropped) + min(kept)) / 2.0


def round_histogram_png(record: FilterRound) -> str | None:
    """Score histogram of one filter round, kept and dropped cases stacked, the cut marked."""
    import numpy as np

    if not record.cases:
        return None
    kept = [c.score for c in record.cases if c.kept]
    dropped = [c.score for c in record.cases if not c.kept]
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
    ax.set_xlabel(f"case score ({record.score} voxel entropy)")
    ax.set_ylabel("cases")
    ax.set_title(f"filter round at epoch {record.epoch}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _figure_png(fig)


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
