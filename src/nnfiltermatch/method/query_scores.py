"""Per-case uncertainty of a query: the voxel map behind a score, the one number per case (reduced as the filter
reduces it) and the slice a reviewer should look at. Pure tensor code, no nnU-Net.

``--roi`` restricts the map to the bounding box of the predicted foreground plus a margin, so a small structure in
a large, easy background is not drowned out; the whole image is used when nothing is predicted.
"""

from __future__ import annotations

import numpy as np
import torch

from nnfiltermatch.method.query_strategies import SCORE_TYPES
from nnfiltermatch.method.uncertainty import margin_map, reduce_case_score, voxel_entropy

REDUCTIONS: tuple[str, ...] = ("mean", "topk")


def bounding_box(mask: np.ndarray | torch.Tensor, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every non-zero voxel, grown by ``margin`` voxels and clipped to the array.

    None when the mask is empty, so the caller can fall back to the whole image.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    arr = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if not arr.any():
        return None
    box = []
    for axis in range(arr.ndim):
        others = tuple(a for a in range(arr.ndim) if a != axis)
        present = np.flatnonzero(arr.any(axis=others)) if others else np.flatnonzero(arr)
        box.append(slice(max(0, int(present[0]) - margin), min(arr.shape[axis], int(present[-1]) + 1 + margin)))
    return tuple(box)


def uncertainty_map(probs: torch.Tensor, score: str, tta_variance: torch.Tensor | None = None) -> torch.Tensor:
    """The voxel map behind a score, from class probabilities ``(C, *spatial)``."""
    if score == "entropy":
        return voxel_entropy(probs, dim=0)
    if score == "margin":
        return margin_map(probs, dim=0)
    if score == "tta-variance":
        if tta_variance is None:
            raise ValueError("tta-variance needs the per-flip probabilities (predict with tta=True)")
        return tta_variance
    raise ValueError(f"score must be one of {', '.join(SCORE_TYPES)}, got {score!r}")


def case_score(
    umap: torch.Tensor,
    prediction: torch.Tensor,
    reduce: str = "mean",
    topk_fraction: float = 0.1,
    roi: bool = False,
    roi_margin: int = 5,
) -> float:
    """One number per case, as the filter reduces it; with ``roi`` only inside the predicted foreground's box."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if roi:
        box = bounding_box(prediction > 0, roi_margin)
        if box is not None:
            umap = umap[box]
    return reduce_case_score(umap, reduce, topk_fraction)  # type: ignore[arg-type]


def most_uncertain_slice(umap: torch.Tensor) -> int:
    """Index along the first axis with the largest summed uncertainty: the slice a reviewer should look at."""
    if umap.ndim < 2:
        return 0
    return int(torch.argmax(umap.double().sum(dim=tuple(range(1, umap.ndim)))).item())
