"""nnU-Net's own command-line tools on a model folder trained by us: nnUNetv2_predict and nnUNetv2_evaluate_folder.

A tiny filtermatch model (2 epochs x 2 iterations, no filter round) is trained in a subprocess on a copy of the
session's prepared tree; nnU-Net's executables from this venv then predict two held-out cases with our trainer name,
found through ``nnUNet_extTrainer`` as the README says, and score them against their reference labels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import nnfiltermatch.nnunet
from conftest import CONFIG, DATASET, SUBSET
from model_trees import nnunet_env, run_cli_subprocess, run_nnunet, skip_without_torchvision, small_prepared_tree
from nnfiltermatch.commands.predict import predict_folder

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
    env: dict[str, str]  # for nnU-Net's commands: the tree's folders, nnUNet_extTrainer, one thread


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
    env = {**env, "nnUNet_extTrainer": os.path.dirname(nnfiltermatch.nnunet.__file__)}  # the README's setting
    yield Model(root, root / "results" / DATASET / f"{TRAINER}__nnUNetPlans__{CONFIG}", inputs, env)


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_nnunet_predict_and_evaluate_folder_on_our_model(model: Model) -> None:
    out = model.root / "nnunet_predictions"
    args = ["-i", str(model.inputs), "-o", str(out), "-d", DATASET, "-c", CONFIG, "-f", "all", "-tr", TRAINER]
    args += ["-npp", "1", "-nps", "1", "--disable_tta", "-step_size", "1.0", "-device", "cpu"]
    done = run_nnunet("nnUNetv2_predict", args, model.env)
    assert f"Using trainer '{TRAINER}' from: {model.env['nnUNet_extTrainer']}" in done.stdout, done.stdout[-3000:]
    for case in CASES:
        segmentation = _array(out / f"{case}.nii.gz")
        assert segmentation.shape == _array(model.inputs / f"{case}_0000.nii.gz").shape
        assert set(np.unique(segmentation)) <= {0, 1, 2}

    # the same network and weights through our own predict give the same segmentation, voxel for voxel
    ours = model.root / "our_predictions"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predict_folder(
            model.inputs, ours, model.model_dir, device="cpu", mirroring=False, step_size=1.0, progress=False
        )
    finally:
        torch.set_num_threads(threads)
    for case in CASES:
        np.testing.assert_array_equal(_array(ours / f"{case}.nii.gz"), _array(out / f"{case}.nii.gz"))

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
        predicted, truth = _array(out / f"{case}.nii.gz"), _array(reference / f"{case}.nii.gz")
        for label in ("1", "2"):
            p, t = predicted == int(label), truth == int(label)
            expected = 2 * np.sum(p & t) / (np.sum(p) + np.sum(t)) if (p.any() or t.any()) else np.nan
            np.testing.assert_allclose(entry["metrics"][label]["Dice"], expected, rtol=1e-6)
    for label in ("1", "2"):
        assert 0.0 <= result["mean"][label]["Dice"] <= 1.0
    assert 0.0 <= result["foreground_mean"]["Dice"] <= 1.0
