"""nnU-Net's own command-line tools on a model folder trained by us: nnUNetv2_predict and nnUNetv2_evaluate_folder.

A tiny filtermatch model (2 epochs x 2 iterations, no filter round) is trained in a subprocess on a copy of the
session's prepared tree; nnU-Net's executables from this venv then predict two held-out cases with our trainer name,
found through ``nnUNet_extTrainer`` as the README says, and score them against their reference labels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import nnfiltermatch.nnunet
from conftest import CONFIG, DATASET, SUBSET
from model_trees import nnunet_env, run_cli_subprocess, small_prepared_tree
from nnfiltermatch.commands.predict import predict_folder

BIN = Path(sys.executable).parent
TRAINER = "nnFilterMatchTrainer"
CASES = ["hippocampus_065", "hippocampus_067"]
TRAIN_ARGS = [
    "train", "-d", "901", "-c", CONFIG, "-f", "all", "--mode", "filtermatch", "--device", "cpu",
    "--epochs", "2", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1", "--warmup-epochs", "1",
    "--filter-start", "2", "--no-final-validation",
]  # fmt: skip


def torchvision_import_error() -> str | None:
    """None when this venv's torchvision imports (nnU-Net's trainer lookup needs it), else the error's last line."""
    done = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True, timeout=120)
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


@dataclass
class Model:
    root: Path
    model_dir: Path
    inputs: Path  # CASES as CASE_0000.nii.gz
    env: dict[str, str]  # for nnU-Net's commands: the tree's folders, nnUNet_extTrainer, one thread


@pytest.fixture(scope="session")
def torchvision_imports() -> None:
    """Skips before anything is trained when nnU-Net's trainer lookup cannot work in this venv."""
    error = torchvision_import_error()
    if error is not None:
        pytest.skip(
            f"torchvision does not import in this venv ({error}); nnU-Net's trainer lookup imports it. Rerun "
            "scripts/setup.sh with a torch that has a matching torchvision build (TORCH_SPEC / TORCHVISION_SPEC; "
            "README, Predict: nnU-Net's own tools on our model folders)"
        )


@pytest.fixture(scope="module")
def model(torchvision_imports: None, prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
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


def run_nnunet(command: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    executable = BIN / command
    assert executable.is_file(), f"{executable} is missing: nnunetv2 installs it (rerun scripts/setup.sh)"
    done = subprocess.run(
        [str(executable), *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


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
