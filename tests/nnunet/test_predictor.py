"""Prediction with a trained model: nnU-Net's predictor built from our trainer, safe checkpoint loading, errors.

One tiny filtermatch model (2 epochs, no filter round) is trained once in a subprocess, so nnU-Net's import-time
path globals never leak between test modules; every test then predicts a few imagesTs cases in-process.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import overwrite_tensor_bytes
from model_trees import image_array, run_nnunet
from nnfiltermatch.cli import main
from nnfiltermatch.commands import predict
from nnfiltermatch.commands.predict import CaseProgress, predict_folder
from nnfiltermatch.data.predict_cases import PARTIAL_NAME, PARTIAL_PREFIX
from nnfiltermatch.nnunet import predictor as predictor_module
from nnfiltermatch.nnunet.predictor import atomic_plans_manager
from nnfiltermatch.nnunet.trained_model import load_predictor
from nnfiltermatch.runs import DIGEST_KEY, STATE_KEY, CheckpointError, load_checkpoint_safely, resolve_model_dir

REPO = Path(__file__).resolve().parents[2]
SUBSET = REPO / "data" / "Dataset901_HippocampusSubset"
DATASET = "Dataset901_HippocampusSubset"
CONFIG = "3d_fullres_cpu"
LABELED = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]
CASES = ["hippocampus_065", "hippocampus_067"]
FAST = ["--device", "cpu", "--step-size", "1.0"]  # one tile per axis pair: 8 windows per case


@dataclass
class Model:
    root: Path
    model_dir: Path
    inputs: Path  # CASES as CASE_0000.nii.gz


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    root = tmp_path_factory.mktemp("predict")
    env = {
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_compile": "0",
        "nnUNet_n_proc_DA": "0",
        # The suite shares 2 cores with training subprocesses and nnU-Net's workers: 2 OpenMP threads against a busy
        # core made mirrored inference 10x slower than 1 thread; one thread is predictable.
        "OMP_NUM_THREADS": "1",
    }
    shutil.copytree(SUBSET, root / "raw" / DATASET)
    (root / "labeled.txt").write_text("\n".join(LABELED) + "\n")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        torch.set_num_threads(1)
        try:
            cli = [sys.executable, "-m", "nnfiltermatch.cli"]
            for args in (
                ["prepare", "-d", "901", "-c", CONFIG, "--labeled-list", str(root / "labeled.txt"), "-np", "1"],
                ["train", "-d", "901", "-c", CONFIG, "-f", "all", "--mode", "filtermatch", "--epochs", "2"]
                + ["--iters-per-epoch", "2", "--val-iters-per-epoch", "1", "--warmup-epochs", "1"]
                + ["--filter-start", "2", "--device", "cpu", "--no-final-validation"],  # no filter round: fast
            ):
                done = subprocess.run(cli + args, env=dict(os.environ), capture_output=True, text=True, timeout=600)
                assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            inputs = root / "inputs"
            inputs.mkdir()
            for case in CASES:
                shutil.copy(SUBSET / "imagesTs" / f"{case}_0000.nii.gz", inputs)
            yield Model(root, root / "results" / DATASET / f"nnFilterMatchTrainer__nnUNetPlans__{CONFIG}", inputs)
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unmirrored(model: Model) -> Path:
    """Predictions without mirroring, with probabilities: the reference the variant models are compared with."""
    out = model.root / "unmirrored"
    written = predict_folder(
        model.inputs, out, model.model_dir, device="cpu", mirroring=False, step_size=1.0, save_probabilities=True
    )
    assert written == [out / f"{case}.nii.gz" for case in CASES]
    return out


def _final(model: Model) -> dict:
    return load_checkpoint_safely(model.model_dir / "fold_all" / "checkpoint_final.pth")


def _copy_model(model: Model, target: Path, checkpoints: dict[str, dict]) -> Path:
    """A model folder with plans/dataset json from the trained one and the given {fold_X/name: checkpoint}."""
    target.mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(model.model_dir / name, target)
    for rel, ckpt in checkpoints.items():
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, target / rel)
    return target


def _forced(ckpt: dict, label: int) -> dict:
    """The checkpoint with the output bias pushing every voxel to ``label``: its predictions are unmistakable."""
    forced = {**ckpt, "network_weights": dict(ckpt["network_weights"])}
    key = max(
        (k for k in forced["network_weights"] if k.startswith("decoder.seg_layers.") and k.endswith(".bias")),
        key=lambda k: int(k.split(".")[2]),
    )
    bias = torch.full_like(forced["network_weights"][key], -50.0)  # small enough for nnU-Net's fp16 accumulator
    bias[label] = 50.0
    forced["network_weights"][key] = bias
    # edited on purpose: drop the stored checksum (as the refusal of an altered checkpoint tells a user to)
    state = {k: v for k, v in ckpt["init_args"][STATE_KEY].items() if k != DIGEST_KEY}
    forced["init_args"] = {**ckpt["init_args"], STATE_KEY: state}
    return forced


def _run_cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    code = main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.err


def _run_cli_out_err(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----- predictions --------------------------------------------------------------------------------------------
def test_cli_writes_nnunet_names_with_input_geometry(model: Model, capsys: pytest.CaptureFixture[str]) -> None:
    out = model.root / "cli_out"
    code, err = _run_cli(capsys, "-i", model.inputs, "-o", out, "-m", model.model_dir, *FAST)  # mirroring on
    assert code == 0, err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{case}.nii.gz" for case in CASES]
    labels = set(json.loads((model.model_dir / "dataset.json").read_text())["labels"].values())
    for case in CASES:
        image = sitk.ReadImage(str(model.inputs / f"{case}_0000.nii.gz"))
        seg = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert seg.GetSize() == image.GetSize()
        assert np.allclose(seg.GetSpacing(), image.GetSpacing())
        assert np.allclose(seg.GetOrigin(), image.GetOrigin())
        assert np.allclose(seg.GetDirection(), image.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) <= labels


def test_probabilities_are_softmax_of_the_segmentation(model: Model, unmirrored: Path) -> None:
    for case in CASES:
        probabilities = np.load(unmirrored / f"{case}.npz")["probabilities"]
        seg = image_array(unmirrored / f"{case}.nii.gz")
        assert probabilities.shape == (3, *seg.shape)
        assert np.allclose(probabilities.sum(axis=0), 1.0, atol=1e-3)
        assert (probabilities >= 0).all()
        assert np.array_equal(probabilities.argmax(axis=0), seg)
        assert (unmirrored / f"{case}.pkl").is_file()


def test_nnunet_ensemble_reads_our_probabilities(unmirrored: Path, tmp_path: Path) -> None:
    """nnU-Net's own ``nnUNetv2_ensemble`` on ``predict --save-probabilities`` folders (the model with itself)."""
    out = tmp_path / "ensemble"
    run_nnunet("nnUNetv2_ensemble", ["-i", str(unmirrored), str(unmirrored), "-o", str(out), "-np", "1"], {})
    for case in CASES:
        np.testing.assert_array_equal(image_array(out / f"{case}.nii.gz"), image_array(unmirrored / f"{case}.nii.gz"))


