"""Pseudo-labels, teacher EMA and the unsupervised-loss ramp for nnFilterMatch.

Everything here is a pure function on tensors/modules so the trainer logic can be tested without nnU-Net.
Layouts follow nnU-Net: logits are (B, C, *spatial), label maps are (B, 1, *spatial) int64.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "pseudo_labels_from_logits",
    "pseudo_labels_for_scales",
    "ema_update",
    "ramp_weight",
    "every_class_segmented",
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
