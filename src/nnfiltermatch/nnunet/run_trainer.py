"""The nnU-Net trainer every nnfiltermatch run needs, whatever its method: the resolved configuration from the plans,
DDP on CPU, the start record, and checkpoints that carry the subclass's state and a digest of the weights, written
atomically and verified on load. Non-finite weights never reach a checkpoint: a save refuses them, and a run whose
loss stays non-finite stops, naming the last good checkpoint (``divergence``). The method (``nnFilterMatchTrainer``)
adds only its hooks on top."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel

from nnfiltermatch.config import CONFIG_FILENAME, PLANS_KEY, TrainConfig, resolve_config
from nnfiltermatch.errors import PreparationError
from nnfiltermatch.nnunet.divergence import DivergenceWatch, resume_alternatives, verify_optimizer_state
from nnfiltermatch.runs import (
    DIGEST_KEY,
    RESUME_ORDER,
    STATE_KEY,
    CheckpointError,
    load_checkpoint_safely,
    weights_digests,
)


class RunTrainer(nnUNetTrainer):
    """nnU-Net's trainer as an nnfiltermatch run of mode ``mode`` needs it; the method is the subclass's.

    Subclasses add their state to ``state_for_checkpoint`` and take it back in ``restore_state``.
    """

    mode: str  # the mode a subclass trains (TrainConfig.mode)

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature)
    ):
        raw = plans.pop(PLANS_KEY, None)
        fm = TrainConfig.from_dict(raw) if raw else resolve_config({"mode": self.mode})
        if fm.mode != self.mode:
            raise ValueError(f"{type(self).__name__} runs mode {self.mode!r}, the configuration says {fm.mode!r}")
        if fm.batch_size is not None:
            plans["configurations"][configuration]["batch_size"] = fm.batch_size
        with warnings.catch_warnings():
            if device.type == "cpu":  # under DDP nnU-Net builds a CUDA GradScaler, dropped below: no need to warn
                warnings.filterwarnings("ignore", message="torch.cuda.amp.GradScaler is enabled")
            super().__init__(plans, configuration, fold, dataset_json, device)
        if self.is_ddp and device.type == "cpu":
            # nnU-Net assumes DDP means CUDA and forces cuda:<rank> (and a CUDA grad scaler); keep the CPU the
            # caller asked for, so DDP over gloo runs on CPU processes.
            self.device = device
            self.grad_scaler = None
        if self.label_manager.has_regions:
            raise ValueError(
                "region-based datasets (regions in dataset.json labels) are not supported by nnfiltermatch"
            )
        self.fm = fm
        self.num_epochs = fm.epochs
        self.num_iterations_per_epoch = fm.iters_per_epoch
        self.num_val_iterations_per_epoch = fm.val_iters_per_epoch
        self.initial_lr = fm.lr
        self.weight_decay = fm.weight_decay
        self.save_every = fm.save_every
        self.pool: list[str] | None = None  # the unlabelled cases the run draws from (None: none, or not yet)
        self.divergence = DivergenceWatch(RESUME_ORDER)

    def plain_network(self) -> nn.Module:
        """The network without DDP or torch.compile wrappers: what the teacher copies and the scorer runs."""
        module = self.network.module if self.is_ddp else self.network
        return module._orig_mod if isinstance(module, OptimizedModule) else module

    def initialize(self) -> None:
        if self.was_initialized:
            return
        if self.is_ddp and self.device.type == "cpu":
            self._initialize_cpu_ddp()
        else:
            super().initialize()

    def _initialize_cpu_ddp(self) -> None:
        """nnU-Net's ``initialize`` with a CPU-capable DDP wrapper.

        nnU-Net wraps ``DDP(network, device_ids=[rank])``, which DDP rejects for a CPU module. So nnU-Net initialises
        as a single process, then its three DDP steps are applied here: per-rank batch size and oversampling, the DDP
        wrapper without ``device_ids``, the loss with ``ddp=True``. SyncBatchNorm is left out: it is CUDA-only, and
        nnU-Net's networks use instance norm, which has nothing to synchronise.
        """
        self.is_ddp = False
        try:
            super().initialize()
        finally:
            self.is_ddp = True
        self._set_batch_size_and_oversample()
        self.network = DistributedDataParallel(self.network)
        self.loss = self._build_loss()

    def training_transforms(self) -> tuple[Any, Any]:
        """nnU-Net's training augmentation of this configuration and the patch size it crops before it."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = (
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size,
            rotation,
            self._get_deep_supervision_scales(),
            mirror_axes,
            dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
            is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels,
            regions=None,
            ignore_label=self.label_manager.ignore_label,
        )
        return transforms, initial_patch_size

    def on_train_start(self) -> None:
        super().on_train_start()
        started = {
            "trainer": type(self).__name__,
            "fold": self.fold,
            "configuration": self.configuration_name,
            "batch_size_used": self.batch_size,
            "patch_size": list(self.configuration_manager.patch_size),
            "unlabeled_pool_start": len(self.pool or []),
            "augmentation_processes": get_allowed_n_proc_DA(),
        }
        if self.current_epoch > 0:  # resumed: the file keeps describing the run as it started (its pool, ...)
            before = self.fm.extra.get("augmentation_processes", started["augmentation_processes"])
            if before != started["augmentation_processes"]:
                self.print_to_log_file(
                    f"note: this run started with nnUNet_n_proc_DA={before} and resumes with "
                    f"{started['augmentation_processes']}: its epochs from here draw other batches than the "
                    "uninterrupted run would (only augmentation in the training process, 0, repeats a run)"
                )
            self.fm.extra = {**started, **self.fm.extra}
        else:
            self.fm.extra = {**self.fm.extra, **started}
        if self.local_rank == 0:
            self.fm.write(Path(self.output_folder) / CONFIG_FILENAME)

    def watch_loss(self, result: dict) -> dict:
        """Stop the run at too many consecutive non-finite training losses (``DivergenceWatch.observe_loss``).

        Free on the normal path: nnU-Net's ``train_step`` already returns the loss as a CPU scalar.
        """
        loss = float(np.asarray(result["loss"]).mean())
        folder = Path(self.output_folder)
        self.divergence.observe_loss(loss, self.current_epoch, folder, self.fm.lr, self.print_to_log_file)
        return result

    # ----- checkpoints --------------------------------------------------------------------------------------
    def state_for_checkpoint(self) -> dict[str, Any]:
        return {
            "config": self.fm.to_dict(),
            "mode": self.mode,
            "trainer_class": f"{type(self).__module__}.{type(self).__name__}",
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Take back what ``state_for_checkpoint`` saved (the configuration is read before the trainer is built)."""

    def live_weight_sets(self) -> dict[str, dict[str, torch.Tensor]]:
        """The weight sets a checkpoint stores, as ``inference.checkpoint_weight_sets`` reads them back."""
        return {"network_weights": self.plain_network().state_dict()}

    def save_checkpoint(self, filename: str) -> None:
        # nnU-Net's save_checkpoint has no hook for extra state; its 'init_args' entry is saved and restored
        # verbatim, so our state rides there, with a digest of the weights that loading verifies. Written under a
        # temporary name, then renamed: a kill never leaves a truncated checkpoint behind.
        sets = self.live_weight_sets()
        # every rank checks (DDP keeps the weights identical), so every rank stops alike
        folder, name = Path(self.output_folder), Path(filename).name
        self.divergence.refuse_non_finite(sets, name, self.current_epoch, folder, self.fm.lr)
        state = self.state_for_checkpoint()
        if self.local_rank == 0 and not self.disable_checkpointing:  # the one process that writes
            state[DIGEST_KEY] = weights_digests(sets)
        self.my_init_kwargs[STATE_KEY] = state
        partial = filename + ".partial"
        try:
            super().save_checkpoint(partial)
        finally:
            self.my_init_kwargs.pop(STATE_KEY, None)
        # only the writer renames: under DDP another rank must not move rank 0's half-written file
        if self.local_rank == 0 and os.path.isfile(partial):
            os.replace(partial, filename)
        if not self.disable_checkpointing:
            self.divergence.good[name] = self.current_epoch

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        if isinstance(filename_or_checkpoint, str):
            # nnU-Net unpickles with weights_only=False; refuse a checkpoint with anything beyond plain data first,
            # and one whose weights or optimizer state are not finite, or differ from their digest.
            path = Path(filename_or_checkpoint)
            try:
                verify_optimizer_state(load_checkpoint_safely(path), path)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc} {resume_alternatives(path, RESUME_ORDER)}") from exc
        super().load_checkpoint(filename_or_checkpoint)
        state = self.my_init_kwargs.pop(STATE_KEY, None)
        if state is None:
            raise PreparationError(
                f"{filename_or_checkpoint} was not written by nnfiltermatch (no pool or filter state in it): "
                "cannot continue it as a semi-supervised run. Start a new run in another results folder."
            )
        if state["mode"] != self.mode:
            raise PreparationError(f"checkpoint is from mode {state['mode']!r}, this trainer runs {self.mode!r}")
        self.restore_state(state)
        if isinstance(filename_or_checkpoint, str):
            self.divergence.good[Path(filename_or_checkpoint).name] = self.current_epoch - 1
