"""Annotation rounds: one model folder per round, rounds.json, and one full round by the commands of an export's
README.txt (query --export, a label folder, add-labels, train --round, report showing two rounds).

The full round runs on a copy of the session's prepared Hippocampus subset (4 labelled cases, 4 unlabelled) with
tiny supervised trainings (2 epochs x 2 iterations) in subprocesses, as a user runs them.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CONFIG, DATASET, LABELED, SUBSET
from model_trees import nnunet_env, run_cli_subprocess, small_prepared_tree
from nnfiltermatch.cli import main
from nnfiltermatch.data.layout import MANIFEST_NAME
from nnfiltermatch.data.rounds import (
    QUERY_SETTINGS_NAME,
    ROUNDS_NAME,
    RoundError,
    check_round_for_training,
    load_rounds,
    model_dir_for_round,
    record_added_labels,
    record_trained_model,
    round_of_model_dir,
    trainer_folder_name,
)
from nnfiltermatch.runs import output_folder_for

PLAIN = f"nnFilterMatchTrainer_supervised__nnUNetPlans__{CONFIG}"
ROUND1 = f"nnFilterMatchTrainer_supervised_round1__nnUNetPlans__{CONFIG}"
TINY = [
    "--device", "cpu", "--epochs", "2", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1",
    "--no-final-validation",
]  # fmt: skip


# ----- folder names -----------------------------------------------------------------------------------------------
def test_round_folders_keep_nnunets_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    assert trainer_folder_name("nnFilterMatchTrainer", None) == trainer_folder_name("nnFilterMatchTrainer", 0)
    assert trainer_folder_name("nnFilterMatchTrainer", 0) == "nnFilterMatchTrainer"
    assert trainer_folder_name("nnFilterMatchTrainer_ssl", 3) == "nnFilterMatchTrainer_ssl_round3"
    plain = output_folder_for(DATASET, "nnFilterMatchTrainer", "nnUNetPlans", CONFIG, "all")
    assert output_folder_for(DATASET, "nnFilterMatchTrainer", "nnUNetPlans", CONFIG, "all", 0) == plain
    second = output_folder_for(DATASET, "nnFilterMatchTrainer", "nnUNetPlans", CONFIG, 0, 2)
    assert second == tmp_path / DATASET / f"nnFilterMatchTrainer_round2__nnUNetPlans__{CONFIG}" / "fold_0"
    # nnU-Net's own tools build the same path from -tr <Trainer>_round2
    assert Path(get_output_folder(DATASET, "nnFilterMatchTrainer_round2", "nnUNetPlans", CONFIG, 0)) == second
    assert round_of_model_dir(plain.parent) == 0 and round_of_model_dir(second.parent) == 2
    assert round_of_model_dir(tmp_path / "somewhere") is None
    assert model_dir_for_round(second.parent, 0) == plain.parent
    assert model_dir_for_round(plain.parent, 2) == second.parent
    with pytest.raises(RoundError, match="has no rounds"):
        model_dir_for_round(tmp_path / "somewhere", 1)


def test_round_options_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from nnfiltermatch.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "-d", "4", "-c", "2d", "-f", "0", "--round", "2"]).round_number == 2
    assert parser.parse_args(["train", "-d", "4", "-c", "2d", "-f", "0"]).round_number is None
    for command in (["query", "-d", "4", "-c", "2d"], ["predict", "-i", "a", "-o", "b", "-d", "4", "-c", "2d"]):
        assert parser.parse_args([*command, "--round", "1"]).round_number == 1
    assert parser.parse_args(["report", "-d", "4", "-c", "2d", "--round", "1"]).model_dir is None
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "-d", "4", "-c", "2d", "-f", "0", "--round", "-1"])
    assert "invalid round '-1'" in capsys.readouterr().err
    assert main(["query", "-m", "model", "--round", "1"]) == 2
    assert "not both (got -m and --round)" in capsys.readouterr().err
    assert main(["report"]) == 2 and "give the model folder" in capsys.readouterr().err
    assert main(["prepare", "-d", "4", "--query-export", "x"]) == 2
    assert "--query-export goes with --add-labels" in capsys.readouterr().err


# ----- rounds.json ------------------------------------------------------------------------------------------------
def test_rounds_record_and_the_checks_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    pre = tmp_path / DATASET
    pre.mkdir()
    start, first, second = ["a", "b"], ["c", "d"], ["e"]
    manifest = {"plans_name": "nnUNetPlans", "labeled_ids": start, "unlabeled_ids": ["c", "d", "e", "f"]}
    (pre / MANIFEST_NAME).write_text(json.dumps(manifest))
    check_round_for_training(DATASET, 0, start)  # no record yet: round 0 is the labelled set as it is
    with pytest.raises(RoundError, match="records no rounds yet"):
        check_round_for_training(DATASET, 1, start)

    query = {
        "strategy": "entropy", "seed": 0, "n": 3, "cases": ["c", "d", "f"], "model_dir": "/r/T__P__C",
        "model_round": 0, "folds": ["all"], "mode": "supervised", "configuration": "C", "next_round": 1,
    }  # fmt: skip
    entry, notes = record_added_labels(DATASET, start, first, tmp_path / "labelsTr", query)
    assert entry["round"] == 1 and entry["labelled"] == 4 and entry["added"] == ["c", "d"]
    assert entry["picked_not_labelled"] == ["f"] and notes == []
    data = load_rounds(DATASET)
    assert data is not None and [r["round"] for r in data["rounds"]] == [0, 1]
    assert data["rounds"][0]["labelled_cases"] == start
    assert [(m["folder"], m["fold"]) for m in data["rounds"][0]["models"]] == [("/r/T__P__C", "all")]  # the chooser
    assert data["rounds"][1]["query"]["strategy"] == "entropy" and data["rounds"][1]["models"] == []

    now = [*start, *first]
    check_round_for_training(DATASET, 1, now)
    with pytest.raises(RoundError, match="round 0 had 2 labelled cases, the dataset has 4 now"):
        check_round_for_training(DATASET, 0, now)
    with pytest.raises(RoundError, match="Add the labels of round 2 first"):
        check_round_for_training(DATASET, 2, now)
    fold = tmp_path / "results" / "T_round1__P__C" / "fold_all"
    record_trained_model(DATASET, 1, fold, mode="supervised", configuration="C", labelled=4)
    record_trained_model(DATASET, 1, fold, mode="supervised", configuration="C", labelled=4)  # retrained: replaced
    models = load_rounds(DATASET)["rounds"][1]["models"]  # type: ignore[index]
    assert [(m["folder"], m["fold"], m["recorded_by"]) for m in models] == [
        (str(fold.parent), "all", "train --round 1")
    ]

    _, notes = record_added_labels(DATASET, now, second, tmp_path / "more", None)  # no export: nothing chose them
    data = load_rounds(DATASET)
    assert data is not None and data["rounds"][2]["query"] is None and data["rounds"][2]["labelled"] == 5
    _, notes = record_added_labels(DATASET, ["a"], ["x"], tmp_path / "other", None)
    assert "labels changed outside --add-labels" in notes[0]
    assert sorted(p.name for p in pre.iterdir()) == [MANIFEST_NAME, ROUNDS_NAME]  # no temporary file, lock removed
    (pre / ROUNDS_NAME).write_text("{")
    with pytest.raises(RoundError, match="cannot read it as JSON"):
        check_round_for_training(DATASET, 1, now)


# ----- one round, end to end --------------------------------------------------------------------------------------
def readme_commands(readme: str) -> dict[str, list[str]]:
    """The nnfiltermatch commands of an export's README.txt, by subcommand."""
    found: dict[str, list[str]] = {}
    for line in readme.splitlines():
        if line.strip().startswith("nnfiltermatch "):
            words = shlex.split(line.strip())
            found[words[1]] = words[1:]
    return found


