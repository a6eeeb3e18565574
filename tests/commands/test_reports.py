"""The HTML report of a trained fold (tiny real model), its evaluation table, errors, and a real browser rendering."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CONFIG, DATASET, LABELED, REPO
from model_trees import TRAINER_DIR, nnunet_env, run_cli_subprocess, tiny_model_in_own_tree
from nnfiltermatch.cli import main
from nnfiltermatch.commands.reports import ReportError, build_report
from nnfiltermatch.evaluation.results import CaseRow, EvaluationResult
from nnfiltermatch.method.pool_filter import FilterRound
from nnfiltermatch.plots import filter_cut
from nnfiltermatch.runs import LATEST_QUERY, RunFolderError

SECTIONS = ("summary", "curves", "pool", "rounds", "config", "evaluation")
PNG_URI = "data:image/png;base64,"


@pytest.fixture(scope="module")
def model_dir(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with tiny_model_in_own_tree(prepared, tmp_path_factory.mktemp("report")) as trained:
        yield trained.model_dir


@pytest.fixture(scope="module")
def report(model_dir: Path) -> Path:
    return build_report(model_dir)  # the model folder: its one fold is found


@pytest.fixture(scope="module")
def validated(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the module's tree (the model untouched for the other tests) after `train --val --npz` ran on it,
    as a user adds the softmax to a model trained without it; returns the copy's model folder."""
    root = tmp_path_factory.mktemp("validated") / "tree"
    shutil.copytree(model_dir.parents[2], root)
    before = (root / "results" / DATASET / TRAINER_DIR / "fold_all" / "checkpoint_final.pth").read_bytes()
    args = ["train", "-d", "901", "-c", CONFIG, "-f", "all", "--mode", "filtermatch", "--device", "cpu"]
    done = run_cli_subprocess([*args, "--val", "--npz"], nnunet_env(root))
    assert "Final validation in " in done.stdout and "softmax of 4 case(s) as .npz + .pkl" in done.stdout
    copy = root / "results" / DATASET / TRAINER_DIR
    assert (copy / "fold_all" / "checkpoint_final.pth").read_bytes() == before  # --val trains nothing
    return copy


def _sections(page: str) -> set[str]:
    return set(re.findall(r'<section id="([^"]+)">', page))


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
    assert f"cut {filter_cut(FilterRound.from_json(record)):.5g}" in page
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
    with pytest.raises(RunFolderError, match="not a trained model folder"):
        build_report(tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"cases": []}))
    with pytest.raises(ReportError, match="not a summary"):
        build_report(model_dir, output=tmp_path / "x.html", evaluation=tmp_path / "bad.json")


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


# ----- train --val --npz: nnU-Net's final validation of a trained model, and the report's sections -------------
def test_train_val_npz_writes_what_nnunet_ensembles(validated: Path, tmp_path: Path) -> None:
    import numpy as np
    import SimpleITK as sitk
    from nnunetv2.ensembling.ensemble import ensemble_crossvalidations

    validation = validated / "fold_all" / "validation"
    summary = json.loads((validation / "summary.json").read_text())
    assert sorted(Path(c["prediction_file"]).name for c in summary["metric_per_case"]) == [
        f"{case}.nii.gz" for case in LABELED
    ]  # -f all: nnU-Net validates on every labelled case
    assert set(summary["mean"]) == {"1", "2"} and 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
    for case in LABELED:
        probabilities = np.load(validation / f"{case}.npz")["probabilities"]
        assert probabilities.shape[0] == 3 and np.allclose(probabilities.sum(0), 1.0, atol=1e-3)
        assert (validation / f"{case}.pkl").is_file()

    # nnU-Net's own ensembling (what nnUNetv2_find_best_configuration runs) reads the folder: the model with itself
    out = tmp_path / "ensemble"
    ensemble_crossvalidations([str(validated), str(validated)], str(out), folds=("all",), num_processes=1)
    for case in LABELED:
        ours, theirs = (sitk.GetArrayFromImage(sitk.ReadImage(str(f / f"{case}.nii.gz"))) for f in (validation, out))
        np.testing.assert_array_equal(theirs, ours)


