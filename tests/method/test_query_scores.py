"""The per-case uncertainty of a query (box, ROI score, most uncertain slice) and the test-time flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nnfiltermatch.commands.query_model import flip_combinations
from nnfiltermatch.method.query_scores import bounding_box, case_score, most_uncertain_slice


def test_bounding_box_grows_by_margin_and_clips() -> None:
    mask = np.zeros((10, 12, 8), dtype=bool)
    mask[3, 4, 2] = mask[5, 7, 3] = True
    assert bounding_box(mask) == (slice(3, 6), slice(4, 8), slice(2, 4))
    assert bounding_box(mask, margin=2) == (slice(1, 8), slice(2, 10), slice(0, 6))
    assert bounding_box(mask, margin=20) == (slice(0, 10), slice(0, 12), slice(0, 8))
    assert bounding_box(np.zeros((4, 4))) is None
    assert bounding_box(torch.tensor([[0, 0], [0, 2]]), 0) == (slice(1, 2), slice(1, 2))
    with pytest.raises(ValueError, match="margin"):
        bounding_box(mask, -1)


def test_roi_score_uses_the_box_and_falls_back_to_the_whole_image() -> None:
    umap = torch.zeros(6, 6, 6)
    umap[2:4, 2:4, 2:4] = 1.0
    prediction = torch.zeros(6, 6, 6, dtype=torch.long)
    prediction[2:4, 2:4, 2:4] = 1
    assert case_score(umap, prediction, roi=False) == pytest.approx(8 / 216)
    assert case_score(umap, prediction, roi=True, roi_margin=0) == pytest.approx(1.0)
    assert case_score(umap, prediction, roi=True, roi_margin=1) == pytest.approx(8 / 64)
    assert case_score(umap, torch.zeros_like(prediction), roi=True) == pytest.approx(8 / 216)  # nothing predicted
    assert most_uncertain_slice(umap) in (2, 3)
    assert flip_combinations((0, 1, 2))[0] == () and len(flip_combinations((0, 1, 2))) == 8
    assert flip_combinations(None) == [()]
