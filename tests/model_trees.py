"""Tiny real models in their own nnU-Net folders, shared by the tests that need a trained model.

A copy of the session's prepared Hippocampus tree with a few unlabelled cases (plans come from the labelled cases
only, so the copy is exactly what prepare would write for it); a 2-epoch filtermatch model with one filter round
trained on it in a subprocess, so nnU-Net's import-time path globals never point at the copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import nnfiltermatch.nnunet
from conftest import CONFIG, DATASET, LABELED
from nnfiltermatch.commands.predict import predict_folder
from nnfiltermatch.data.inventory import build_inventory
from nnfiltermatch.data.layout import MANIFEST_NAME
from nnfiltermatch.data.manifest import inputs_digest

TRAINER_DIR = f"nnFilterMatchTrainer__nnUNetPlans__{CONFIG}"
N_UNLABELED = 10
TRAIN_ARGS = [
    "train", "-d", "901", "-c", CONFIG, "-f", "all", "--mode", "filtermatch", "--device", "cpu",
    "--epochs", "2", "--iters-per-epoch", "3", "--val-iters-per-epoch", "1", "--warmup-epochs", "1",
    "--ssl-start-dice", "0", "--filter-start", "1", "--teacher", "student", "--filter-tile-step", "1.0",
    "--no-final-validation",
]  # fmt: skip


# ----- a small prepared tree and a tiny model ---------------------------------------------------------------------
def nnunet_env(root: Path) -> dict[str, str]:
    return {
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_compile": "0",
        "nnUNet_n_proc_DA": "1",
        "nnUNet_def_n_proc": "1",
        "OMP_NUM_THREADS": "1",
    }


def small_prepared_tree(prepared: Path, root: Path, n_unlabeled: int, to_unlabeled_folder: int = 0) -> list[str]:
    """Copy the session's prepared tree keeping ``n_unlabeled`` unlabelled cases; returns their IDs.

    The first ``to_unlabeled_folder`` of them are moved to imagesUnlabeled/ (no label file), the layout of a real
    dataset. The manifest gets the digest prepare computes for the copy (its raw path and case list changed).
    """
    for name in ("raw", "preprocessed"):
        shutil.copytree(prepared / name, root / name)
    (root / "results").mkdir()
    shutil.copy(prepared / "labeled.txt", root / "labeled.txt")
    raw, pre = root / "raw" / DATASET, root / "preprocessed" / DATASET
    manifest = json.loads((pre / MANIFEST_NAME).read_text())
    keep = sorted(manifest["unlabeled_ids"])[:n_unlabeled]
    for case in set(manifest["unlabeled_ids"]) - set(keep):
        (raw / "imagesTr" / f"{case}_0000.nii.gz").unlink()
        (raw / "labelsTr" / f"{case}.nii.gz").unlink()
        for folder in (pre / "unlabeled").iterdir():
            for suffix in (".b2nd", ".pkl"):
                (folder / f"{case}{suffix}").unlink(missing_ok=True)
    if to_unlabeled_folder:
        (raw / "imagesUnlabeled").mkdir()
        for case in keep[:to_unlabeled_folder]:
            shutil.move(raw / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesUnlabeled" / f"{case}_0000.nii.gz")
            (raw / "labelsTr" / f"{case}.nii.gz").unlink()
    (pre / "splits_final.json").unlink(missing_ok=True)
    inventory = build_inventory(raw, LABELED, check_contents=False, progress=False)
    manifest.update(unlabeled_ids=inventory.unlabeled_ids, inputs_digest=inputs_digest(inventory, "nnUNetPlans")[0])
    (pre / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return keep


def run_cli_subprocess(args: list[str], env: dict[str, str], returncode: int = 0) -> subprocess.CompletedProcess[str]:
    """`nnfiltermatch ARGS` in a subprocess with ENV added; it must exit with RETURNCODE."""
    done = subprocess.run(
        [sys.executable, "-m", "nnfiltermatch.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == returncode, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def torchvision_import_error() -> str | None:
    """None when this venv's torchvision imports (nnU-Net's trainer lookup needs it), else the error's last line."""
    done = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True, timeout=120)
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def skip_without_torchvision() -> None:
    """Skips (before anything is trained) where nnU-Net's trainer lookup cannot work in this venv."""
    error = torchvision_import_error()
    if error is not None:
        pytest.skip(
            f"torchvision does not import in this venv ({error}); nnU-Net's trainer lookup imports it. Rerun "
            "scripts/setup.sh with a torch that has a matching torchvision build (TORCH_SPEC / TORCHVISION_SPEC; "
            "README, Predict: nnU-Net's own tools on our model folders)"
        )


def run_nnunet(command: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """One of nnU-Net's own executables from this venv (nnUNetv2_predict, ...), which must succeed."""
    executable = Path(sys.executable).parent / command
    assert executable.is_file(), f"{executable} is missing: nnunetv2 installs it (rerun scripts/setup.sh)"
    done = subprocess.run(
        [str(executable), *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


EXT_TRAINER = os.path.dirname(nnfiltermatch.nnunet.__file__)  # nnUNet_extTrainer: the README's setting


def image_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def nnunet_predict_as_ours(
    model_dir: Path, inputs: Path, root: Path, env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """``nnUNetv2_predict`` on our model folder (trainer, plans and configuration from its name; no TTA, step 1.0,
    one worker each) into ``root/nnunet_predictions``, and ``nnfiltermatch predict`` of the same model into
    ``root/our_predictions``: asserts every segmentation is the same, voxel for voxel. Returns nnU-Net's run and
    its folder."""
    trainer, plans, configuration = model_dir.name.split("__")
    theirs, ours = root / "nnunet_predictions", root / "our_predictions"
    args = ["-i", str(inputs), "-o", str(theirs), "-d", model_dir.parent.name, "-c", configuration, "-f", "all"]
    args += ["-p", plans, "-tr", trainer, "-npp", "1", "-nps", "1", "--disable_tta", "-step_size", "1.0"]
    done = run_nnunet("nnUNetv2_predict", [*args, "-device", "cpu"], {**env, "nnUNet_extTrainer": EXT_TRAINER})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predict_folder(inputs, ours, model_dir, device="cpu", mirroring=False, step_size=1.0, progress=False)
    finally:
        torch.set_num_threads(threads)
    cases = sorted(p.name for p in ours.glob("*.nii.gz"))
    assert cases and cases == sorted(p.name for p in theirs.glob("*.nii.gz"))
    for case in cases:
        np.testing.assert_array_equal(image_array(theirs / case), image_array(ours / case))
    return done, theirs


def train_tiny_model(prepared: Path, root: Path, n_unlabeled: int = N_UNLABELED) -> tuple[Path, list[str]]:
    """A small tree and a 2-epoch filtermatch model with one filter round (epoch 1); returns (model dir, cases)."""
    cases = small_prepared_tree(prepared, root, n_unlabeled)
    run_cli_subprocess(TRAIN_ARGS, nnunet_env(root))
    return root / "results" / DATASET / TRAINER_DIR, cases


@dataclass
class Model:
    root: Path
    model_dir: Path
    cases: list[str]


@contextmanager
def tiny_model_in_own_tree(prepared: Path, root: Path) -> Iterator[Model]:
    """A tiny model in its own nnU-Net folders, with the environment pointing there and one torch thread."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in nnunet_env(root).items():
            mp.setenv(key, value)
        torch.set_num_threads(1)
        try:
            model_dir, cases = train_tiny_model(prepared, root)
            yield Model(root, model_dir, cases)
        finally:
            torch.set_num_threads(threads)
