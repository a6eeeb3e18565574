"""The filter round as data: the decision at its edges, and the record exactly as round files hold it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nnfiltermatch.method.pool_filter import CaseScore, FilterRound, case_score, decide_round
from nnfiltermatch.method.uncertainty import reduce_case_score, voxel_entropy

SETTINGS = {"epoch": 2, "score": "mean", "mirroring": False, "tile_step": 1.0, "seconds": 1.23456}


def _decide(pool: list[str], scores: dict[str, float], fraction: float) -> FilterRound:
    return decide_round(pool, scores, fraction, **SETTINGS)


def test_the_most_confident_fraction_is_dropped_and_the_pool_keeps_its_order() -> None:
    pool = ["d", "b", "a", "c", "e"]
    record = _decide(pool, {"a": 0.5, "b": 0.1, "c": 0.9, "d": 0.2, "e": 0.7}, 0.4)
    assert record.dropped == ["b", "d"] and record.remaining(pool) == ["a", "c", "e"]
    assert [c.case for c in record.cases] == ["a", "b", "c", "d", "e"]  # the record lists cases by id
    assert (record.pool_before, record.pool_after, record.seconds) == (5, 3, 1.235)


def test_empty_pool_and_the_extreme_fractions() -> None:
    empty = _decide([], {}, 0.5)
    assert empty.cases == () and empty.pool_before == 0 and empty.pool_after == 0 and empty.remaining([]) == []
    pool = ["a", "b", "c", "d"]
    scores = {"a": 0.4, "b": 0.3, "c": 0.2, "d": 0.1}
    assert _decide(pool, scores, 0.0).dropped == []
    assert _decide(pool, scores, 1.0).remaining(pool) == ["a"]  # one case is always kept
    assert _decide(["a"], {"a": 0.1}, 1.0).dropped == []
    assert _decide(["a", "b"], {"a": 0.2, "b": 0.1}, 0.01).dropped == ["b"]  # a non-zero fraction drops one


def test_ties_are_broken_by_case_id() -> None:
    record = _decide(["z", "y", "x", "w"], {"z": 0.5, "y": 0.5, "x": 0.5, "w": 0.9}, 0.5)
    assert record.dropped == ["x", "y"]


def test_refusals() -> None:
    with pytest.raises(ValueError, match="NaN"):
        _decide(["a", "b"], {"a": float("nan"), "b": 1.0}, 0.5)
    with pytest.raises(ValueError, match="no score for 1 case"):
        _decide(["a", "b"], {"a": 1.0}, 0.5)
    with pytest.raises(ValueError, match="twice"):
        _decide(["a", "a"], {"a": 1.0}, 0.5)
    with pytest.raises(ValueError, match="drop_fraction"):
        _decide(["a"], {"a": 1.0}, 1.5)


def test_scores_of_cases_outside_the_pool_are_ignored() -> None:
    record = _decide(["a", "b"], {"a": 0.9, "b": 0.8, "gone": 0.0}, 0.5)
    assert record.dropped == ["b"] and [c.case for c in record.cases] == ["a", "b"]


def test_the_record_is_the_round_file_key_for_key() -> None:
    """What the trainer wrote before the record had a type: same keys, same order, same values."""
    written = {
        "epoch": 2,
        "score": "mean",
        "mirroring": False,
        "tile_step": 1.0,
        "pool_before": 3,
        "pool_after": 2,
        "seconds": 1.235,
        "cases": [
            {"case": "a", "score": 0.5, "kept": True},
            {"case": "b", "score": 0.1, "kept": False},
            {"case": "c", "score": 0.9, "kept": True},
        ],
    }
    record = _decide(["c", "a", "b"], {"a": 0.5, "b": 0.1, "c": 0.9}, 0.34)
    assert json.dumps(record.to_json(), indent=2) == json.dumps(written, indent=2)
    assert FilterRound.from_json(written) == record
    assert FilterRound.from_json(json.loads(json.dumps(record.to_json()))).to_json() == written
    ddp = FilterRound.from_json({**written, "world_size": 2})
    assert ddp.world_size == 2 and list(ddp.to_json())[-1] == "world_size"


def test_records_of_older_versions_still_read() -> None:
    """Older round files carry a round-level "scoring" and a per-case "source": both are ignored."""
    old = {
        "epoch": 1,
        "score": "sum",
        "scoring": "window",
        "mirroring": True,
        "tile_step": 0.5,
        "pool_before": 2,
        "pool_after": 1,
        "seconds": 3.0,
        "cases": [
            {"case": "a", "score": 2.0, "kept": True, "source": "window"},
            {"case": "b", "score": 1.0, "kept": False, "source": "running"},
        ],
    }
    record = FilterRound.from_json(old)
    assert record.cases == (CaseScore("a", 2.0, True), CaseScore("b", 1.0, False))
    assert record.score == "sum" and record.mirroring and record.tile_step == 0.5 and record.world_size is None
    with pytest.raises(ValueError, match="no 'cases'"):
        FilterRound.from_json({k: v for k, v in old.items() if k != "cases"})


def test_case_score_is_the_reduced_entropy_of_the_softmax() -> None:
    logits = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    entropy = voxel_entropy(torch.softmax(logits, dim=0), dim=0)
    for how in ("mean", "sum", "topk"):
        assert case_score(logits, how, 0.1) == reduce_case_score(entropy, how, 0.1)
    assert math.isclose(case_score(torch.zeros(2, 3, 3), "mean", 0.1), math.log(2), rel_tol=1e-6)
