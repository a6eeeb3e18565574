"""The active-learning loop benchmark's arithmetic (benchmarks/al_loop.py): budget area and paired differences."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
al_loop = pytest.importorskip("al_loop")


def _rounds(dice: list[float], start: int = 5, add: int = 5) -> list[dict]:
    return [{"labelled": [f"c{i}" for i in range(start + add * k)], "mean": {"dice": d}} for k, d in enumerate(dice)]


def test_budget_area_is_the_mean_dice_under_the_curve() -> None:
    assert al_loop.budget_area([5, 10, 15], [0.6, 0.8, 0.8]) == pytest.approx((0.7 * 5 + 0.8 * 5) / 10)
    assert al_loop.budget_area([5], [0.6]) == 0.6


def test_summary_pairs_each_strategy_with_random_seed_by_seed() -> None:
    loop = al_loop.quick_loop()
    arms = {
        "random": {0: _rounds([0.5, 0.6]), 1: _rounds([0.5, 0.7])},
        "entropy": {0: _rounds([0.5, 0.7]), 1: _rounds([0.5, 0.6]), 2: _rounds([0.1, 0.1])},  # seed 2 unpaired
    }
    summary, table = al_loop.summarise(loop, arms, ceiling=0.9)
    assert summary["seeds"] == [0, 1]
    entropy = summary["strategies"]["entropy"]
    assert entropy["labelled"] == [5, 10]
    assert entropy["mean_dice"] == pytest.approx([0.5, 0.65])
    assert entropy["budget_area"] == pytest.approx([0.6, 0.55])
    assert "| entropy | 50.0 (50.0, 50.0) | 65.0 (70.0, 60.0) | 57.5 | +5.0, -5.0 |" in table
    assert "- entropy: round 0 +0.0, round 1 +0.0" in table
    assert "Ceiling" in table and "90.0" in table
