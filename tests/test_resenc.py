"""nnU-Net's residual-encoder presets: ``prepare -pl nnUNetPlannerResEncM``, then train, predict, query and report,
and nnU-Net's own ``nnUNetv2_predict -p nnUNetResEncUNetMPlans`` on the model.

A small tree of its own (4 labelled, 6 unlabelled cases of the shipped subset) is prepared with the ResEnc M planner
and the CPU-sized configuration, and a tiny model trained on it, once for the module; prepare and train run in
subprocesses, so nnU-Net's path globals in this process never point at it, and the session's prepared tree is not
touched.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from conftest import CONFIG, DATASET, LABELED, SUBSET
from model_trees import nnunet_env, nnunet_predict_as_ours, run_cli_subprocess, skip_without_torchvision
from nnfiltermatch.cli import build_parser, main
from nnfiltermatch.data.layout import MANIFEST_NAME
from nnfiltermatch.data.planners import PLANNERS, planner_plans_name, resolve_planner
from nnfiltermatch.errors import PreparationError
from nnfiltermatch.runs import collect_filter_rounds

PLANS = "nnUNetResEncUNetMPlans"
PLANNER = "nnUNetPlannerResEncM"
N_UNLABELED = 6
TRAIN = [
    "train", "-d", "901", "-c", CONFIG, "-f", "all", "--mode", "filtermatch", "-p", PLANS, "--device", "cpu",
    "--epochs", "2", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1", "--warmup-epochs", "1",
    "--ssl-start-dice", "0", "--filter-start", "1", "--teacher", "student", "--filter-tile-step", "1.0",
    "--no-final-validation",
]  # fmt: skip


def test_planner_and_plans_names_resolve_like_nnunet(tmp_path: Path) -> None:
    assert resolve_planner(None, None, tmp_path) == ("ExperimentPlanner", "nnUNetPlans")
    assert resolve_planner(PLANNER, None, tmp_path) == (PLANNER, PLANS)
    assert resolve_planner(None, PLANS, tmp_path) == (PLANNER, PLANS)  # the name says which planner
    assert resolve_planner("nnUNetPlannerResEncXL", None, tmp_path) == (
        "nnUNetPlannerResEncXL",
        "nnUNetResEncUNetXLPlans",
    )
    assert resolve_planner(PLANNER, "MyPlans", tmp_path) == (PLANNER, "MyPlans")  # a custom name
    assert all(planner_plans_name(name) for name in PLANNERS)  # every listed planner imports by its path
    with pytest.raises(
        PreparationError, match=f"-p nnUNetPlans is the plans name of planner ExperimentPlanner, not of -pl {PLANNER}"
    ):
        resolve_planner(PLANNER, "nnUNetPlans", tmp_path)
    with pytest.raises(PreparationError, match="not one of nnU-Net's planners"):
        resolve_planner("nnUNetPlannerResEncS", None, tmp_path)
    # a plain plan that an earlier version wrote under the ResEnc name is not silently kept or merged
    (tmp_path / f"{PLANS}.json").write_text(json.dumps({"experiment_planner_used": "ExperimentPlanner"}))
    with pytest.raises(PreparationError, match=f"{PLANS}.json was planned by ExperimentPlanner, not {PLANNER}"):
        resolve_planner(None, PLANS, tmp_path)
    (tmp_path / "MyPlans.json").write_text(json.dumps({"experiment_planner_used": PLANNER}))
    assert resolve_planner(None, "MyPlans", tmp_path) == (PLANNER, "MyPlans")  # the file says which planner
    args = build_parser().parse_args(["prepare", "-d", "4", "-pl", PLANNER])
    assert (args.planner, args.plans) == (PLANNER, None)
    assert build_parser().parse_args(["train", "-d", "4", "-c", "2d", "-f", "0", "-p", PLANS]).plans == PLANS


def _small_raw_tree(root: Path) -> list[str]:
    """The subset's raw data with 4 labelled and N_UNLABELED unlabelled cases; returns the unlabelled IDs."""
    raw = root / "raw" / DATASET
    shutil.copytree(SUBSET, raw)
    cases = sorted(p.name.removesuffix("_0000.nii.gz") for p in (raw / "imagesTr").glob("*_0000.nii.gz"))
    unlabeled = [c for c in cases if c not in LABELED][:N_UNLABELED]
    for case in set(cases) - set(LABELED) - set(unlabeled):
        (raw / "imagesTr" / f"{case}_0000.nii.gz").unlink()
        (raw / "labelsTr" / f"{case}.nii.gz").unlink()
    data = json.loads((raw / "dataset.json").read_text())
    data["numTraining"] = len(LABELED) + len(unlabeled)
    (raw / "dataset.json").write_text(json.dumps(data, indent=2))
    for key in ("preprocessed", "results"):
        (root / key).mkdir()
    (root / "labeled.txt").write_text("\n".join(LABELED) + "\n")
    return unlabeled


@dataclass
class ResEncModel:
    root: Path
    env: dict[str, str]
    unlabeled: list[str]
    model_dir: Path


