"""A predictor for a trained model folder, built from our trainer class without nnU-Net's trainer lookup.

nnU-Net's ``initialize_from_trained_model_folder`` finds the trainer class by the name stored in the checkpoint
(ours are unknown to it, and its recursive search imports every trainer module) and unpickles checkpoints with
``weights_only=False``. Here the network is built by the trainer class itself (``build_network_architecture``, so a
trainer variant with its own architecture keeps it) and handed to ``predictor.sliding_window_predictor``.

What is trusted
---------------
* The model folder is trusted *configuration*: ``plans.json`` and ``dataset.json`` decide which network class is
  built (``network_class_name`` and the ``_kw_requires_import`` entries are imported by nnU-Net's
  ``get_network_from_plans``), how images are preprocessed and how outputs are written. Only use model folders you
  would also train from.
* Checkpoints are loaded and verified by ``runs.load_checkpoint_safely`` (no code runs; weights finite and
  equal to the digest stored at save).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nnfiltermatch.data.predict_cases import PredictionError
from nnfiltermatch.nnunet.predictor import atomic_plans_manager, sliding_window_predictor
from nnfiltermatch.nnunet.trainers import trainer_class
from nnfiltermatch.runs import (
    CHECKPOINTS,
    TRAINER_NAMES,
    CheckpointError,
    checkpoint_files,
    describe_epoch,
    load_checkpoint_safely,
    read_model_folder,
    usable_checkpoints_beside,
)

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


def _trainer_class(trainer_name: str) -> type:
    """Our trainers and nnU-Net's base trainer by name; other names fall back to nnU-Net's default architecture."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    known: dict[str, type] = {name: trainer_class(mode) for mode, name in TRAINER_NAMES.items()}
    known[nnUNetTrainer.__name__] = nnUNetTrainer
    if trainer_name not in known:
        warnings.warn(
            f"trainer {trainer_name!r} is not one of {', '.join(sorted(known))}: building nnU-Net's default "
            "architecture from plans.json (nnU-Net's trainer lookup is not used)",
            stacklevel=3,
        )
        return nnUNetTrainer
    return known[trainer_name]


def _torch_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise PredictionError(f"--device {device}: choose cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PredictionError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    return dev


def default_device() -> str:
    """The device when none is given: CUDA when torch sees one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_predictor(
    model_dir: Path,
    folds: list[str | int] | None,
    checkpoint: str = "final",
    device: str = "cpu",
    mirroring: bool = True,
    step_size: float = 0.5,
) -> nnUNetPredictor:
    """An initialised ``nnUNetPredictor`` for the given folds (ensembled when several), without nnU-Net's lookup."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    model_dir = Path(model_dir)
    plans, dataset_json = read_model_folder(model_dir)
    files = checkpoint_files(model_dir, folds, checkpoint)
    torch_device = _torch_device(device)
    if not 0.0 < step_size <= 1.0:
        raise PredictionError(f"--step-size {step_size}: must be in (0, 1] (fraction of the patch size)")

    parameters: list[dict[str, torch.Tensor]] = []
    trainer_name = configuration = None
    mirror_axes: tuple[int, ...] | None = None
    for i, (fold, path) in enumerate(files):
        try:
            ckpt = load_checkpoint_safely(path)
        except CheckpointError as exc:
            others = usable_checkpoints_beside(path, list(CHECKPOINTS.values()))
            choices = [
                f"--checkpoint {key} ({path.parent.name}/{name}, {describe_epoch(others[name])})"
                for key, name in CHECKPOINTS.items()
                if name in others
            ]
            hint = f" Predict with {' or '.join(choices)} instead." if choices else ""
            raise CheckpointError(f"fold {fold}: {exc}{hint}") from exc
        init_args = ckpt.get("init_args") or {}
        fold_configuration = init_args.get("configuration") or model_dir.name.split("__")[-1]
        if i == 0:
            trainer_name = str(ckpt.get("trainer_name") or model_dir.name.split("__")[0])
            configuration = fold_configuration
            axes = ckpt.get("inference_allowed_mirroring_axes")
            mirror_axes = tuple(int(a) for a in axes) if axes is not None else None
        elif fold_configuration != configuration:
            raise PredictionError(
                f"fold {fold}: {path} was trained with configuration {fold_configuration!r}, fold {files[0][0]} "
                f"with {configuration!r}; ensemble only folds of one model"
            )
        parameters.append(ckpt["network_weights"])
    assert trainer_name is not None and configuration is not None

    plans_manager = atomic_plans_manager(plans)
    if configuration not in plans.get("configurations", {}):
        raise PredictionError(
            f"{model_dir / 'plans.json'} has no configuration {configuration!r} (the checkpoint's): "
            "the plans do not belong to this model"
        )
    configuration_manager = plans_manager.get_configuration(configuration)
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = _trainer_class(trainer_name).build_network_architecture(
        plans_manager, configuration_manager, num_inputs, num_outputs, enable_deep_supervision=False
    )
    for (fold, path), weights in zip(files, parameters):
        try:
            network.load_state_dict(weights)  # checks every fold now, not halfway through a prediction
        except RuntimeError as exc:
            raise PredictionError(
                f"fold {fold}: the weights in {path} do not fit the network that {model_dir / 'plans.json'} "
                f"describes ({str(exc).splitlines()[0]}); use the plans.json written with this model"
            ) from exc
    network.load_state_dict(parameters[0])

    return sliding_window_predictor(
        network,
        plans_manager,
        configuration_manager,
        dataset_json,
        trainer_name,
        mirror_axes,
        torch_device,
        step_size,
        mirroring,
        parameters,
    )