def test_one_full_round_by_the_readme_commands(
    prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    env = nnunet_env(root)
    env["nnUNet_n_proc_DA"] = "0"
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        torch.set_num_threads(1)
        try:
            _one_round(prepared, root, tmp_path, env, capsys)
        finally:
            torch.set_num_threads(threads)


def _one_round(
    prepared: Path, root: Path, tmp_path: Path, env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    cases = small_prepared_tree(prepared, root, 4)
    results, pre = root / "results" / DATASET, root / "preprocessed" / DATASET
    # round 0: the model of the labelled set you start from, trained as before (no --round)
    run_cli_subprocess(["train", "-d", "901", "-c", CONFIG, "-f", "all", "--mode", "supervised", *TINY], env)
    plain = results / PLAIN / "fold_all" / "checkpoint_final.pth"
    plain_bytes = plain.read_bytes()

    export = tmp_path / "round1"
    query = ["query", "-d", "901", "-c", CONFIG, "--mode", "supervised", "-n", "2", "--export", str(export)]
    assert main(query) == 0, capsys.readouterr().err
    capsys.readouterr()
    settings = json.loads((export / QUERY_SETTINGS_NAME).read_text())
    assert settings["model_dir"] == str(results / PLAIN) and settings["model_round"] == 0
    assert settings["next_round"] == 1 and settings["strategy"] == "entropy" and len(settings["cases"]) == 2
    commands = readme_commands((export / "README.txt").read_text())
    assert set(commands) == {"prepare", "train", "report", "query"}
    model_args = ["-d", DATASET, "-c", CONFIG, "-f", "all", "--mode", "supervised", "--round", "1"]
    assert commands["train"] == ["train", *model_args]
    assert commands["report"] == ["report", *model_args]
    assert commands["prepare"] == ["prepare", "-d", DATASET, "--add-labels", str(export.resolve() / "labelsTr")]
    assert commands["query"][-2:] == ["--export", str(export.resolve().with_name("round2"))]

    # the annotators: the true masks of the picked cases, saved where the README says
    for case in settings["cases"]:
        shutil.copy(SUBSET / "labelsTr" / f"{case}.nii.gz", export / "labelsTr" / f"{case}.nii.gz")
    assert main(commands["prepare"]) == 0, capsys.readouterr().err
    assert "Recorded as annotation round 1" in capsys.readouterr().out
    run_cli_subprocess([*commands["train"], *TINY], env)
    assert main(commands["report"]) == 0, capsys.readouterr().err
    capsys.readouterr()

    # the round's model: its own folder in nnU-Net's layout, under the real trainer's name; round 0's untouched
    fold = results / ROUND1 / "fold_all"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnFilterMatchTrainer_supervised"
    assert (results / ROUND1 / "plans.json").is_file() and list(fold.glob("training_log_*.txt"))
    assert plain.read_bytes() == plain_bytes
    assert sorted(p.name for p in results.iterdir()) == [PLAIN, ROUND1]
    assert sorted(p.name for p in (results / PLAIN).iterdir() if p.is_dir()) == ["fold_all"]

    rounds = json.loads((pre / ROUNDS_NAME).read_text())["rounds"]
    added = sorted(settings["cases"])
    assert [(r["round"], r["labelled"], r["added"]) for r in rounds] == [(0, 4, []), (1, 6, added)]
    assert [m["folder"] for m in rounds[0]["models"]] == [str(results / PLAIN)]
    assert rounds[1]["query"]["strategy"] == "entropy" and rounds[1]["query"]["n"] == 2
    assert rounds[1]["query"]["model_dir"] == str(results / PLAIN) and rounds[1]["query"]["seed"] == 0
    assert [(m["folder"], m["trained_on_labelled"]) for m in rounds[1]["models"]] == [(str(results / ROUND1), 6)]
    manifest = json.loads((pre / MANIFEST_NAME).read_text())
    assert manifest["labeled_ids"] == sorted([*LABELED, *added])
    assert rounds[1]["labelled_cases"] == manifest["labeled_ids"]

    page = (fold / "report.html").read_text()
    assert '<section id="annotation-rounds">' in page and 'alt="annotation rounds"' in page
    table = page.split('<section id="annotation-rounds">')[1].split("</section>")[0]
    rows = table.split("<tbody>")[1].split("</tr>")[:-1]
    assert len(rows) == 2
    assert rows[0].startswith("<tr><td>0</td><td>4</td><td>0</td><td>-</td>") and f"{PLAIN}/fold_all" in rows[0]
    assert rows[1].startswith("<tr><td>1</td><td>6</td><td>2</td><td>entropy (mean), top 2 of 4; model ")
    assert f"{ROUND1}/fold_all (this report)" in rows[1]
    for row in rows:
        assert "(epoch 1)</td>" in row  # the validation pseudo-Dice of the last of the 2 epochs

    # the next round starts from round 1's model by the README's query command
    later = commands["query"]
    later[later.index("-n") + 1] = "1"
    assert main(later) == 0, capsys.readouterr().err
    second = json.loads((tmp_path / "round2" / QUERY_SETTINGS_NAME).read_text())
    assert second["model_dir"] == str(results / ROUND1) and second["next_round"] == 2
    assert not set(second["cases"]) & set(added) and set(second["cases"]) <= set(cases)
    # and a model of round 0 can no longer be trained: the labelled set is round 1's
    assert main(["train", "-d", "901", "-c", CONFIG, "-f", "all", "--mode", "supervised", "--round", "0"]) == 2
    assert "round 0 had 4 labelled cases, the dataset has 6 now" in capsys.readouterr().err
