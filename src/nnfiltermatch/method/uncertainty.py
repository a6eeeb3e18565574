"""Per-case uncertainty scores and the entropy filter that drops confident cases from the unlabelled pool.

nnFilterMatch periodically scores every unlabelled case by the entropy of its predicted softmax and removes the most
confident ones: they add little new signal while their pseudo-labels keep dominating the unsupervised loss.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["voxel_entropy", "reduce_case_score", "margin_map", "select_cases_to_drop", "filter_schedule"]

_EPS_COUNT = 1e-9  # tolerance so that e.g. 0.29 * 100 counts as 29, not 28 (float rounding)


def voxel_entropy(probs: Tensor, dim: int = 0, eps: float = 1e-8) -> Tensor:
    """Shannon entropy (natural log) of class probabilities along ``dim``; that dim is removed.

    ``dim=0`` suits a single case (C, *spatial) as nnU-Net's predictor returns it; use ``dim=1`` for batches.
    Probabilities are clamped to ``eps`` inside the log only, so p = 0 contributes exactly 0.
    Range: 0 (one-hot) to log(C) (uniform).
    """
    p = probs.float()
    return -(p * torch.log(p.clamp_min(eps))).sum(dim=dim)


def reduce_case_score(
    entropy_map: Tensor, how: Literal["mean", "sum", "topk"] = "mean", topk_fraction: float = 0.1
) -> float:
    """Reduce a voxel-wise uncertainty map to one score per case.

    - ``"mean"``: size-neutral, so cases of different sizes compare fairly (default).
    - ``"sum"``: the paper's choice; grows with the number of voxels, so bigger images look more uncertain.
    - ``"topk"``: mean of the largest ``k = max(1, floor(topk_fraction * n))`` voxels, focusing on the uncertain
      region (e.g. a structure boundary) rather than the easy background.
    """
    flat = entropy_map.detach().reshape(-1).double()
    n = flat.numel()
    if n == 0:
        raise ValueError("entropy_map is empty")
    if how == "mean":
        return float(flat.mean().item())
    if how == "sum":
        return float(flat.sum().item())
    if how == "topk":
        if not 0.0 < topk_fraction <= 1.0:
            raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
        k = min(n, max(1, math.floor(topk_fraction * n + _EPS_COUNT)))
        return float(torch.topk(flat, k, sorted=False).values.mean().item())
    raise ValueError(f"how must be 'mean', 'sum' or 'topk', got {how!r}")


def margin_map(probs: Tensor, dim: int = 0) -> Tensor:
    """Voxel-wise ``1 - (p1 - p2)`` (p1, p2: largest and second largest class probability along ``dim``).

    Kept for active-learning use: 0 when the model is certain, 1 when the two best classes tie.
    """
    if probs.shape[dim] < 2:
        raise ValueError(f"margin needs at least 2 classes along dim {dim}, got shape {tuple(probs.shape)}")
    top2 = torch.topk(probs.float(), 2, dim=dim).values
    return 1.0 - (top2.select(dim, 0) - top2.select(dim, 1))


def select_cases_to_drop(scores: dict[str, float], drop_fraction: float) -> list[str]:
    """Case ids to remove from the unlabelled pool: the lowest-score (most confident) ones.

    Count rule, with n = len(scores):
      - n == 0 or drop_fraction == 0: nothing;
      - otherwise count = floor(drop_fraction * n), raised to 1 when n >= 2 (a non-zero fraction always drops
        something) and capped at n - 1 (at least one case is always kept; so n == 1 drops nothing).
    E.g. fraction 0.25: n=1 -> 0, n=2 -> 1, n=3 -> 1, n=8 -> 2, n=10 -> 2; fraction 1.0: n=5 -> 4.
    Ties on score are broken by case id (ascending), so the result is deterministic. Returned most confident first.
    """
    if not 0.0 <= drop_fraction <= 1.0:
        raise ValueError(f"drop_fraction must be in [0, 1], got {drop_fraction}")
    bad = [cid for cid, s in scores.items() if math.isnan(s)]
    if bad:
        raise ValueError(f"scores must not be NaN (cases {sorted(bad)[:5]})")
    n = len(scores)
    if n == 0 or drop_fraction == 0.0:
        return []
    count = math.floor(drop_fraction * n + _EPS_COUNT)
    if n >= 2:
        count = max(count, 1)
    count = min(count, n - 1)
    ranked = sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))
    return [cid for cid, _ in ranked[:count]]


def filter_schedule(num_epochs: int, start: int | None = None, every: int | None = None) -> list[int]:
    """The 0-based epochs ``e`` at whose START the entropy filter runs (i.e. right after epoch ``e - 1`` ended).

    Paper defaults scaled to the run length: its 300 epochs filter at 100 and 200, so by default
    ``start = max(1, round(num_epochs / 3))`` and ``every = max(1, ceil(num_epochs / 3))`` (ceil, so that like the
    paper a default run gets two rounds, never a third one in its last epoch). Returns ``start, start + every, ...``
    strictly below ``num_epochs`` (a filter at the start of a non-existent epoch is useless); every entry is >= 1
    because filtering before any training would score an untrained model. Examples: 300 -> [100, 200];
    30 -> [10, 20]; 10 -> [3, 7]; 6 -> [2, 4]; 2 -> [1]; 1 -> []. Explicit ``start`` / ``every`` override either
    default independently.
    """
    if num_epochs < 0:
        raise ValueError(f"num_epochs must be >= 0, got {num_epochs}")
    if start is not None and start < 1:
        raise ValueError(f"start must be >= 1 (the filter runs at the start of an epoch after training), got {start}")
    if every is not None and every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    first = max(1, round(num_epochs / 3)) if start is None else start
    step = max(1, math.ceil(num_epochs / 3)) if every is None else every
    return list(range(first, num_epochs, step))
