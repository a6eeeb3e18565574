"""``train --val``: nnU-Net's final validation of a trained fold, on its own."""

from __future__ import annotations

import json
import os
from pathlib import Path

from nnfiltermatch import distributed
from nnfiltermatch.commands.training import (
    build_trainer,
    configure_runtime,
    make_repeatable,
    model_folder_lock,
    seed_everything,
)
from nnfiltermatch.commands.training_checks import validation_checkpoint_file
from nnfiltermatch.config import CONFIG_FILENAME, TrainConfig
from nnfiltermatch.data.manifest import check_prepared_plans, load_prepared
from nnfiltermatch.errors import PreparationError
from nnfiltermatch.runs import TRAINER_NAMES, load_checkpoint_safely, output_folder_for, trainer_state


def validate_trained(
    dataset_name: str,
    configuration: str,
    fold: int | str,
    mode: str,
    device: str,
    *,
    save_probabilities: bool = False,
    checkpoint: str = "final",
    round_number: int | None = None,
    plans_name: str | None = None,
) -> Path:
    """``train --val``: only nnU-Net's final validation of a trained fold, as ``nnUNetv2_train --val`` runs it.

    From checkpoint_final.pth (``checkpoint`` "best": checkpoint_best.pth), with the configuration stored beside it,
    into the fold's ``validation/`` (``save_probabilities``: also each case's softmax ``.npz`` + ``.pkl``, what
    nnU-Net's ensembling and ``nnUNetv2_find_best_configuration`` read). One process; refused, naming the file, when
    the checkpoint is not there. Returns the validation folder.
    """
    prepared = load_prepared(dataset_name)
    check_prepared_plans(prepared, plans_name)
    option = "--val --val_best" if checkpoint == "best" else "--val"
    if distributed.launched_by_torchrun() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PreparationError(f"{option} runs in one process: start it without torchrun")
    torch_device = configure_runtime(device)  # before nnU-Net's configuration module reads the variables
    out = output_folder_for(dataset_name, TRAINER_NAMES[mode], prepared.plans_name, configuration, fold, round_number)
    path = validation_checkpoint_file(out, checkpoint, option)
    stored = out / CONFIG_FILENAME
    if stored.is_file():
        config = TrainConfig.from_dict(json.loads(stored.read_text()))
    else:  # an older folder: the configuration rides in the checkpoint too
        state = trainer_state(load_checkpoint_safely(path))
        if not state.get("config"):
            raise PreparationError(f"{option}: {path} was not written by nnfiltermatch (no configuration in it)")
        config = TrainConfig.from_dict(state["config"])
    with model_folder_lock([out], f"train {option}"):
        seed_everything(config.seed)
        make_repeatable(config.deterministic, torch_device)
        trainer = build_trainer(dataset_name, configuration, fold, config, torch_device, output_folder=out)
        trainer.load_checkpoint(str(path))
        trainer.perform_actual_validation(save_probabilities=save_probabilities)
    return out / "validation"
