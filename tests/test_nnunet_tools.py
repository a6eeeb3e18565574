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

from conftest import CONFIG, DATASET, SUBSET
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