def test_mirroring_switch_and_axes_from_checkpoint(model: Model) -> None:
    calls = []
    for mirroring, expected in ((True, 8), (False, 1)):
        predictor = load_predictor(model.model_dir, ["all"], device="cpu", mirroring=mirroring)
        assert predictor.allowed_mirroring_axes == (0, 1, 2)  # from the checkpoint
        handle = predictor.network.register_forward_hook(lambda *_: calls.append(1))
        patch = predictor.configuration_manager.patch_size
        logits = predictor.predict_sliding_window_return_logits(torch.randn(1, *patch))
        handle.remove()
        assert logits.shape == (3, *patch) and len(calls) == expected  # 7 flipped passes with mirroring
        calls.clear()


def test_checkpoint_best_or_final(model: Model, unmirrored: Path, capsys: pytest.CaptureFixture[str]) -> None:
    final = _final(model)
    folder = _copy_model(
        model,
        model.root / "best_final" / "nnFilterMatchTrainer__nnUNetPlans__x",
        {"fold_all/checkpoint_final.pth": final, "fold_all/checkpoint_best.pth": _forced(final, 2)},
    )
    out = model.root / "best_out"
    code, err = _run_cli(
        capsys, "-i", model.inputs, "-o", out, "-m", folder, "--checkpoint", "best", "--no-mirroring", *FAST
    )
    assert code == 0, err
    assert (image_array(out / f"{CASES[0]}.nii.gz") == 2).all()
    assert not (image_array(unmirrored / f"{CASES[0]}.nii.gz") == 2).all()  # the final weights: not the forced ones
    loaded = load_predictor(folder, None, checkpoint="final", device="cpu").list_of_parameters[0]
    assert all(torch.equal(loaded[k], v) for k, v in final["network_weights"].items())


