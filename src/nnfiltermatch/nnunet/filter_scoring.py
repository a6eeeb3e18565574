"""Sliding-window inference of a trainer's network on its unlabelled cases: the filter's scores, selftrain's labels.

nnU-Net glue: ``predictor.sliding_window_predictor`` around the live network with the trainer's own plans,
configuration and mirroring axes, so the cases are predicted in the preprocessed geometry the unlabelled stream
trains on.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn
from tqdm import tqdm

from nnfiltermatch.method.pool_filter import case_score
from nnfiltermatch.nnunet.predictor import sliding_window_predictor
from nnfiltermatch.nnunet.unlabeled import UnlabeledDataset


def pool_logits(
    trainer: nnUNetTrainer, model: nn.Module, case_ids: list[str], desc: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each case's logits in the preprocessed geometry, by nnU-Net's sliding-window inference with ``model``.

    The tile step and mirroring are the trainer's filter settings (``fm.filter_tile_step``, ``fm.filter_mirroring``).
    """
    decoder = model.decoder
    previous_ds = decoder.deep_supervision
    decoder.deep_supervision = False
    predictor = sliding_window_predictor(
        model,
        trainer.plans_manager,
        trainer.configuration_manager,
        trainer.dataset_json,
        type(trainer).__name__,
        trainer.inference_allowed_mirroring_axes,
        trainer.device,
        trainer.fm.filter_tile_step,
        trainer.fm.filter_mirroring,
    )
    dataset = UnlabeledDataset(str(trainer.unlabeled_folder), list(case_ids))
    try:
        for case_id in tqdm(case_ids, desc=desc, unit="case", disable=trainer.local_rank != 0):
            data = torch.from_numpy(np.ascontiguousarray(dataset.load_data(case_id)))
            with torch.no_grad():
                yield case_id, predictor.predict_sliding_window_return_logits(data)
    finally:
        decoder.deep_supervision = previous_ds


def score_cases(trainer: nnUNetTrainer, model: nn.Module, case_ids: list[str], desc: str) -> dict[str, float]:
    """The filter score of every case (``pool_filter.case_score`` with the trainer's ``fm.score``)."""
    return {
        case_id: case_score(logits, trainer.fm.score, trainer.fm.topk_fraction)
        for case_id, logits in pool_logits(trainer, model, case_ids, desc)
    }
