"""nnU-Net's own command-line tools on a model folder trained by us: nnUNetv2_predict and nnUNetv2_evaluate_folder.

A tiny filtermatch model (2 epochs x 2 iterations, no filter round) is trained in a subprocess on a copy of the
session's prepared tree; nnU-Net's executables from this venv then predict two held-out cases with our trainer name,
found through ``nnUNet_extTrainer`` as the README says, and score them against their reference labels.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import CONFIG, DATASET, LABELED, SUBSET
from model_trees import (
    EXT_TRAINER,
    image_array,
    nnunet_env,
    nnunet_predict_as_ours,
    run_cli_subprocess,
    run_nnunet,
    skip_without_torchvision,
    small_prepared_tree,
)

TRAINER = "nnFilterMatchTrainer"
CASES = ["hippocampus_065", "hippocampus_067"]
TRAIN_ARGS = [
    "train", "-d", "901", "-c", CONFIG, "-f", "all", "--mode", "filtermatch", "--device", "cpu",
    "--epochs", "2", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1", "--warmup-epochs", "1",
    "--filter-start", "2", "--no-final-validation",
]  # fmt: skip


@dataclass
class Model:
    root: Path
    model_dir: Path
    inputs: Path  # CASES as CASE_0000.nii.gz
    env: dict[str, str]  # for nnU-Net's commands: the tree's folders, one thread


@pytest.fixture(scope="module")
def model(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    skip_without_torchvision()
    root = tmp_path_factory.mktemp("nnunet_tools")
    small_prepared_tree(prepared, root, n_unlabeled=2)
    env = nnunet_env(root)
    run_cli_subprocess(TRAIN_ARGS, env)
    inputs = root / "inputs"
    inputs.mkdir()
    for case in CASES:
        (inputs / f"{case}_0000.nii.gz").write_bytes((SUBSET / "imagesTs" / f"{case}_0000.nii.gz").read_bytes())
    yield Model(root, root / "results" / DATASET / f"{TRAINER}__nnUNetPlans__{CONFIG}", inputs, env)


def test_nnunet_predict_and_evaluate_folder_on_our_model(model: Model) -> None:
    # nnUNetv2_predict segments as our own predict does (same network and weights), voxel for voxel
    done, out = nnunet_predict_as_ours(model.model_dir, model.inputs, model.root, model.env)
    assert f"Using trainer '{TRAINER}' from: {EXT_TRAINER}" in done.stdout, done.stdout[-3000:]
    for case in CASES:
        segmentation = image_array(out / f"{case}.nii.gz")
        assert segmentation.shape == image_array(model.inputs / f"{case}_0000.nii.gz").shape
        assert set(np.unique(segmentation)) <= {0, 1, 2}

    reference = model.root / "labelsTs"
    reference.mkdir()
    for case in CASES:
        (reference / f"{case}.nii.gz").write_bytes((SUBSET / "labelsTs" / f"{case}.nii.gz").read_bytes())
    summary = model.root / "summary.json"
    evaluate = [str(reference), str(out), "-djfile", str(model.model_dir / "dataset.json")]
    evaluate += ["-pfile", str(model.model_dir / "plans.json"), "-o", str(summary), "-np", "1"]
    run_nnunet("nnUNetv2_evaluate_folder", evaluate, model.env)
    result = json.loads(summary.read_text())
    assert len(result["metric_per_case"]) == len(CASES)
    for entry in result["metric_per_case"]:
        case = Path(entry["prediction_file"]).name.removesuffix(".nii.gz")
        predicted, truth = image_array(out / f"{case}.nii.gz"), image_array(reference / f"{case}.nii.gz")
        for label in ("1", "2"):
            p, t = predicted == int(label), truth == int(label)
            expected = 2 * np.sum(p & t) / (np.sum(p) + np.sum(t)) if (p.any() or t.any()) else np.nan
            np.testing.assert_allclose(entry["metrics"][label]["Dice"], expected, rtol=1e-6)
    for label in ("1", "2"):
        assert 0.0 <= result["mean"][label]["Dice"] <= 1.0
    assert 0.0 <= result["foreground_mean"]["Dice"] <= 1.0


def test_nnunet_find_best_configuration_on_our_fold_model(prepared: Path, tmp_path: Path) -> None:
    """nnUNetv2_find_best_configuration on a fold trained by us with --npz: it accumulates our fold's validation,
    scores it, picks our trainer and writes nnU-Net's inference instructions for it. Needs no torchvision (it
    looks up no trainer class), so this runs in every venv."""
    small_prepared_tree(prepared, tmp_path, n_unlabeled=2)
    env = nnunet_env(tmp_path)
    pre = tmp_path / "preprocessed" / DATASET
    args = ["train", "-d", "901", "-c", CONFIG, "-f", "0", "--mode", "supervised", "--device", "cpu", "--npz"]
    # 4 labelled cases are too few for nnU-Net's 5-fold split: refused, unless the user's own folds are there
    splits_file = pre / "splits_final.json"
    refused = _train_refused(args, env)
    assert "5-fold split needs at least 5 labelled cases" in refused and str(splits_file) in refused
    splits_file.write_text('{"train": []}')
    assert f"{splits_file}: not a list of" in _train_refused(args, env)
    folds = [LABELED[:2], LABELED[2:]]  # two folds of two, as nnU-Net writes its own
    splits_file.write_text(json.dumps([{"train": folds[1 - k], "val": folds[k]} for k in (0, 1)]))
    assert f"-f 2: {splits_file} has 2 fold(s), 0-1" in _train_refused([*args[:6], "2", *args[7:]], env)
    run_cli_subprocess([*args, "--epochs", "1", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1"], env)
    trainer = "nnFilterMatchTrainer_supervised"
    model_dir = tmp_path / "results" / DATASET / f"{trainer}__nnUNetPlans__{CONFIG}"
    assert sorted(p.stem for p in (model_dir / "fold_0" / "validation").glob("*.npz")) == folds[0]

    best = ["901", "-c", CONFIG, "-tr", trainer, "-p", "nnUNetPlans", "-f", "0", "-np", "1", "--disable_ensembling"]
    done = run_nnunet("nnUNetv2_find_best_configuration", best, env)
    assert f"*Best*: {trainer}__nnUNetPlans__{CONFIG}" in done.stdout, done.stdout[-3000:]
    merged = model_dir / "crossval_results_folds_0"
    summary = json.loads((merged / "summary.json").read_text())
    assert sorted(Path(c["prediction_file"]).name for c in summary["metric_per_case"]) == [
        f"{case}.nii.gz" for case in folds[0]
    ]
    own = json.loads((model_dir / "fold_0" / "validation" / "summary.json").read_text())
    assert summary["foreground_mean"]["Dice"] == pytest.approx(own["foreground_mean"]["Dice"])
    information = json.loads((tmp_path / "results" / DATASET / "inference_information.json").read_text())
    chosen = information["best_model_or_ensemble"]["selected_model_or_models"]
    assert chosen == [{"configuration": CONFIG, "trainer": trainer, "plans_identifier": "nnUNetPlans"}]
    instructions = (tmp_path / "results" / DATASET / "inference_instructions.txt").read_text()
    assert f"nnUNetv2_predict -d {DATASET} -i INPUT_FOLDER -o OUTPUT_FOLDER -f  0 -tr {trainer}" in instructions


def _train_refused(args: list[str], env: dict[str, str]) -> str:
    """stderr of a `train` refused with exit status 2 before anything is built."""
    done = run_cli_subprocess(args, env, returncode=2)
    assert not (Path(env["nnUNet_results"]) / DATASET).exists()
    return " ".join(done.stderr.split())