def test_plain_nnunet_model_folder(model: Model, unmirrored: Path) -> None:
    """nnU-Net's own trainer name and a checkpoint without our state predict exactly like our model."""
    plain = _final(model)
    plain["trainer_name"] = "nnUNetTrainer"
    plain["init_args"] = {k: v for k, v in plain["init_args"].items() if k != "nnfiltermatch_state"}
    for key in ("sup_losses", "unsup_losses", "confident_fraction", "unsup_weight", "pool_size"):
        plain["logging"].pop(key)
    folder = _copy_model(
        model,
        model.root / "plain" / DATASET / f"nnUNetTrainer__nnUNetPlans__{CONFIG}",
        {"fold_0/checkpoint_final.pth": plain},
    )
    single = model.root / "plain_in"
    single.mkdir()
    shutil.copy(model.inputs / f"{CASES[0]}_0000.nii.gz", single)
    written = predict_folder(single, model.root / "plain_out", folder, device="cpu", mirroring=False, step_size=1.0)
    assert [p.name for p in written] == [f"{CASES[0]}.nii.gz"]
    assert np.array_equal(image_array(written[0]), image_array(unmirrored / f"{CASES[0]}.nii.gz"))


def test_folds_found_and_ensembled(model: Model) -> None:
    final = _final(model)
    folder = _copy_model(
        model,
        model.root / "folds" / "m",
        {
            "fold_0/checkpoint_final.pth": final,
            "fold_1/checkpoint_final.pth": _forced(final, 1),
            "fold_all/checkpoint_final.pth": final,
        },
    )
    ensemble = load_predictor(folder, None, device="cpu", mirroring=False)
    assert len(ensemble.list_of_parameters) == 2  # numbered folds found; fold_all only when there are none
    assert len(load_predictor(folder, ["all"], device="cpu").list_of_parameters) == 1
    data = torch.randn(1, *ensemble.configuration_manager.patch_size)
    single = [
        load_predictor(folder, [f], device="cpu", mirroring=False).predict_logits_from_preprocessed_data(data)
        for f in (0, 1)
    ]
    mixed = ensemble.predict_logits_from_preprocessed_data(data)
    assert torch.allclose(mixed.float(), (single[0].float() + single[1].float()) / 2, atol=0.1, rtol=1e-2)
    assert not torch.allclose(mixed.float(), single[0].float(), atol=0.5)


# ----- checkpoints are data, not code ---------------------------------------------------------------------------
def _touch(path: str) -> None:
    Path(path).write_text("code ran")


