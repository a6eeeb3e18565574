"""Shared fixtures: a real nnU-Net folder tree around the shipped Hippocampus subset, prepared once per session."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO / "data" / "Dataset901_HippocampusSubset"
DATASET = "Dataset901_HippocampusSubset"
LABELED = ["hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006"]
CONFIG = "3d_fullres_cpu"
GARBAGE = b"this is not a NIfTI file: unlabelled labels must never be opened\n"


def shared_data_dir() -> Path | None:
    """The sibling ``shared/data`` folder with the real datasets, or NNFM_SHARED_DATA; None when absent."""
    candidate = Path(os.environ.get("NNFM_SHARED_DATA", REPO.parent / "shared" / "data"))
    return candidate if candidate.is_dir() else None


@pytest.fixture(scope="module")
def hippo_files() -> list[Path]:
    """Five real hippocampus label maps (labels 1 anterior, 2 posterior); skips where the data is absent."""
    shared = shared_data_dir()
    labels = shared / "hippocampus" / "labelsTr" if shared else None
    if labels is None or not labels.is_dir():
        pytest.skip(
            "real hippocampus labels not found: expected ../shared/data/hippocampus/labelsTr next to the repo "
            "or NNFM_SHARED_DATA pointing at a shared/data folder"
        )
    files = sorted(labels.glob("hippocampus_*.nii.gz"))[:5]
    assert len(files) == 5
    return files


def set_nnunet_env(root: Path) -> dict[str, str]:
    env = {
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_compile": "false",
        "nnUNet_n_proc_DA": "0",
        "nnUNet_def_n_proc": "1",
    }
    for key in ("raw", "preprocessed", "results"):
        (root / key).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    return env


@pytest.fixture(scope="session")
def nnunet_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """nnU-Net folders with the subset as raw data, 4 labelled cases (10%) and the other 36 unlabelled.

    The label files of the 36 unlabelled cases are overwritten with garbage: any step that opened one would fail,
    which is the proof that budget simulation never reads them.
    """
    root = tmp_path_factory.mktemp("nnunet")
    saved = dict(os.environ)
    set_nnunet_env(root)
    raw = root / "raw" / DATASET
    shutil.copytree(SUBSET, raw)
    for label in (raw / "labelsTr").glob("*.nii.gz"):
        if label.name.removesuffix(".nii.gz") not in LABELED:
            label.write_bytes(GARBAGE)
    (root / "labeled.txt").write_text("\n".join(LABELED) + "\n")
    yield root
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """Writable copy of the subset (training part only; imagesTs/labelsTs are ignored by the inventory anyway), for
    the tests of the inventory, the image checks, labelled lists and dataset.json."""
    dst = tmp_path / "Dataset901_HippocampusSubset"
    shutil.copytree(SUBSET, dst, ignore=shutil.ignore_patterns("imagesTs", "labelsTs"))
    return dst


@pytest.fixture(scope="session")
def prepared(nnunet_tree: Path) -> Path:
    from nnfiltermatch.data.preparation import prepare

    prepare(DATASET, [CONFIG], labeled_list=nnunet_tree / "labeled.txt", num_processes=1)
    return nnunet_tree


def overwrite_tensor_bytes(path: Path, tensors: dict, payload: bytes) -> str:
    """Write ``payload`` over the middle of the largest of ``tensors`` inside the saved file, in place and size
    unchanged, as disk damage would; returns the tensor's name.

    torch stores tensors uncompressed, so their bytes are found verbatim; ``network_weights`` is pickled first, so
    the first occurrence is that tensor even where the teacher holds an identical copy.
    """
    name = max(tensors, key=lambda key: tensors[key].numel())
    raw = tensors[name].contiguous().numpy().tobytes()
    assert len(raw) >= 2 * len(payload), f"{name} is too small for {len(payload)} bytes"
    data = bytearray(path.read_bytes())
    start = data.find(raw)
    assert start >= 0, f"{name} not found verbatim in {path}"
    at = start + len(raw) // 8 * 4  # the middle, on a float32 boundary
    data[at : at + len(payload)] = payload
    path.write_bytes(bytes(data))
    return name