@pytest.fixture(scope="module")
def resenc(tmp_path_factory: pytest.TempPathFactory) -> ResEncModel:
    """``prepare -pl nnUNetPlannerResEncM`` on a small tree of its own, then a tiny filtermatch model on its plans."""
    root = tmp_path_factory.mktemp("resenc") / "nnunet"
    unlabeled = _small_raw_tree(root)
    env = {**nnunet_env(root), "nnUNet_n_proc_DA": "0"}
    run_cli_subprocess(
        ["prepare", "-d", "901", "-pl", PLANNER, "-c", CONFIG, "--labeled-list", str(root / "labeled.txt"), "-np", "1"],
        env,
    )
    run_cli_subprocess(TRAIN, env)
    return ResEncModel(root, env, unlabeled, root / "results" / DATASET / f"nnFilterMatchTrainer__{PLANS}__{CONFIG}")


def _tree_listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_resenc_m_prepare_train_predict_query_report(
    resenc: ResEncModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root, unlabeled, model_dir = resenc.root, resenc.unlabeled, resenc.model_dir
    for key, value in resenc.env.items():
        monkeypatch.setenv(key, value)
    pre = root / "preprocessed" / DATASET
    manifest = json.loads((pre / MANIFEST_NAME).read_text())
    assert (manifest["plans_name"], manifest["planner"]) == (PLANS, PLANNER)
    assert not (pre / "nnUNetPlans.json").exists()
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    assert plans["plans_name"] == PLANS and plans["experiment_planner_used"] == PLANNER
    full, cpu = plans["configurations"]["3d_fullres"], plans["configurations"][CONFIG]
    assert cpu["inherits_from"] == "3d_fullres"
    for arch in (full["architecture"], cpu["architecture"]):
        assert arch["network_class_name"].endswith(".ResidualEncoderUNet")
    kwargs = cpu["architecture"]["arch_kwargs"]
    n = kwargs["n_stages"]
    assert n == full["architecture"]["arch_kwargs"]["n_stages"] - 1 and kwargs["features_per_stage"][-1] <= 64
    assert len(kwargs["n_blocks_per_stage"]) == len(kwargs["strides"]) == n
    assert len(kwargs["n_conv_per_stage_decoder"]) == n - 1
    # nnU-Net's ResEnc planners keep nnUNetPlans' preprocessing and its data identifier, so both share the folders
    assert full["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert sorted(p.name for p in (pre / "unlabeled").iterdir()) == ["nnUNetPlans_3d_fullres"]

    # -p and -pl that do not belong together, and train -p of plans that are not prepared: refused, nothing written
    before = _tree_listing(root / "results")
    assert main(["prepare", "-d", "901", "-pl", PLANNER, "-p", "nnUNetPlans", "-c", CONFIG]) == 2
    assert "-p nnUNetPlans is the plans name of planner ExperimentPlanner" in capsys.readouterr().err
    assert main(["prepare", "-d", "901", "-pl", "ExperimentPlanner", "-p", PLANS, "-c", CONFIG]) == 2
    assert f"-p {PLANS} is the plans name of planner {PLANNER}" in capsys.readouterr().err
    assert main(["train", "-d", "901", "-c", CONFIG, "-f", "all", "-p", "nnUNetPlans", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"prepared with the plans {PLANS}, not nnUNetPlans" in err and "prepare -d" in err
    assert _tree_listing(root / "results") == before and json.loads((pre / MANIFEST_NAME).read_text()) == manifest

    checkpoint = torch.load(model_dir / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["init_args"]["plans"]["plans_name"] == PLANS
    assert json.loads((model_dir / "plans.json").read_text())["experiment_planner_used"] == PLANNER
    assert [r.epoch for r in collect_filter_rounds(model_dir / "fold_all", checkpoint)] == [1]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images, out = tmp_path / "images", tmp_path / "pred"
        _copy_images(root, unlabeled[:2], images)
        # no -p: the plans the dataset was prepared with
        predict = ["predict", "-i", str(images), "-o", str(out), "-d", "901", "-c", CONFIG, "--device", "cpu"]
        assert main([*predict, "--no-mirroring", "--step-size", "1"]) == 0, capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir() if p.name.endswith(".nii.gz")) == [
            f"{c}.nii.gz" for c in unlabeled[:2]
        ]
        query = ["query", "-d", "901", "-c", CONFIG, "-p", PLANS, "-n", "2", "--png-top", "0", "--device", "cpu"]
        assert main(query) == 0, capsys.readouterr().err
        assert f"Ranked {N_UNLABELED} unlabelled case(s)" in capsys.readouterr().out
        assert main(["report", "-d", "901", "-c", CONFIG, "-p", PLANS]) == 0, capsys.readouterr().err
        assert (model_dir / "fold_all" / "report.html").is_file()
    finally:
        torch.set_num_threads(threads)


def _copy_images(root: Path, cases: list[str], folder: Path) -> None:
    folder.mkdir()
    for case in cases:
        shutil.copy(root / "raw" / DATASET / "imagesTr" / f"{case}_0000.nii.gz", folder)


def test_nnunet_predict_on_our_resenc_model(resenc: ResEncModel, tmp_path: Path) -> None:
    """nnUNetv2_predict with -p nnUNetResEncUNetMPlans and our trainer segments as ``nnfiltermatch predict`` does."""
    skip_without_torchvision()
    images = tmp_path / "images"
    _copy_images(resenc.root, resenc.unlabeled[:2], images)
    done, out = nnunet_predict_as_ours(resenc.model_dir, images, tmp_path, resenc.env)
    assert "Using trainer 'nnFilterMatchTrainer'" in done.stdout, done.stdout[-3000:]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{c}.nii.gz" for c in resenc.unlabeled[:2]]