class Payload:
    """Pickles as a call of ``_touch``: what a malicious checkpoint would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (str(self.marker),))


def test_checkpoint_with_code_is_refused(model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "marker.txt"
    evil = _final(model)
    evil["init_args"]["payload"] = Payload(marker)
    folder = _copy_model(model, tmp_path / "evil", {"fold_all/checkpoint_final.pth": evil})
    path = folder / "fold_all" / "checkpoint_final.pth"
    torch.load(path, map_location="cpu", weights_only=False)  # the payload is live: a full unpickle runs it
    assert marker.is_file()
    marker.unlink()
    code, err = _run_cli(capsys, "-i", model.inputs, "-o", tmp_path / "out", "-m", folder, *FAST)
    assert code == 2 and str(path) in err and "_touch" in err and "refused" in err
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_numpy_scalars_and_arrays_load_weights_only(model: Model, tmp_path: Path) -> None:
    ckpt = _final(model)
    assert isinstance(ckpt["_best_ema"], np.floating)  # what nnU-Net's logging really stores
    ckpt["logging"]["extra"] = [np.arange(3), np.float64(1.5), np.int64(2), np.bool_(True), np.zeros((2, 2), "f4")]
    torch.save(ckpt, tmp_path / "c.pth")
    loaded = load_checkpoint_safely(tmp_path / "c.pth")["logging"]["extra"]
    assert np.array_equal(loaded[0], np.arange(3)) and loaded[1] == 1.5 and loaded[2] == 2 and loaded[3]
    assert loaded[4].dtype == np.float32 and loaded[4].shape == (2, 2)


# ----- errors name the path and come before any long work ---------------------------------------------------------
@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(predict, "load_predictor", refuse)


def test_unknown_model_folder(model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run_cli(capsys, "-i", model.inputs, "-o", tmp_path / "o", "-m", tmp_path / "nope", *FAST)
    assert code == 2 and str(tmp_path / "nope") in err and "plans.json" in err
    code, err = _run_cli(capsys, "-i", model.inputs, "-o", tmp_path / "o", "-m", model.model_dir / "fold_all", *FAST)
    assert code == 2 and f"give its parent {model.model_dir}" in err


def test_missing_checkpoint_names_fold_and_lists_files(
    model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _run_cli(capsys, "-i", model.inputs, "-o", tmp_path / "o", "-m", model.model_dir, "-f", "3", *FAST)
    assert code == 2 and "fold 3" in err and str(model.model_dir / "fold_3" / "checkpoint_final.pth") in err
    assert "fold_all/: checkpoint_best.pth, checkpoint_final.pth" in err
    folder = _copy_model(model, tmp_path / "m", {"fold_all/checkpoint_final.pth": {"network_weights": {}}})
    code, err = _run_cli(capsys, "-i", model.inputs, "-o", tmp_path / "o", "-m", folder, "--checkpoint", "best")
    assert code == 2 and "checkpoint_best.pth" in err and "fold_all/: checkpoint_final.pth" in err


@pytest.mark.usefixtures("no_model_loading")
def test_input_errors(model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(inputs: Path, out: Path | None = None) -> str:
        code, err = _run_cli(capsys, "-i", inputs, "-o", out or tmp_path / "out", "-m", model.model_dir, *FAST)
        assert code == 2
        return err

    empty = tmp_path / "empty"
    empty.mkdir()
    err = run(empty)
    assert str(empty) in err and "no *.nii.gz images" in err
    (empty / "notes.txt").write_text("x")
    assert "notes.txt" in run(empty)

    badly_named = tmp_path / "badly_named"
    badly_named.mkdir()
    shutil.copy(model.inputs / f"{CASES[0]}_0000.nii.gz", badly_named / "scan.nii.gz")
    err = run(badly_named)
    assert str(badly_named) in err and "scan.nii.gz" in err and "CASE_XXXX" in err

    two_channels = tmp_path / "two_channels"
    shutil.copytree(model.inputs, two_channels)
    shutil.copy(two_channels / f"{CASES[0]}_0000.nii.gz", two_channels / f"{CASES[0]}_0001.nii.gz")
    err = run(two_channels)
    assert str(two_channels) in err and "1 channel" in err and f"{CASES[0]}: 0000, 0001" in err
    assert "'MRI'" in err

    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    err = run(model.inputs, not_a_folder)
    assert str(not_a_folder) in err and "is a file" in err
    assert "is the input folder" in run(model.inputs, model.inputs)
    assert not list(model.inputs.glob(f"{CASES[0]}.nii.gz"))


@pytest.mark.usefixtures("no_model_loading")
def test_broken_images_are_refused_before_the_model_loads(
    model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Truncated .nii.gz and NaN/inf voxels would be read as zeros and segmented silently; garbage crashed a worker."""
    inputs = tmp_path / "in"
    shutil.copytree(model.inputs, inputs)
    source = inputs / f"{CASES[0]}_0000.nii.gz"
    good = source.read_bytes()
    shutil.copy(source, inputs / "truncated_0000.nii.gz")
    (inputs / "truncated_0000.nii.gz").write_bytes(good[: len(good) // 2])
    (inputs / "garbage_0000.nii.gz").write_bytes(b"not an image" * 20)
    original = sitk.ReadImage(str(source))
    arr = sitk.GetArrayFromImage(original).astype(np.float32)
    arr[0, 0, :2] = np.nan
    arr[1, 1, 1] = -np.inf
    broken = sitk.GetImageFromArray(arr)
    broken.CopyInformation(original)
    sitk.WriteImage(broken, str(inputs / "nonfinite_0000.nii.gz"))
    sitk.WriteImage(sitk.JoinSeries([original, original]), str(inputs / "fourd_0000.nii.gz"))
    code, err = _run_cli(capsys, "-i", inputs, "-o", tmp_path / "out", "-m", model.model_dir, *FAST)
    assert code == 2 and f"-i {inputs}: 4 image(s) cannot be used; nothing was predicted" in err
    assert "truncated_0000.nii.gz is truncated" in err and "garbage_0000.nii.gz cannot be read" in err
    assert "nonfinite_0000.nii.gz contains 2 NaN and 1 infinite voxel(s)" in err and "fourd_0000.nii.gz is 4D" in err
    assert CASES[0] not in err and not (tmp_path / "out").exists()


def test_unreadable_checkpoint_and_bad_step_size(
    model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _copy_model(model, tmp_path / "m", {})
    (folder / "fold_all").mkdir()
    good = (model.model_dir / "fold_all" / "checkpoint_final.pth").read_bytes()
    (folder / "fold_all" / "checkpoint_final.pth").write_bytes(good[:1000])  # a copy that broke off
    code, err = _run_cli(capsys, "-i", model.inputs, "-o", tmp_path / "out", "-m", folder, *FAST)
    assert code == 2 and str(folder / "fold_all" / "checkpoint_final.pth") in err
    assert "not a readable torch checkpoint" in err and "retrain or copy it again" in err
    code, err = _run_cli(capsys, "-i", model.inputs, "-o", tmp_path / "out", "-m", model.model_dir, "--step-size", "2")
    assert code == 2 and "--step-size 2.0: must be in (0, 1]" in err
    assert not (tmp_path / "out").exists()


def test_worker_counts_npp_nps_like_nnunet(
    model: Model, unmirrored: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """-npp / -nps set nnU-Net's worker processes: 2 of each segment as 1 does; 0 is refused before any work."""
    out = tmp_path / "two_workers"
    code, err = _run_cli(capsys, "-i", model.inputs, "-o", out, "-m", model.model_dir, *FAST, "--no-mirroring",
                         "-npp", "2", "-nps", "2")  # fmt: skip
    assert code == 0, err
    for case in CASES:
        np.testing.assert_array_equal(image_array(out / f"{case}.nii.gz"), image_array(unmirrored / f"{case}.nii.gz"))
    code, err = _run_cli(capsys, "-i", model.inputs, "-o", tmp_path / "none", "-m", model.model_dir, *FAST, "-nps", "0")
    assert code == 2 and "-nps 0: needs at least 1 worker process" in err
    assert not (tmp_path / "none").exists()


def test_damaged_weights_are_refused_by_predict(
    model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """4 KiB of NaN inside one tensor of checkpoint_final (size unchanged) used to predict all-zero masks, rc 0."""
    folder = _copy_model(model, tmp_path / "m", {})
    shutil.copytree(model.model_dir / "fold_all", folder / "fold_all")  # checkpoint_final and checkpoint_best
    path = folder / "fold_all" / "checkpoint_final.pth"
    weights = _final(model)["network_weights"]
    size = path.stat().st_size
    name = overwrite_tensor_bytes(path, weights, np.full(1024, np.nan, np.float32).tobytes())
    assert path.stat().st_size == size
    code, err = _run_cli(capsys, "-i", model.inputs, "-o", tmp_path / "out", "-m", folder, *FAST)
    assert code == 2 and f"fold all: {path}: unusable weights" in err
    damaged = torch.load(path, map_location="cpu", weights_only=False)["network_weights"]
    nan_names = [k for k, v in damaged.items() if not torch.isfinite(v).all()]  # the tensor and its aliases
    assert name in nan_names  # nnU-Net's state dict names one tensor several times (all_modules, decoder.encoder)
    found = f"{len(nan_names)} of {len(weights)} tensors of its network_weights hold NaN or infinite values"
    assert f"{found} ({', '.join(nan_names)})" in err
    assert "network_weights differ from the SHA-256 checksum stored when it was written" in err
    assert "Predict with --checkpoint best (fold_all/checkpoint_best.pth, written at the end of epoch" in err
    assert not (tmp_path / "out").exists()
    best = ("--checkpoint", "best", "--no-mirroring", *FAST)
    code, err = _run_cli(capsys, "-i", model.inputs, "-o", tmp_path / "out", "-m", folder, *best)
    assert code == 0, err  # the undamaged one still predicts


def test_altered_finite_weights_fail_their_checksum(model: Model, tmp_path: Path) -> None:
    """A finite change passes any NaN check; the digest stored at save catches it, in the network and the teacher."""
    for part in ("network_weights", "teacher"):
        ckpt = _final(model)
        weights = ckpt["network_weights"] if part == "network_weights" else ckpt["init_args"][STATE_KEY]["teacher"]
        key = next(k for k, v in weights.items() if v.is_floating_point())
        weights[key] = weights[key].clone()
        weights[key].view(-1)[0] += 1e-3
        torch.save(ckpt, tmp_path / "altered.pth")
        with pytest.raises(CheckpointError) as refused:
            load_checkpoint_safely(tmp_path / "altered.pth")
        message = str(refused.value)
        assert f"{part} differ from the SHA-256 checksum" in message and "every value is finite" in message
        assert f"delete init_args['{STATE_KEY}']['{DIGEST_KEY}']" in message
    del ckpt["init_args"][STATE_KEY][DIGEST_KEY]  # no digest, as in nnU-Net's own checkpoints: finite check only
    torch.save(ckpt, tmp_path / "undigested.pth")
    load_checkpoint_safely(tmp_path / "undigested.pth")
    ckpt["network_weights"][key] = torch.full_like(ckpt["network_weights"][key], float("inf"))
    torch.save(ckpt, tmp_path / "undigested.pth")
    with pytest.raises(CheckpointError, match=f"values \\({key}\\); the file stores no checksum"):
        load_checkpoint_safely(tmp_path / "undigested.pth")


def test_model_dir_from_dataset_configuration_mode(model: Model, capsys: pytest.CaptureFixture[str]) -> None:
    assert resolve_model_dir("901", CONFIG, "filtermatch") == model.model_dir
    assert resolve_model_dir(DATASET, CONFIG, "filtermatch", plans="nnUNetPlans") == model.model_dir
    assert resolve_model_dir(901, CONFIG, "ssl").name == f"nnFilterMatchTrainer_ssl__nnUNetPlans__{CONFIG}"
    args = ("-i", model.inputs, "-o", model.root / "o")
    # the same folder as -m: the error for a missing fold names it
    code, err = _run_cli(capsys, *args, "-d", "901", "-c", CONFIG, "-f", "7", "--device", "cpu")
    assert code == 2 and str(model.model_dir / "fold_7" / "checkpoint_final.pth") in err
    code, err = _run_cli(capsys, *args, "-d", "901", "-c", CONFIG, "--mode", "supervised", "--device", "cpu")
    assert code == 2 and str(model.model_dir.parent / f"nnFilterMatchTrainer_supervised__nnUNetPlans__{CONFIG}") in err
    code, err = _run_cli(capsys, *args, "-m", model.model_dir, "-d", "901")
    assert code == 2 and "either -m" in err


# ----- progress, resuming, refusing to overwrite ------------------------------------------------------------------
class _Clock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def test_progress_lines_per_case_with_eta() -> None:
    """Off a terminal: one line per case; the ETA leaves out the first case, which also starts nnU-Net's workers."""
    stream = io.StringIO()
    progress = CaseProgress(4, stream, clock=_Clock(0.0, 10.0, 12.0, 14.5, 16.0))
    for case in ("a", "b", "c", "d"):
        progress.case_done(case)
    progress.close()
    assert stream.getvalue().splitlines() == [
        "predict: 1/4 a predicted in 10.0 s; elapsed 0:10, ETA 0:30",
        "predict: 2/4 b predicted in 2.0 s; elapsed 0:12, ETA 0:04",
        "predict: 3/4 c predicted in 2.5 s; elapsed 0:14, ETA 0:02",
        "predict: 4/4 d predicted in 1.5 s; elapsed 0:16, ETA 0:00",
    ]


def test_progress_bar_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = CaseProgress(3, stream)
    for case in ("a", "b", "c"):
        progress.case_done(case)
    progress.note("done")
    progress.close()
    text = stream.getvalue()
    assert "\r" in text and "predict: 100%" in text and "3/3" in text and "c]" in text  # tqdm: elapsed<ETA
    assert "predict: done" in text and "predicted in" not in text


def test_segmentations_are_written_under_a_temporary_name(tmp_path: Path) -> None:
    """The final name holds a finished file or nothing: a write that breaks off leaves neither it nor a temporary."""
    seen = []

    class Writer:
        fail = False

        def write_seg(self, seg: np.ndarray, output_fname: str, properties: dict) -> None:
            seen.append(Path(output_fname))
            match = PARTIAL_NAME.match(Path(output_fname).name)
            assert match and not (tmp_path / match["target"]).exists()  # the final name comes only when complete
            Path(output_fname).write_bytes(b"half" if self.fail else b"whole")
            if self.fail:
                raise OSError("disk full")

    atomic = predictor_module._atomic_writer(Writer)
    atomic().write_seg(np.zeros((1, 1, 1)), str(tmp_path / "case.nii.gz"), {})
    assert (tmp_path / "case.nii.gz").read_bytes() == b"whole"
    assert seen[0].parent == tmp_path and seen[0].name.endswith("-case.nii.gz")  # the ending picks the format
    broken = atomic()
    broken.fail = True
    with pytest.raises(OSError, match="disk full"):
        broken.write_seg(np.zeros((1, 1, 1)), str(tmp_path / "other.nii.gz"), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz"]


def test_export_workers_get_the_atomic_writer() -> None:
    """nnU-Net pickles the plans manager into its spawned export workers: the writer must survive that."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    manager = pickle.loads(pickle.dumps(atomic_plans_manager({"image_reader_writer": "SimpleITKIO"})))
    assert manager.plans == {"image_reader_writer": "SimpleITKIO"}
    writer = manager.image_reader_writer_class
    assert issubclass(writer, SimpleITKIO) and issubclass(writer, predictor_module._AtomicSegWriter)


def test_progress_line_per_case(model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run_cli_out_err(capsys, "-i", model.inputs, "-o", tmp_path / "o", "-m", model.model_dir, *FAST)
    assert code == 0, err
    lines = [line for line in err.splitlines() if " predicted in " in line]
    assert [line.split()[1:3] for line in lines] == [["1/2", CASES[0]], ["2/2", CASES[1]]]
    assert all("elapsed 0:" in line and ", ETA 0:" in line for line in lines)
    assert "predict: 2 case(s) in 0:" in err and "s per case" in err
    assert "Predicting" not in out and out.startswith("Wrote 2 segmentations")  # nnU-Net's chatter held back


def test_continue_prediction_keeps_complete_outputs(
    model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    args = ("-i", model.inputs, "-o", out, "-m", model.model_dir, *FAST, "--no-mirroring")
    code, err = _run_cli(capsys, *args)
    assert code == 0, err
    first, second = (out / f"{case}.nii.gz" for case in CASES)
    reference = image_array(second)
    kept_bytes = first.read_bytes()
    os.utime(first, ns=(10**18, 10**18))
    second.unlink()
    (out / f"{PARTIAL_PREFIX}0123abcd-{second.name}").write_bytes(b"left by a killed run")

    code, err = _run_cli(capsys, *args, "--continue_prediction")
    assert code == 0, err
    assert first.stat().st_mtime_ns == 10**18 and first.read_bytes() == kept_bytes  # untouched
    assert np.array_equal(image_array(second), reference)
    assert f"1 of 2 case(s) already complete in {out}, kept; 1 to predict" in err
    assert f"predict: 1/1 {CASES[1]} predicted in" in err and CASES[0] not in err
    assert not list(out.glob(f"{PARTIAL_PREFIX}*"))

    second.write_bytes(second.read_bytes()[:200])  # what nnU-Net's in-place writer leaves when killed
    code, err = _run_cli(capsys, *args, "--continue-prediction")
    assert code == 0, err
    assert f"{CASES[1]}: {second.name} is unreadable or truncated, predicting it again" in err
    assert np.array_equal(image_array(second), reference) and first.stat().st_mtime_ns == 10**18

    code, err = _run_cli(capsys, *args, "--continue_prediction")
    assert code == 0 and "2 of 2 case(s) already complete" in err and "0 to predict" in err
    assert first.stat().st_mtime_ns == 10**18


@pytest.mark.usefixtures("no_model_loading")
def test_existing_outputs_are_refused_without_flags(
    model: Model, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / f"{CASES[0]}.nii.gz").write_bytes(b"an earlier prediction")
    args = ("-i", model.inputs, "-o", out, "-m", model.model_dir, *FAST)
    code, err = _run_cli(capsys, *args)
    assert code == 2
    assert err.startswith(f"nnfiltermatch predict: error: -o {out} already holds the outputs of 1 of the 2 case(s)")
    assert f"({CASES[0]}.nii.gz); nothing was predicted" in err
    assert "--continue_prediction" in err and "--overwrite" in err
    assert (out / f"{CASES[0]}.nii.gz").read_bytes() == b"an earlier prediction"
    assert sorted(p.name for p in out.iterdir()) == [f"{CASES[0]}.nii.gz"]
    with pytest.raises(AssertionError, match="the model was loaded"):  # both flags get past the check
        _run_cli(capsys, *args, "--overwrite")
    with pytest.raises(AssertionError, match="the model was loaded"):  # unreadable: predicted again
        _run_cli(capsys, *args, "--continue_prediction")

    for case in CASES:  # complete (readable) outputs of both cases: nothing to do, no model loaded
        shutil.copy(model.inputs / f"{case}_0000.nii.gz", out / f"{case}.nii.gz")
    code, err = _run_cli(capsys, *args, "--continue_prediction")
    assert code == 0 and "2 of 2 case(s) already complete" in err
    with pytest.raises(AssertionError, match="the model was loaded"):  # no .npz/.pkl: not complete for these
        _run_cli(capsys, *args, "--continue_prediction", "--save-probabilities")
    (out / f"{CASES[0]}.nii.gz").unlink()
    (out / f"{CASES[1]}.nii.gz").unlink()
    (out / f"{CASES[1]}.npz").write_bytes(b"x")
    code, err = _run_cli(capsys, *args, "--save-probabilities")
    assert code == 2 and f"({CASES[1]}.npz)" in err  # with probabilities, an .npz would be overwritten too
    assert (out / f"{CASES[1]}.npz").read_bytes() == b"x"
