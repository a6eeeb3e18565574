"""prepare: plan from labelled cases only, preprocess both sets, idempotent, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import CONFIG, DATASET, LABELED, set_nnunet_env
from nnfiltermatch.cli import main
from nnfiltermatch.preparation import (
    LABELED_LIST_NAME,
    MANIFEST_NAME,
    PreparationError,
    add_cpu_configuration,
    dataset_name_from_id,
    prepare,
)


def test_plans_and_data_come_from_labelled_cases_only(prepared: Path) -> None:
    pre = prepared / "preprocessed" / DATASET
    fingerprint = json.loads((pre / "dataset_fingerprint.json").read_text())
    assert len(fingerprint["shapes_after_crop"]) == len(LABELED)
    labelled = sorted(
        p.name[: -len(".b2nd")]
        for p in (pre / "nnUNetPlans_3d_fullres").glob("*.b2nd")
        if not p.name.endswith("_seg.b2nd")
    )
    assert labelled == LABELED
    unlabelled = sorted(p.name[: -len(".b2nd")] for p in (pre / "unlabeled" / "nnUNetPlans_3d_fullres").glob("*.b2nd"))
    assert len(unlabelled) == 36 and not set(unlabelled) & set(LABELED)
    assert not list((pre / "unlabeled" / "nnUNetPlans_3d_fullres").glob("*_seg*")), "no fake labels"
    assert sorted(p.name for p in (pre / "gt_segmentations").iterdir()) == [f"{c}.nii.gz" for c in LABELED]
    manifest = json.loads((pre / MANIFEST_NAME).read_text())
    assert manifest["labeled_ids"] == LABELED and len(manifest["unlabeled_ids"]) == 36
    assert (pre / LABELED_LIST_NAME).read_text().split("\n")[-2] == LABELED[-1]
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    cpu = plans["configurations"][CONFIG]
    assert cpu["inherits_from"] == "3d_fullres" and cpu["batch_size"] == 2


def test_second_prepare_does_no_work(prepared: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = prepared / "preprocessed" / DATASET / "nnUNetPlans_3d_fullres"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    plans_mtime = (prepared / "preprocessed" / DATASET / "nnUNetPlans.json").stat().st_mtime_ns
    prepare(DATASET, [CONFIG, "3d_fullres"], labeled_list=prepared / "labeled.txt", num_processes=1)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert (prepared / "preprocessed" / DATASET / "nnUNetPlans.json").stat().st_mtime_ns == plans_mtime
    assert "nothing to do" in capsys.readouterr().out


def test_dataset_id_resolution(prepared: Path) -> None:
    assert dataset_name_from_id(901) == DATASET
    assert dataset_name_from_id("901") == DATASET
    with pytest.raises(PreparationError, match="Dataset999_"):
        dataset_name_from_id(999)


def test_cpu_configuration_keeps_patch_divisible() -> None:
    plans = {
        "configurations": {
            "2d": {
                "patch_size": [56, 40],
                "batch_size": 366,
                "architecture": {
                    "arch_kwargs": {
                        "n_stages": 4,
                        "features_per_stage": [32, 64, 128, 256],
                        "strides": [[1, 1], [2, 2], [2, 2], [2, 2]],
                        "kernel_sizes": [[3, 3]] * 4,
                        "n_conv_per_stage": [2] * 4,
                        "n_conv_per_stage_decoder": [2] * 3,
                    }
                },
            }
        }
    }
    name = add_cpu_configuration(plans, "2d")
    cpu = plans["configurations"][name]
    kwargs = cpu["architecture"]["arch_kwargs"]
    assert name == "2d_cpu" and kwargs["n_stages"] == 3 and kwargs["features_per_stage"] == [8, 16, 32]
    assert all(p % 4 == 0 for p in cpu["patch_size"]) and cpu["patch_size"] == [28, 20]
    assert len(kwargs["n_conv_per_stage_decoder"]) == 2


def test_labeled_fraction_is_reproducible(tmp_path: Path) -> None:
    from conftest import SUBSET

    saved = dict(os.environ)
    try:
        set_nnunet_env(tmp_path)
        import shutil

        shutil.copytree(SUBSET, tmp_path / "raw" / DATASET)
        assert main(["prepare", "-d", "901", "-c", CONFIG, "--labeled-fraction", "0.1", "--seed", "3", "-np", "1"]) == 0
        listed = (tmp_path / "preprocessed" / DATASET / LABELED_LIST_NAME).read_text()
        ids = [line for line in listed.splitlines() if line and not line.startswith("#")]
        assert len(ids) == 4
        from nnfiltermatch.inventory import sample_labeled_ids
        from nnfiltermatch.preparation import training_case_ids

        assert ids == sample_labeled_ids(training_case_ids(tmp_path / "raw" / DATASET), 0.1, 3)
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--labeled-list", "missing.txt"], "missing.txt"),
        (["--labeled-fraction", "1.5"], "fraction"),
    ],
)
def test_prepare_errors_name_the_problem(
    prepared: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["prepare", "-d", "901", "-c", CONFIG, *args]) == 2
    assert message in capsys.readouterr().err


def test_unknown_labelled_case_is_refused(prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("hippocampus_001\nhippocampus_999\n")
    assert main(["prepare", "-d", "901", "-c", CONFIG, "--labeled-list", str(bad)]) == 2
    assert "hippocampus_999" in capsys.readouterr().err
