"""The HTML report of a trained fold (tiny real model), its evaluation table, errors, and a real browser rendering."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO
from nnfiltermatch.cli import main
from nnfiltermatch.metrics import CaseRow, EvaluationResult
from nnfiltermatch.reports import (
    ReportError,
    build_report,
    filter_cut,
    plot_ssl_progress,
    resolve_fold_dir,
)
from test_query import tiny_model_in_own_tree

SECTIONS = ("summary", "curves", "pool", "rounds", "config", "evaluation")
PNG_URI = "data:image/png;base64,"


@pytest.fixture(scope="module")
def model_dir(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with tiny_model_in_own_tree(prepared, tmp_path_factory.mktemp("report")) as trained:
        yield trained.model_dir


@pytest.fixture(scope="module")
def report(model_dir: Path) -> Path:
    return build_report(model_dir)  # the model folder: its one fold is found


def _evaluation(path: Path) -> Path:
    """A real `evaluate -o` summary: case b is the worst (lowest mean Dice), then c, then a."""
    nan = float("nan")
    rows = [
        CaseRow("case_a", 1, 0.9, 0.82, 1.0, 0.5, 0.5, 100, 98),
        CaseRow("case_a", 2, 0.8, 0.67, 2.0, 0.6, 0.7, 80, 85),
        CaseRow("case_b", 1, 0.0, 0.0, nan, nan, nan, 90, 0),
        CaseRow("case_b", 2, 0.3, 0.18, 9.0, 3.0, 3.5, 70, 20),
        CaseRow("case_c", 1, 0.5, 0.33, 4.0, 1.0, 1.2, 60, 70),
        CaseRow("case_c", 2, 0.6, 0.43, 3.0, 1.1, 1.3, 50, 40),
    ]
    return EvaluationResult.from_rows(rows, [1, 2], "voxel").to_json(path)


def test_report_has_every_section_and_only_embedded_images(model_dir: Path, report: Path) -> None:
    assert report == model_dir / "fold_all" / "report.html"
    page = report.read_text()
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in page and f'href="#{anchor}"' in page
    images = re.findall(r'<img alt="([^"]+)" src="([^"]+)"', page)
    assert {alt for alt, _ in images} == {"learning curves", "pool size", "filter round 1"}
    for _, src in images:
        assert src.startswith(PNG_URI)
        assert base64.b64decode(src[len(PNG_URI) :])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained
    record = json.loads((model_dir / "fold_all" / "filter_rounds" / "epoch_0001.json").read_text())
    dropped = [c["case"] for c in record["cases"] if not c["kept"]]
    assert dropped and all(f"<td>{case}</td>" in page for case in dropped)
    assert f"cut {filter_cut(record):.5g}" in page
    config = json.loads((model_dir / "fold_all" / "nnfiltermatch_config.json").read_text())
    assert all(f"<td>{key}</td>" in page for key in config)  # the resolved configuration, every option
    assert "checkpoint_final.pth (epochs completed: 2)" in page and "2 of 2 planned" in page
    assert "No evaluation summary found" in page


def test_evaluation_worst_first_given_or_found(model_dir: Path, tmp_path: Path, capsys) -> None:
    summary = _evaluation(tmp_path / "summary.json")
    out = tmp_path / "r.html"
    assert main(["report", str(model_dir / "fold_all"), "-o", str(out), "--evaluation", str(summary)]) == 0
    assert str(out) in capsys.readouterr().out
    page = out.read_text()
    table = page[page.index('<section id="evaluation">') :]
    assert table.index("case_b") < table.index("case_c") < table.index("case_a")
    assert "<th>Anterior Dice</th>" in table and "<th>Posterior HD95</th>" in table
    assert "n/a" in table  # case_b's undefined distance is shown as such, not as 0

    found = _evaluation(model_dir / "evaluation_test.json")  # found in the model folder without --evaluation
    try:
        page = build_report(model_dir, output=tmp_path / "found.html").read_text()
        assert str(found) in page and "case_b" in page
    finally:
        found.unlink()


def test_latest_checkpoint_when_there_is_no_final(model_dir: Path, tmp_path: Path) -> None:
    fold = tmp_path / "run" / "fold_all"
    fold.mkdir(parents=True)
    shutil.copy(model_dir / "fold_all" / "checkpoint_final.pth", fold / "checkpoint_latest.pth")
    page = build_report(fold).read_text()
    assert "checkpoint_latest.pth" in page and "No filter round" not in page  # rounds are in the checkpoint too


def test_errors(model_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ReportError, match="not a trained model folder"):
        build_report(tmp_path)
    two = tmp_path / "two"
    for fold in ("fold_0", "fold_1"):
        (two / fold).mkdir(parents=True)
        (two / fold / "checkpoint_final.pth").symlink_to(model_dir / "fold_all" / "checkpoint_final.pth")
    with pytest.raises(ReportError, match="choose one with -f"):
        resolve_fold_dir(two)
    assert resolve_fold_dir(two, 1) == two / "fold_1"
    (tmp_path / "bad.json").write_text(json.dumps({"cases": []}))
    with pytest.raises(ReportError, match="not a summary"):
        build_report(model_dir, output=tmp_path / "x.html", evaluation=tmp_path / "bad.json")


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


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (apt-get install -y chromium)")
def test_report_renders_in_a_real_browser(report: Path, tmp_path: Path) -> None:
    from PIL import Image

    shot = tmp_path / "report.png"
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "screenshot_report.sh"), str(report), str(shot), "1400x3000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert shot.stat().st_size > 50_000
    image = Image.open(shot).convert("RGB")
    assert image.size == (1400, 3000)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500  # text, tables and plots, not a blank or error page
    top = image.crop((0, 0, 1400, 1500)).getcolors(maxcolors=1 << 20)
    assert top is not None and len(top) > 200
