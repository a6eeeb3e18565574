"""The unlabelled data stream: preprocessed images without labels, fed through nnU-Net's own loader and augmentation.

nnU-Net's ``nnUNetDataLoader`` crops, pads and augments a (data, seg) pair. Unlabelled cases have no segmentation, so
this dataset hands it a zero-cost all-zero view instead; with foreground oversampling off the loader never looks at
class locations. What comes out of the augmentation is the weak view.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blosc2
import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetBaseDataset
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA


class UnlabeledDataset(nnUNetBaseDataset):
    """Images of the unlabelled pool, stored as ``<case>.b2nd`` + ``<case>.pkl`` by ``prepare``."""

    def __init__(
        self, folder: str, identifiers: list[str] | None = None, folder_with_segs_from_previous_stage: str | None = None
    ):
        super().__init__(folder, identifiers, folder_with_segs_from_previous_stage)
        blosc2.set_nthreads(1)

    def load_data(self, identifier: str) -> np.ndarray:
        return blosc2.open(urlpath=str(Path(self.source_folder) / f"{identifier}.b2nd"), mode="r")[...]

    def load_properties(self, identifier: str) -> dict[str, Any]:
        with open(Path(self.source_folder) / f"{identifier}.pkl", "rb") as handle:
            return pickle.load(handle)

    def load_case(self, identifier: str):
        data = blosc2.open(
            urlpath=str(Path(self.source_folder) / f"{identifier}.b2nd"), mode="r", dparams={"nthreads": 1}
        )
        # All-zero stand-in: the loader crops it alongside the image; its augmented copy is never used.
        seg = np.zeros((1, *data.shape[1:]), dtype=np.int16)
        properties = self.load_properties(identifier)
        properties.setdefault("class_locations", None)
        return data, seg, None, properties

    @staticmethod
    def save_case(data: np.ndarray, seg: np.ndarray, properties: dict, output_filename_truncated: str) -> None:
        raise NotImplementedError("unlabelled cases are written by nnfiltermatch.data.preprocessing")

    @staticmethod
    def get_identifiers(folder: str) -> list[str]:
        return sorted(p.name[: -len(".b2nd")] for p in Path(folder).glob("*.b2nd"))


PSEUDO_LABEL_SUFFIX = ".npy"


def save_pseudo_label(folder: Path, identifier: str, seg: np.ndarray) -> None:
    """One case's pseudo-label in the preprocessed geometry, ``(1, *spatial)`` int16; temporary name, then rename."""
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"{identifier}.partial.npy"
    np.save(partial, np.ascontiguousarray(seg, dtype=np.int16))
    partial.replace(folder / f"{identifier}{PSEUDO_LABEL_SUFFIX}")


def pseudo_labelled_ids(folder: Path) -> set[str]:
    return {
        p.name[: -len(PSEUDO_LABEL_SUFFIX)] for p in folder.glob(f"*{PSEUDO_LABEL_SUFFIX}") if ".partial" not in p.name
    }


class PseudoLabelledDataset(UnlabeledDataset):
    """Unlabelled images with the fixed pseudo-labels of ``label_folder`` as their segmentation (offline
    self-training): nnU-Net's loader then crops and augments image and pseudo-label together, like a labelled case."""

    def __init__(self, folder: str, identifiers: list[str], label_folder: Path):
        super().__init__(folder, identifiers)
        self.label_folder = label_folder

    def load_case(self, identifier: str):
        data, _, _, properties = super().load_case(identifier)
        seg = np.load(self.label_folder / f"{identifier}{PSEUDO_LABEL_SUFFIX}", mmap_mode="r")
        return data, seg, None, properties


RandomState = tuple[Any, dict[str, Any], torch.Tensor]


def _capture_random_state() -> RandomState:
    return random.getstate(), np.random.get_state(legacy=False), torch.get_rng_state()


def _restore_random_state(state: RandomState) -> None:
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


class OwnRandomStream(Iterator):
    """A single-process loader that draws every batch from its own random state, not the process's.

    Why: nnU-Net's sampling and augmentation draw from the global ``random``/NumPy/torch generators, which the
    labelled loader shares. With its own state, drawing unlabelled batches leaves the labelled batches of a
    semi-supervised run exactly those of its supervised twin with the same seed, so paired runs differ by the method
    alone (common random numbers).
    """

    def __init__(self, loader: Any, seed: int):
        self.loader = loader
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Start the stream's random state afresh from ``seed`` (the trainer does so each epoch, for resumes)."""
        outside = _capture_random_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self._state = _capture_random_state()
        _restore_random_state(outside)

    def __next__(self) -> Any:
        outside = _capture_random_state()
        _restore_random_state(self._state)
        try:
            return next(self.loader)
        finally:
            self._state = _capture_random_state()
            _restore_random_state(outside)


def make_unlabeled_loader(
    folder: Path,
    identifiers: list[str],
    batch_size: int,
    initial_patch_size: Any,
    patch_size: Any,
    label_manager: Any,
    transforms: Any,
    pin_memory: bool,
    seed: int,
    pseudo_label_folder: Path | None = None,
) -> NonDetMultiThreadedAugmenter | OwnRandomStream:
    """A fresh loader over exactly ``identifiers``: rebuilt after each filter round so its workers see the new pool.

    ``seed`` seeds the single-process stream (``nnUNet_n_proc_DA=0``; ``OwnRandomStream.reseed`` restarts it);
    nnU-Net's worker processes seed themselves from the operating system, so they repeat nothing.
    With ``pseudo_label_folder`` the batches carry those fixed pseudo-labels as their targets.
    """
    if not identifiers:
        raise ValueError("the unlabelled pool is empty")
    dataset = (
        UnlabeledDataset(str(folder), sorted(identifiers))
        if pseudo_label_folder is None
        else PseudoLabelledDataset(str(folder), sorted(identifiers), pseudo_label_folder)
    )
    loader = nnUNetDataLoader(
        dataset,
        batch_size,
        initial_patch_size,
        patch_size,
        label_manager,
        oversample_foreground_percent=0.0,
        sampling_probabilities=None,
        pad_sides=None,
        transforms=transforms,
    )
    processes = get_allowed_n_proc_DA()
    if processes == 0:
        return OwnRandomStream(SingleThreadedAugmenter(loader, None), seed)
    return NonDetMultiThreadedAugmenter(
        data_loader=loader,
        transform=None,
        num_processes=processes,
        num_cached=max(6, processes // 2),
        seeds=None,
        pin_memory=pin_memory,
        wait_time=0.002,
    )


def shutdown_loader(loader: Any) -> None:
    """Stop a multi-process augmenter's workers (single-process streams have none)."""
    finish = getattr(loader, "_finish", None)
    if callable(finish):
        finish()
