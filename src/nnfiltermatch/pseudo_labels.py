"""Pseudo-labels, teacher EMA, the unsupervised-loss ramp and the joint labelled + pseudo-labelled loss.

Everything here works on tensors/modules only, so the trainer logic can be tested without nnU-Net.
Layouts follow nnU-Net: logits are (B, C, *spatial), label maps are (B, 1, *spatial) int64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "pseudo_labels_from_logits",
    "pseudo_labels_for_scales",
    "ema_update",
    "ramp_weight",
    "every_class_segmented",
    "as_list",
    "joint_batch",
    "SemiSupervisedLoss",
    "epoch_summary",
]


def pseudo_labels_from_logits(logits: Tensor, tau: float, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Hard pseudo-labels from weak-view logits, with low-confidence voxels set to ``ignore_index``.

    Why: the strong view is trained against these labels; voxels the model is unsure about (max softmax
    probability ``< tau``) are excluded through nnU-Net's ignore label instead of being taught as noise.
    ``tau = 0`` keeps every voxel (the paper's behaviour).

    Args:
        logits: (B, C, *spatial) raw network outputs (C >= 1). Detached here, so no graph is ever kept.
        tau: confidence threshold in [0, 1]; a voxel is kept iff its max probability is >= tau.
        ignore_index: label value written where the voxel is not confident (must not be a real class).

    Returns:
        (labels, confident): labels is (B, 1, *spatial) int64, confident is (B, 1, *spatial) bool.
    """
    if logits.ndim < 3:
        raise ValueError(
            f"logits must be (B, C, *spatial) with at least one spatial axis, got shape {tuple(logits.shape)}"
        )
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    with torch.no_grad():
        probs = torch.softmax(logits.detach().float(), dim=1)
        max_prob, labels = probs.max(dim=1, keepdim=True)
        confident = max_prob >= tau
        labels = torch.where(confident, labels, torch.full_like(labels, ignore_index)).long()
    return labels, confident


def pseudo_labels_for_scales(
    logits_per_scale: list[Tensor], tau: float, ignore_index: int
) -> tuple[list[Tensor], float]:
    """Pseudo-labels at every deep-supervision scale (full resolution first, as nnU-Net orders them).

    Why: nnU-Net's deep-supervision loss needs one target per output scale; taking the argmax of each scale's own
    logits keeps target and output resolutions aligned without resampling labels.

    Returns:
        (labels_per_scale, confident_fraction): the label maps, and the fraction of voxels at the full-resolution
        (first) scale whose max probability is >= tau (a monitoring value; 1.0 when tau == 0).
    """
    if len(logits_per_scale) == 0:
        raise ValueError("logits_per_scale must contain at least one tensor")
    labels: list[Tensor] = []
    fraction = 0.0
    for i, logits in enumerate(logits_per_scale):
        lab, conf = pseudo_labels_from_logits(logits, tau, ignore_index)
        labels.append(lab)
        if i == 0:
            fraction = float(conf.float().mean().item())
    return labels, fraction


def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """In-place EMA of the teacher's parameters towards the student's: ``t = decay * t + (1 - decay) * s``.

    Why: a mean teacher gives steadier pseudo-labels than the student itself. Buffers (e.g. BatchNorm running stats,
    ``num_batches_tracked``) are copied from the student rather than averaged, since they are statistics, not
    weights. Both modules must have identical parameter and buffer names.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        missing = sorted(set(t_params) ^ set(s_params))
        raise ValueError(f"teacher and student parameters differ: {missing[:5]}")
    t_bufs = dict(teacher.named_buffers())
    s_bufs = dict(student.named_buffers())
    if t_bufs.keys() != s_bufs.keys():
        missing = sorted(set(t_bufs) ^ set(s_bufs))
        raise ValueError(f"teacher and student buffers differ: {missing[:5]}")
    with torch.no_grad():
        for name, t in t_params.items():
            s = s_params[name].detach().to(device=t.device, dtype=t.dtype)
            if t.is_floating_point():
                t.mul_(decay).add_(s, alpha=1.0 - decay)
            else:
                t.copy_(s)
        for name, t in t_bufs.items():
            t.copy_(s_bufs[name].detach().to(device=t.device, dtype=t.dtype))


def ramp_weight(epoch: int, warmup_epochs: int, rampup_epochs: int, lambda_u: float) -> float:
    """Weight of the unsupervised loss at ``epoch`` (0-based).

    Why: pseudo-labels from an untrained model are noise, so the unsupervised term is off during warm-up and then
    grows linearly so it does not swamp the supervised signal at once.

    Definition: ``0`` if ``epoch < warmup_epochs``; else ``lambda_u`` if ``rampup_epochs <= 0``; else
    ``lambda_u * min(1, (epoch - warmup_epochs + 1) / rampup_epochs)`` (so the first post-warm-up epoch already gets
    ``lambda_u / rampup_epochs`` and the full weight is reached at epoch ``warmup_epochs + rampup_epochs - 1``).
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if epoch < warmup_epochs:
        return 0.0
    if rampup_epochs <= 0:
        return float(lambda_u)
    return float(lambda_u) * min(1.0, (epoch - warmup_epochs + 1) / rampup_epochs)


