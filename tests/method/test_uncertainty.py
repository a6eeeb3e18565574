"""Tests for entropy / margin scores, case-score reductions, the drop-count rule and the filter schedule."""

from __future__ import annotations

import math

import pytest
import torch

from nnfiltermatch.method.uncertainty import (
    filter_schedule,
    margin_map,
    reduce_case_score,
    select_cases_to_drop,
    voxel_entropy,
)


def test_voxel_entropy_values_and_dims() -> None:
    onehot = torch.tensor([1.0, 0.0, 0.0]).reshape(3, 1, 1)
    uniform = torch.full((3, 1, 1), 1 / 3)
    assert voxel_entropy(onehot).item() == pytest.approx(0.0, abs=1e-6)
    assert voxel_entropy(uniform).item() == pytest.approx(math.log(3), rel=1e-5)
    batch = torch.softmax(torch.randn(2, 4, 5, 6), dim=1)
    ent = voxel_entropy(batch, dim=1)
    assert ent.shape == (2, 5, 6)
    assert torch.allclose(ent[1], voxel_entropy(batch[1], dim=0))
    assert (ent >= 0).all() and (ent <= math.log(4) + 1e-5).all()


def test_confident_case_scores_lower_than_uncertain() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 8, 8, generator=g)
    confident = torch.softmax(logits * 10, dim=0)
    uncertain = torch.softmax(logits * 0.1, dim=0)
    for how in ("mean", "sum", "topk"):
        assert reduce_case_score(voxel_entropy(confident), how) < reduce_case_score(voxel_entropy(uncertain), how)
    assert margin_map(confident).mean() < margin_map(uncertain).mean()


def test_mean_vs_sum_on_different_sizes() -> None:
    small = torch.full((10, 10), 0.5)
    big = torch.full((20, 20, 20), 0.4)  # less uncertain per voxel, but many more voxels
    assert reduce_case_score(big, "sum") > reduce_case_score(small, "sum")  # sum favours (ranks higher) the bigger
    assert reduce_case_score(big, "mean") < reduce_case_score(small, "mean")  # mean compares per voxel
    same_small = torch.full((4, 4), 0.3)
    same_big = torch.full((40, 40), 0.3)
    assert reduce_case_score(same_small, "mean") == pytest.approx(reduce_case_score(same_big, "mean"))
    assert reduce_case_score(same_big, "sum") == pytest.approx(100 * reduce_case_score(same_small, "sum"))


def test_topk() -> None:
    emap = torch.arange(100, dtype=torch.float32)  # 0..99
    assert reduce_case_score(emap, "topk", 0.1) == pytest.approx(sum(range(90, 100)) / 10)
    assert reduce_case_score(emap, "topk", 0.29) == pytest.approx(sum(range(71, 100)) / 29)  # no float off-by-one
    assert reduce_case_score(emap, "topk", 0.001) == pytest.approx(99.0)  # at least one voxel
    assert reduce_case_score(emap, "topk", 1.0) == pytest.approx(reduce_case_score(emap, "mean"))
    # a small uncertain region stands out under topk but is diluted by the mean
    focal = torch.zeros(1000)
    focal[:50] = 1.0
    diffuse = torch.full((1000,), 0.1)
    assert reduce_case_score(focal, "topk", 0.05) > reduce_case_score(diffuse, "topk", 0.05)
    assert reduce_case_score(focal, "mean") < reduce_case_score(diffuse, "mean")
    with pytest.raises(ValueError):
        reduce_case_score(emap, "topk", 0.0)
    with pytest.raises(ValueError):
        reduce_case_score(emap, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        reduce_case_score(torch.empty(0), "mean")


def test_margin_map() -> None:
    probs = torch.tensor([[0.7, 0.5, 1.0], [0.2, 0.5, 0.0], [0.1, 0.0, 0.0]])  # (C=3, 3 voxels)
    assert torch.allclose(margin_map(probs), torch.tensor([0.5, 1.0, 0.0]))
    with pytest.raises(ValueError):
        margin_map(torch.ones(1, 4))


@pytest.mark.parametrize(
    "n, fraction, expected",
    [
        (0, 0.5, 0),
        (1, 0.5, 0),  # never drop the last case
        (1, 1.0, 0),
        (2, 0.1, 1),  # at least one when fraction > 0 and n >= 2
        (2, 1.0, 1),
        (3, 0.25, 1),
        (5, 0.0, 0),
        (5, 1.0, 4),  # keep >= 1
        (8, 0.25, 2),
        (10, 0.25, 2),  # floor(2.5)
        (10, 0.3, 3),
        (100, 0.29, 29),  # 0.29 * 100 == 28.999999999999996 in floating point
        (7, 0.5, 3),
    ],
)
def test_drop_count(n: int, fraction: float, expected: int) -> None:
    scores = {f"case_{i:03d}": float(i) for i in range(n)}
    dropped = select_cases_to_drop(scores, fraction)
    assert len(dropped) == expected
    assert dropped == [f"case_{i:03d}" for i in range(expected)]  # lowest scores first


def test_drop_tie_break_and_validation() -> None:
    scores = {"c": 0.1, "a": 0.1, "b": 0.1, "z": 0.0, "d": 0.5}
    assert select_cases_to_drop(scores, 0.6) == ["z", "a", "b"]
    with pytest.raises(ValueError):
        select_cases_to_drop(scores, -0.1)
    with pytest.raises(ValueError):
        select_cases_to_drop(scores, 1.5)
    with pytest.raises(ValueError):
        select_cases_to_drop({"a": float("nan"), "b": 1.0}, 0.5)


@pytest.mark.parametrize(
    "epochs, expected",
    [
        (300, [100, 200]),
        (30, [10, 20]),
        (6, [2, 4]),
        (2, [1]),
        (1, []),
        (0, []),
        (1000, [333, 667]),
        (10, [3, 7]),
        (40, [13, 27]),
        (4, [1, 3]),
    ],
)
def test_filter_schedule_defaults(epochs: int, expected: list[int]) -> None:
    sched = filter_schedule(epochs)
    assert sched == expected
    assert all(1 <= e < epochs for e in sched)


def test_filter_schedule_overrides_and_validation() -> None:
    assert filter_schedule(300, start=50, every=50) == [50, 100, 150, 200, 250]
    assert filter_schedule(300, start=250) == [250]
    assert filter_schedule(300, every=75) == [100, 175, 250]
    assert filter_schedule(300, start=300) == []
    assert filter_schedule(10, start=1, every=1) == list(range(1, 10))
    with pytest.raises(ValueError, match="num_epochs"):
        filter_schedule(-1)
    with pytest.raises(ValueError, match="start"):
        filter_schedule(10, start=-2)
    with pytest.raises(ValueError, match="start"):
        filter_schedule(10, start=0)
    with pytest.raises(ValueError, match="every"):
        filter_schedule(10, every=0)
    with pytest.raises(ValueError, match="every"):
        filter_schedule(10, every=-3)