def test_train_npz_val_best_validates_after_training(validated: Path) -> None:
    """A training with --npz --val_best ends with nnU-Net's validation from checkpoint_best, softmax saved."""
    args = ["train", "-d", "901", "-c", CONFIG, "-f", "all", "--mode", "supervised", "--device", "cpu"]
    args += ["--epochs", "1", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1", "--npz", "--val_best"]
    env = {**nnunet_env(validated.parents[2]), "nnUNet_n_proc_DA": "0"}  # augmentation in-process: no worker start
    done = run_cli_subprocess(args, env)
    fold = validated.parent / TRAINER_DIR.replace("nnFilterMatchTrainer__", "nnFilterMatchTrainer_supervised__")
    assert "softmax of 4 case(s) as .npz + .pkl" in done.stdout
    assert (fold / "fold_all" / "checkpoint_best.pth").is_file()
    validation = fold / "fold_all" / "validation"
    assert len(json.loads((validation / "summary.json").read_text())["metric_per_case"]) == len(LABELED)
    assert sorted(p.stem for p in validation.glob("*.npz")) == sorted(LABELED)


def test_train_val_refused_without_the_checkpoint(
    validated: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before anything is built, naming the missing file and what the folder holds; exit status 2."""
    for key, value in nnunet_env(validated.parents[2]).items():
        monkeypatch.setenv(key, value)
    base = ["train", "-d", "901", "-c", CONFIG, "-f", "all", "--device", "cpu", "--val"]
    ssl = validated.parent / TRAINER_DIR.replace("nnFilterMatchTrainer__", "nnFilterMatchTrainer_ssl__")

    assert main([*base, "--mode", "ssl"]) == 2
    err = capsys.readouterr().err
    assert f"--val: {ssl / 'fold_all' / 'checkpoint_final.pth'} does not exist" in err
    assert "holds no checkpoint: this fold is not trained" in err
    assert not ssl.exists()  # nothing created

    (ssl / "fold_all").mkdir(parents=True)
    final = validated / "fold_all" / "checkpoint_final.pth"
    shutil.copy(final, ssl / "fold_all" / "checkpoint_latest.pth")  # an interrupted training
    assert main([*base, "--mode", "ssl"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint_final.pth does not exist" in err and "holds only checkpoint_latest.pth" in err
    assert "--continue" in err

    (ssl / "fold_all" / "checkpoint_latest.pth").rename(ssl / "fold_all" / "checkpoint_final.pth")
    assert main([*base, "--mode", "ssl", "--val_best"]) == 2
    err = capsys.readouterr().err
    assert f"--val --val_best: {ssl / 'fold_all' / 'checkpoint_best.pth'} does not exist" in err
    assert "no best checkpoint was saved" in err
    assert not (ssl / "fold_all" / "validation").exists()


def test_report_sections_for_validation_and_query_absent_without_them(report: Path) -> None:
    page = report.read_text()  # the module's model: trained with --no-final-validation and never queried
    assert not {"nnunet-validation", "query"} & _sections(page)
    assert "nnU-Net's final validation</a>" not in page and "Latest query" not in page


def test_report_shows_nnunets_validation_summary(validated: Path, tmp_path: Path) -> None:
    summary = json.loads((validated / "fold_all" / "validation" / "summary.json").read_text())
    page = build_report(validated, output=tmp_path / "r.html").read_text()
    assert "nnunet-validation" in _sections(page)
    section = page[page.index('<section id="nnunet-validation">') :]
    section = section[: section.index("</section>")]
    for label, name in (("1", "Anterior"), ("2", "Posterior")):  # class names from dataset.json, nnU-Net's Dice
        dice = summary["mean"][label]["Dice"]
        assert f'<td>{name}</td><td>{label}</td><td class="num">{dice:.4f}</td>' in section
    assert f"{summary['foreground_mean']['Dice']:.4f}" in section and "4 case(s)" in section
    assert "Softmax of 4 case(s) saved" in section and "optimistic" in section  # -f all: training cases


def test_report_shows_the_latest_query_ranking(
    validated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import csv

    for key, value in nnunet_env(validated.parents[2]).items():
        monkeypatch.setenv(key, value)
    ranking = tmp_path / "elsewhere" / "ranking.csv"  # -o outside the model folder: query_latest.json points there
    query = ["query", "-m", str(validated), "--strategy", "random", "--seed", "3", "--png-top", "0", "-o", str(ranking)]
    assert main([*query, "--device", "cpu"]) == 0, capsys.readouterr().err
    with open(ranking, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10 and all(r["reason"].endswith("(seed 3)") for r in rows)

    page = build_report(validated, output=tmp_path / "r.html").read_text()
    assert "query" in _sections(page)
    section = page[page.index('<section id="query">') : page.index('<section id="evaluation">')]
    assert f"<code>{ranking.resolve()}</code>" in section and "random (seed 3)" in section
    assert "10 case(s) listed of 10 ranked" in section and "Shown: every listed case" in section
    for row in rows:
        assert f"<td>{row['case']}</td>" in section and f"<td>{row['reason']}</td>" in section

    # a ranking of an older version (no query_latest.json, no reason column) in the model folder is found too
    (validated / LATEST_QUERY).unlink()
    old = validated / "query_ranking_entropy.csv"
    old.write_text("rank,case,score,source\n1,hippocampus_099,0.25,computed\n")
    try:
        page = build_report(validated, output=tmp_path / "old.html").read_text()
        assert "<td>hippocampus_099</td>" in page and "<td>entropy score (computed)</td>" in page
        assert f"<code>{old}</code>" in page
    finally:
        old.unlink()
    assert "query" not in _sections(build_report(validated, output=tmp_path / "none.html").read_text())


def test_configuration_table_marks_defaults_and_has_no_empty_cell(report: Path) -> None:
    page = report.read_text()
    section = page[page.index('<section id="config">') :]
    section = section[: section.index("</section>")]
    cells = {k: html.unescape(v) for k, v in re.findall(r"<tr><td>([a-z_]+)</td><td>([^<]*)</td></tr>", section)}
    assert cells and all(value.strip() for value in cells.values())  # every option has a value
    assert cells["batch_size"].endswith("(default: the plan's batch size)") and cells["batch_size"][0].isdigit()
    assert cells["tau"] == "0.9 (default)" and cells["lr"] == "0.01 (default)"
    assert cells["teacher"] == "student (default ema)"  # set by the tiny training, the default named
    assert cells["ssl_start_dice"] == "0.0 (default 0.5)" and cells["epochs"] == "2 (default 100)"
    assert cells["warmup_epochs"] == "1 (default)" and cells["rampup_epochs"] == "0 (default)"  # at --epochs 2
    assert cells["filter_every"] == "1 (default: ceil(epochs/3))"  # left unset: what it came to
