"""The figures that need no trained model: the semi-supervised progress plot."""

from __future__ import annotations

from pathlib import Path

from nnfiltermatch.plots import plot_ssl_progress


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
