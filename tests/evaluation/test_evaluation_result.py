"""Tests for nnfiltermatch.evaluation.results: aggregates over cases skip undefined distances instead of counting 0."""

from __future__ import annotations

import math

import pytest

from nnfiltermatch.evaluation.results import CaseRow, EvaluationResult


def test_undefined_distances_are_skipped_not_averaged_as_zero() -> None:
    rows = [
        CaseRow("a", 1, 0.8, 0.6, 2.0, 1.0, 1.5, 10, 12),
        CaseRow("b", 1, 0.0, 0.0, math.nan, math.nan, math.nan, 10, 0),
        CaseRow("a", 2, 0.6, 0.4, 4.0, 3.0, 3.5, 10, 9),
        CaseRow("b", 2, 0.8, 0.6, 6.0, 5.0, 5.5, 10, 11),
    ]
    res = EvaluationResult.from_rows(rows, [1, 2], "voxel")
    assert res.per_class_mean[1]["hd95"] == 2.0  # not (2 + 0) / 2
    assert res.per_class_std[1]["hd95"] == 0.0
    assert res.per_class_mean[1]["dice"] == pytest.approx(0.4)  # Dice 0 does count
    assert res.n_undefined == {1: 1, 2: 0}
    assert res.per_class_mean[2]["asd"] == 4.0 and res.per_class_std[2]["asd"] == 1.0
    assert res.mean_over_classes["hd95"] == pytest.approx((2.0 + 5.0) / 2)
    assert res.n_cases == 2
    table = res.format_table()
    assert "1/2" in table and "±" in table and "mean" in table


def test_all_undefined_class_gives_nan_mean_without_warning(recwarn: pytest.WarningsRecorder) -> None:
    rows = [CaseRow("a", 1, 0.0, 0.0, math.nan, math.nan, math.nan, 5, 0)]
    res = EvaluationResult.from_rows(rows, [1], "mm")
    assert math.isnan(res.per_class_mean[1]["hd95"]) and res.n_undefined[1] == 1
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert "n/a" in res.format_table()
