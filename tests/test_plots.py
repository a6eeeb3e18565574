"""The figures that need no trained model: the semi-supervised progress plot and a filter round's cut."""

from __future__ import annotations

from pathlib import Path

from nnfiltermatch.method.pool_filter import CaseScore, FilterRound
from nnfiltermatch.plots import filter_cut, plot_ssl_progress, round_histogram_png


def test_ssl_progress_plot_still_written(tmp_path: Path) -> None:
    logging = {
        "sup_losses": [1.0, 0.8],
        "unsup_losses": [0.0, 0.4],
        "confident_fraction": [float("nan"), 0.3],
        "pool_size": [10, 9],
        "unsup_weight": [0.0, 1.0],
    }
    assert plot_ssl_progress(logging, tmp_path) == tmp_path / "progress_ssl.png"
    assert plot_ssl_progress({"sup_losses": []}, tmp_path / "none") is None


def _round(*cases: CaseScore) -> FilterRound:
    return FilterRound(epoch=3, score="mean", mirroring=False, tile_step=1.0, seconds=1.0, cases=cases)


def test_the_cut_lies_halfway_between_the_highest_dropped_and_the_lowest_kept_score() -> None:
    a, b, c = CaseScore("a", 0.1, False), CaseScore("b", 0.3, False), CaseScore("c", 0.5, True)
    assert filter_cut(_round(a, b, c)) == 0.4
    assert filter_cut(_round(c)) is None  # none dropped
    assert filter_cut(_round(a, b)) == 0.3  # all dropped: the highest dropped score
    assert str(round_histogram_png(_round(a, b, c))).startswith("data:image/png;base64,")
    assert round_histogram_png(_round()) is None  # an empty pool has no histogram