def every_class_segmented(dice_per_class_history: list[list[float]], floor: float) -> bool:
    """Whether the last validation's pseudo-Dice of every foreground class is at least ``floor``.

    Why: pseudo-labels from a model that does not yet find a class teach that class's voxels as background; at
    small compute this erased whole classes. ``floor <= 0`` never waits. No validation yet: not ready.
    """
    if floor <= 0:
        return True
    if not dice_per_class_history:
        return False
    last = [float(d) for d in dice_per_class_history[-1]]
    return bool(last) and all(d == d and d >= floor for d in last)  # d == d: NaN (class absent) is not ready


def as_list(x: Tensor | list[Tensor]) -> list[Tensor]:
    """Targets or outputs as a list of scales: nnU-Net passes a list with deep supervision, one tensor without."""
    return list(x) if isinstance(x, (list, tuple)) else [x]


def joint_batch(
    data: Tensor, target: Tensor | list[Tensor], extra_data: Tensor, extra_target: Tensor | list[Tensor]
) -> dict[str, Any]:
    """One batch of ``data`` followed by ``extra_data`` rows, targets joined scale by scale in ``target``'s dtype;
    the target stays a list (deep supervision) or a tensor, as ``target`` is."""
    joined = [torch.cat([t, p.to(t.dtype)]) for t, p in zip(as_list(target), as_list(extra_target))]
    return {"data": torch.cat([data, extra_data]), "target": joined if isinstance(target, (list, tuple)) else joined[0]}


class SemiSupervisedLoss(nn.Module):
    """The supervised loss on the labelled rows plus a weighted, ignore-aware loss on the pseudo-labelled rows.

    ``n_labeled`` is None outside semi-supervised steps (validation, warm-up): then it is the supervised loss
    unchanged. Both losses are passed in (nnU-Net's, in the trainer).
    """

    def __init__(self, supervised: nn.Module, unsupervised: nn.Module):
        super().__init__()
        self.supervised = supervised
        self.unsupervised = unsupervised
        self.n_labeled: int | None = None
        self.weight = 0.0
        self.last: dict[str, float] = {}

    def forward(self, output: Any, target: Any) -> Tensor:
        if self.n_labeled is None:
            loss = self.supervised(output, target)
            self.last = {"sup": float(loss.detach()), "unsup": 0.0}
            return loss
        n = self.n_labeled
        is_list = isinstance(output, (list, tuple))
        out, tgt = as_list(output), as_list(target)
        sup_args = ([o[:n] for o in out], [t[:n] for t in tgt])
        unsup_args = ([o[n:] for o in out], [t[n:] for t in tgt])
        if not is_list:
            sup_args = (sup_args[0][0], sup_args[1][0])
            unsup_args = (unsup_args[0][0], unsup_args[1][0])
        sup = self.supervised(*sup_args)
        unsup = self.unsupervised(*unsup_args)
        if not torch.is_tensor(unsup):  # nnU-Net returns a plain 0 when every pseudo-label voxel is ignored
            unsup = sup.new_zeros(())
        self.last = {"sup": float(sup.detach()), "unsup": float(unsup.detach())}
        return sup + self.weight * unsup


def epoch_summary(steps: list[dict[str, float]]) -> dict[str, float]:
    """An epoch's semi-supervised logs from its steps' ``sup``/``unsup`` losses, confident fraction ``conf`` (NaN on
    steps without pseudo-labels) and unsupervised weight ``w``: means, and the last step's weight."""
    steps = steps or [{"sup": float("nan"), "unsup": 0.0, "conf": float("nan"), "w": 0.0}]
    confident = [s["conf"] for s in steps if not np.isnan(s["conf"])]
    return {
        "sup_losses": float(np.mean([s["sup"] for s in steps])),
        "unsup_losses": float(np.mean([s["unsup"] for s in steps])),
        "confident_fraction": float(np.mean(confident)) if confident else float("nan"),
        "unsup_weight": float(steps[-1]["w"]),
    }
