"""The semi-supervised step's pure parts: the strong view, the joint batch, the joint loss and the epoch's logs.

Built on ``views``; torch and NumPy only, so the step is tested without nnU-Net. Layouts
follow nnU-Net: images (B, C, *spatial), label maps (B, 1, *spatial), deep-supervision targets a list of label maps
at decreasing resolution, full resolution first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nnfiltermatch.method.views import cutmix, cutout, paste_boxes, sample_geometric_transform, strong_intensity

__all__ = ["StrongViewOptions", "strong_view", "as_list", "joint_batch", "SemiSupervisedLoss", "epoch_summary"]


@dataclass(frozen=True)
class StrongViewOptions:
    """Which operations the strong view draws and how often; the names are the training options'."""

    flip_from_epoch: int
    strong_intensity: bool
    intensity_p: float
    cutout_p: float
    cutmix_p: float
    copy_paste_p: float

    @classmethod
    def of(cls, options: object) -> StrongViewOptions:
        """From any object with attributes of these names (the training configuration)."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls)})


def strong_view(
    weak: Tensor,
    pseudo: Sequence[Tensor],
    labelled: Tensor,
    labelled_targets: Sequence[Tensor],
    gen: torch.Generator,
    options: StrongViewOptions,
    epoch: int,
    ignore_index: int,
) -> tuple[Tensor, list[Tensor]]:
    """The strong view of a weak unlabelled batch and its pseudo-labels (every deep-supervision scale).

    In this order, each from ``gen``: the in-plane rotation (and, from ``flip_from_epoch`` on, flip), intensity
    perturbations, cutout, cutmix, then the labelled-to-unlabelled copy-paste of ``labelled`` boxes with their true
    labels. An operation with probability 0 draws nothing from ``gen``.
    """
    transform = sample_geometric_transform([tuple(p.shape[-2:]) for p in pseudo], gen, epoch >= options.flip_from_epoch)
    strong = transform.apply(weak)
    labels = [transform.apply(p) for p in pseudo]
    if options.strong_intensity:
        strong = strong_intensity(strong, gen, p=options.intensity_p)
    if options.cutout_p > 0 and float(torch.rand((), generator=gen)) < options.cutout_p:
        strong, labels = cutout(strong, labels, gen, ignore_index)
    if options.cutmix_p > 0 and float(torch.rand((), generator=gen)) < options.cutmix_p:
        strong, labels = cutmix(strong, labels, gen)
    if options.copy_paste_p > 0 and float(torch.rand((), generator=gen)) < options.copy_paste_p:
        # BCP's box side: 2/3 of the patch, a labelled box with its true labels in each pseudo-labelled view
        strong, labels = paste_boxes(strong, labels, labelled, labelled_targets, gen, 2 / 3)
    return strong, labels


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
