"""The strategy registry and the seeded draws of the random baselines."""

from __future__ import annotations

import pytest

from nnfiltermatch.method.query_strategies import SCORE_TYPES, STRATEGIES, RankedCase, StrategyOptions, random_draw


def test_strategy_registry_and_seeded_draws() -> None:
    assert set(SCORE_TYPES) == {"entropy", "margin", "tta-variance"}
    assert set(STRATEGIES) == {*SCORE_TYPES, "random", "foreground-random"}
    assert all(STRATEGIES[s].voxel_map == s and STRATEGIES[s].predicts for s in SCORE_TYPES)
    assert not STRATEGIES["random"].predicts and STRATEGIES["foreground-random"].predicts
    cases = [f"case_{i:03d}" for i in range(30)]

    def order(seed: int) -> list[str]:
        return sorted(cases, key=lambda c: -random_draw(seed, c))

    assert order(0) == order(0) and order(0) != order(1) and sorted(order(1)) == cases
    assert all(0.0 <= random_draw(seed, c) < 1.0 for seed in range(3) for c in cases)
    options = StrategyOptions(seed=3, min_foreground_ml=0.1)
    rows = [RankedCase(c, 0.5, "computed", {1: 40 * i, 2: 0}, 0.001) for i, c in enumerate(cases)]  # 0.04 i mL
    random_spec, foreground_spec = STRATEGIES["random"], STRATEGIES["foreground-random"]
    kept = [r.case for r in rows if foreground_spec.priority(r, options) is not None]
    assert kept == cases[3:]  # 0 (no foreground at all), 0.04 and 0.08 mL are not above 0.1 mL
    for row in rows[3:]:  # the same draw as random: foreground-random is random's order, restricted
        assert foreground_spec.priority(row, options) == random_spec.priority(row, options) == random_draw(3, row.case)
    assert STRATEGIES["entropy"].priority(rows[0], options) == 0.5
    with pytest.raises(ValueError, match="not predicted"):
        foreground_spec.priority(RankedCase("x", 0.0, "reused"), options)
