"""prepare: plan from labelled cases only, preprocess both sets, idempotent, clear errors."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import blosc2
import pytest

from conftest import CONFIG, DATASET, LABELED, SUBSET, set_nnunet_env
from nnfiltermatch.cli import main
from nnfiltermatch.data.layout import LABELED_LIST_NAME, MANIFEST_NAME
from nnfiltermatch.data.manifest import current_digest, load_prepared
from nnfiltermatch.data.preparation import prepare


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


def test_labeled_fraction_is_reproducible(tmp_path: Path) -> None:

    saved = dict(os.environ)
    try:
        set_nnunet_env(tmp_path)
        import shutil

        shutil.copytree(SUBSET, tmp_path / "raw" / DATASET)
        assert main(["prepare", "-d", "901", "-c", CONFIG, "--labeled-fraction", "0.1", "--seed", "3", "-np", "1"]) == 0
        listed = (tmp_path / "preprocessed" / DATASET / LABELED_LIST_NAME).read_text()
        ids = [line for line in listed.splitlines() if line and not line.startswith("#")]
        assert len(ids) == 4
        from nnfiltermatch.data.labeled_lists import sample_labeled_ids
        from nnfiltermatch.data.preparation import training_case_ids

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


# ----- a failed prepare (bad input, full disk) changes nothing --------------------------------------------------------
def _files(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root, hidden ones included: byte-for-byte comparisons."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def prepared_copy(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the session's prepared tree, with nnU-Net's folder variables pointing at it.

    The manifest's digest includes the raw folder's path, so it is stamped anew for the copy (what prepare computes
    there): the copy then counts as prepared, exactly like the original.
    """
    root = tmp_path / "nnunet"
    for key in ("raw", "preprocessed"):
        shutil.copytree(prepared / key / DATASET, root / key / DATASET)
        monkeypatch.setenv(f"nnUNet_{key}", str(root / key))
    monkeypatch.setenv("nnUNet_results", str(root / "results"))
    shutil.copy(prepared / "labeled.txt", root / "labeled.txt")
    manifest_file = root / "preprocessed" / DATASET / MANIFEST_NAME
    manifest = json.loads(manifest_file.read_text())
    manifest["inputs_digest"], _, _ = current_digest(root / "raw" / DATASET, manifest["labeled_ids"], "nnUNetPlans")
    manifest_file.write_text(json.dumps(manifest, indent=2))
    return root


def _fill_disk_after(monkeypatch: pytest.MonkeyPatch, writes: int, error: Callable[[str], BaseException]) -> list[str]:
    """blosc2.asarray writes every preprocessed array (nnU-Net's and ours): let ``writes`` calls succeed, then start
    a file and fail with ``error(path)``, as a filling disk does."""
    import blosc2

    real = blosc2.asarray
    paths: list[str] = []

    def asarray(array, *args, **kwargs):
        if kwargs.get("urlpath") is None:
            return real(array, *args, **kwargs)
        paths.append(kwargs["urlpath"])
        if len(paths) <= writes:
            return real(array, *args, **kwargs)
        Path(kwargs["urlpath"]).write_bytes(b"b2nd" + bytes(60))  # the part that still fitted
        raise error(kwargs["urlpath"])

    monkeypatch.setattr(blosc2, "asarray", asarray)
    return paths


def _prepare(root: Path, *args: str) -> list[str]:
    return ["prepare", "-d", "901", "--labeled-list", str(root / "labeled.txt"), "-np", "1", *args]


