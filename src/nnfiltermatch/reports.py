"""Reports and plots: the semi-supervised side of training progress, next to nnU-Net's own progress.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

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
    target = Path(output_folder) / SSL_PROGRESS_PNG
    tmp = target.with_name("progress_ssl.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    tmp.replace(target)
    return target
