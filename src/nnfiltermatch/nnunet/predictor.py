"""nnU-Net's sliding-window predictor: the one factory, and two narrow hooks on it.

``sliding_window_predictor`` is the one place a predictor is made: for a trained model folder
(``trained_model.load_predictor``) and for the live network the filter scores the pool with. All preprocessing,
Gaussian-weighted sliding windows, mirroring, fold ensembling and export stay nnU-Net's own.

The two hooks change what a prediction run looks like, not what it computes:

* nnU-Net's per-case file iterator is wrapped (``_internal_get_data_iterator_from_lists_of_filenames``, the one place
  that sees every case in turn) so the command can report progress (``case_observer``).
* nnU-Net's export writes ``CASE<ending>`` straight to its final name, so a killed run can leave a truncated file that
  its own ``--continue_prediction`` (a bare ``isfile``) takes as done. Our plans manager hands the export workers a
  reader/writer whose ``write_seg`` writes ``.nnfm-partial-*`` and renames it (``os.replace``). nnU-Net writes
  ``.npz`` and ``.pkl`` before the segmentation, so an existing segmentation means a finished case.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from nnfiltermatch.data.predict_cases import PARTIAL_PREFIX

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager


# ----- the one factory ----------------------------------------------------------------------------------------------
def sliding_window_predictor(
    network: nn.Module,
    plans_manager: PlansManager,
    configuration_manager: ConfigurationManager,
    dataset_json: dict[str, Any],
    trainer_name: str,
    mirror_axes: tuple[int, ...] | None,
    device: torch.device,
    step_size: float,
    mirroring: bool,
    parameters: list[dict[str, torch.Tensor]] | None = None,
) -> nnUNetPredictor:
    """nnU-Net's predictor around ``network``: Gaussian-weighted tiles at ``step_size``, mirroring on ``mirror_axes``
    when ``mirroring``; ``parameters`` (one state dict per fold) ensembles folds, None predicts with the network as
    it is (the live network the filter scores with)."""
    predictor = _predictor_class()(
        tile_step_size=step_size,
        use_gaussian=True,
        use_mirroring=mirroring,
        perform_everything_on_device=device.type == "cuda",
        device=device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network, plans_manager, configuration_manager, parameters, dataset_json, trainer_name, mirror_axes
    )
    return predictor


# ----- the two hooks: a case observer, segmentations written under a temporary name ---------------------------
@functools.cache
def _predictor_class() -> type[nnUNetPredictor]:
    """nnU-Net's predictor whose file iterator can be observed case by case (built lazily: importing nnU-Net reads
    its environment, which the commands set first)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class ObservedPredictor(nnUNetPredictor):
        """``case_observer`` wraps the iterator of preprocessed cases; everything else is nnU-Net's."""

        case_observer: Callable[[Iterator[dict[str, Any]]], Iterator[dict[str, Any]]] | None = None

        def _internal_get_data_iterator_from_lists_of_filenames(self, *args: Any, **kwargs: Any) -> Any:
            iterator = super()._internal_get_data_iterator_from_lists_of_filenames(*args, **kwargs)
            return iterator if self.case_observer is None else self.case_observer(iterator)

    return ObservedPredictor


class _AtomicSegWriter:
    """Mixin for an nnU-Net reader/writer: ``write_seg`` writes a hidden temporary file beside the target and renames
    it, so the target name only ever holds a complete segmentation (an interrupted run leaves the old file or none)."""

    def write_seg(self, seg: np.ndarray, output_fname: str, properties: dict[str, Any]) -> None:
        target = Path(output_fname)
        # the full name stays at the end: the writer picks the format by the ending (.nii.gz, .nrrd ...)
        temporary = target.with_name(f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}-{target.name}")
        try:
            super().write_seg(seg, str(temporary), properties)  # type: ignore[misc]
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)


@functools.cache
def _atomic_writer(base: type) -> type:
    """``base`` (nnU-Net's reader/writer class named in plans.json) with the atomic ``write_seg``; reads unchanged."""
    return type(f"Atomic{base.__name__}", (_AtomicSegWriter, base), {})


@functools.cache
def _atomic_plans_manager_class() -> type[PlansManager]:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    class AtomicPlansManager(PlansManager):
        """nnU-Net's plans manager whose reader/writer class writes segmentations atomically.

        nnU-Net's export workers get this object pickled (spawn) and ask it for the writer, so this is where the
        export can be changed without touching nnU-Net's code; ``__reduce__`` rebuilds it from the plans there.
        """

        @property
        def image_reader_writer_class(self) -> type:
            return _atomic_writer(super().image_reader_writer_class)

        def __reduce__(self) -> tuple[Any, ...]:
            return atomic_plans_manager, (self.plans,)

    return AtomicPlansManager


def atomic_plans_manager(plans: dict[str, Any]) -> PlansManager:
    """A ``PlansManager`` for ``plans`` whose exports write each segmentation under a temporary name and rename it."""
    return _atomic_plans_manager_class()(plans)