def test_disk_full_while_preprocessing_a_new_configuration(
    prepared_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ENOSPC in the middle of the unlabelled cases of -c 2d: a clear error, and every earlier byte still there."""
    root = prepared_copy
    out = root / "preprocessed" / DATASET
    raw_before, out_before = _files(root / "raw"), _files(out)
    # 4 labelled cases x (image, segmentation) succeed, then 4 unlabelled ones; the 5th unlabelled write fails
    paths = _fill_disk_after(monkeypatch, 12, lambda p: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), p))
    assert main(_prepare(root, "-c", "2d")) == 2
    err = capsys.readouterr().err
    assert len(paths) == 13 and "unlabeled/nnUNetPlans_2d.partial" in paths[-1]
    assert f"no space left on the disk of {out} while preprocessing 2d" in err
    assert "No space left on device" in err and "Nothing was changed" in err and str(root / "raw" / DATASET) in err
    assert "Free up space" in err and "it needs about" in err and "nnUNet_preprocessed" in err
    assert _files(root / "raw") == raw_before
    assert _files(out) == out_before  # no nnUNetPlans_2d, no .partial or staging folder, nothing else touched

    # the earlier preparation is still complete and usable: prepare finds nothing to do, nnU-Net reads its cases
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    monkeypatch.undo()
    monkeypatch.setenv("nnUNet_raw", str(root / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(root / "preprocessed"))
    assert main(_prepare(root, "-c", CONFIG)) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _files(out) == out_before
    data, seg, _, _ = nnUNetDatasetBlosc2(str(out / "nnUNetPlans_3d_fullres")).load_case(LABELED[0])
    assert data.shape[1:] == seg.shape[1:]
    unlabelled = load_prepared(DATASET).unlabeled_ids[0]
    assert blosc2.open(str(out / "unlabeled" / "nnUNetPlans_3d_fullres" / f"{unlabelled}.b2nd"))[:].size > 0

    # with room again, the same command completes
    assert main(_prepare(root, "-c", "2d")) == 0
    assert len(list((out / "unlabeled" / "nnUNetPlans_2d").glob("*.b2nd"))) == 36


def test_disk_full_after_replanning_keeps_the_previous_plans(
    prepared_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A new labelled list re-plans; blosc2's bare RuntimeError on a full disk still reads as one, and the previous
    plans, fingerprint, lists, ground truth and data stay in place (the new ones were only staged)."""
    root = prepared_copy
    out = root / "preprocessed" / DATASET
    (root / "fewer.txt").write_text("\n".join(LABELED[:3]) + "\n")
    raw_before, out_before = _files(root / "raw"), _files(out)
    _fill_disk_after(monkeypatch, 2, lambda p: RuntimeError("Error while creating the NDArray"))  # blosc2's words
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=3 * 2**20))
    args = ["prepare", "-d", "901", "-c", CONFIG, "--labeled-list", str(root / "fewer.txt"), "-np", "1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"no space left on the disk of {out} while preprocessing {CONFIG}" in err
    assert "RuntimeError: Error while creating the NDArray; only 3.0 MiB free" in err and "Nothing was changed" in err
    assert _files(root / "raw") == raw_before
    assert _files(out) == out_before
    assert json.loads((out / MANIFEST_NAME).read_text())["labeled_ids"] == LABELED


def test_bad_input_leaves_an_earlier_preparation_alone(prepared_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Validation comes first: an unlabelled image with inf voxels stops prepare before anything is written."""
    import numpy as np
    import SimpleITK as sitk

    root = prepared_copy
    out = root / "preprocessed" / DATASET
    out_before = _files(out)
    unlabelled = load_prepared(DATASET).unlabeled_ids[0]
    image = root / "raw" / DATASET / "imagesTr" / f"{unlabelled}_0000.nii.gz"
    original = sitk.ReadImage(str(image))
    arr = sitk.GetArrayFromImage(original).astype(np.float32)
    arr[0, 0, 0] = np.inf
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(original)
    sitk.WriteImage(bad, str(image))
    assert main(_prepare(root, "-c", "2d")) == 2
    err = capsys.readouterr().err
    assert f"imagesTr/{unlabelled}_0000.nii.gz contains 0 NaN and 1 infinite voxel(s)" in err
    assert _files(out) == out_before


def test_unknown_configuration_changes_nothing(prepared_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = prepared_copy / "preprocessed" / DATASET
    out_before = _files(out)
    assert main(_prepare(prepared_copy, "-c", "3d_lowres")) == 2
    assert "-c 3d_lowres: not in the plans (2d, 3d_fullres, 3d_fullres_cpu, 2d_cpu)" in capsys.readouterr().err
    assert _files(out) == out_before


def test_new_timestamps_alone_are_not_a_change(prepared_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A copied or re-extracted dataset (every mtime new, same bytes) must not re-plan; a changed voxel must."""
    import numpy as np
    import SimpleITK as sitk

    root = prepared_copy
    raw, out = root / "raw" / DATASET, root / "preprocessed" / DATASET
    for path in raw.rglob("*"):
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    plans_mtime = (out / "nnUNetPlans.json").stat().st_mtime_ns
    assert main(_prepare(root, "-c", CONFIG)) == 0
    printed = capsys.readouterr().out
    assert "nothing to do" in printed and "re-planning" not in printed
    assert (out / "nnUNetPlans.json").stat().st_mtime_ns == plans_mtime
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert {r["mtime_ns"] for r in manifest["file_records"].values()} == {1_000_000_000}  # learnt, not re-hashed

    label = raw / "labelsTr" / f"{LABELED[0]}.nii.gz"
    original = sitk.ReadImage(str(label))
    arr = sitk.GetArrayFromImage(original)
    arr[0, 0, 0] = np.uint8(arr[0, 0, 0] == 0)  # one voxel flipped between background and class 1
    changed = sitk.GetImageFromArray(arr)
    changed.CopyInformation(original)
    sitk.WriteImage(changed, str(label))
    digest, _, _ = current_digest(raw, manifest["labeled_ids"], "nnUNetPlans", manifest["file_records"])
    assert digest != manifest["inputs_digest"]
