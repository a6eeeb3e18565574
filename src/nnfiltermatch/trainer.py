"""The nnFilterMatch trainer: nnU-Net's ``nnUNetTrainer`` with a semi-supervised step and the entropy filter.

Only the hooks that must change are overridden: ``initialize`` (teacher, unlabelled loss), ``get_dataloaders``
(the unlabelled stream), ``train_step`` (weak view -> pseudo-labels -> strong view -> one forward pass),
``on_epoch_start`` (every random stream seeded from seed and epoch, so ``--continue`` is the uninterrupted run),
``on_train_epoch_start`` (the filter), epoch-end logging, and checkpoint save/load (pool, rounds, teacher, a
digest of the weights). Non-finite weights never reach a checkpoint: a save refuses them, and a run whose loss stays
non-finite stops, naming the last good checkpoint.
The three modes are thin subclasses, so each gets its own nnU-Net results folder, as nnU-Net's trainer variants do.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from nnfiltermatch import distributed
from nnfiltermatch.config import CONFIG_FILENAME, PLANS_KEY, TrainConfig, resolve_config
from nnfiltermatch.errors import PreparationError
from nnfiltermatch.files import atomic_write_text
from nnfiltermatch.pseudo_labels import ema_update, every_class_segmented, pseudo_labels_for_scales, ramp_weight
from nnfiltermatch.runs import (
    DIGEST_KEY,
    FILTER_DIRNAME,
    PSEUDO_LABEL_DIRNAME,
    RESUME_ORDER,
    STATE_KEY,
    CheckpointError,
    describe_epoch,
    listed,
    load_checkpoint_safely,
    non_finite_tensors,
    usable_checkpoints_beside,
    weights_digests,
)
from nnfiltermatch.uncertainty import reduce_case_score, select_cases_to_drop, voxel_entropy
from nnfiltermatch.unlabeled import (
    OwnRandomStream,
    UnlabeledDataset,
    make_unlabeled_loader,
    pseudo_labelled_ids,
    save_pseudo_label,
    shutdown_loader,
)
from nnfiltermatch.views import cutmix, cutout, paste_boxes, sample_geometric_transform, strong_intensity

SSL_LOG_KEYS = ("sup_losses", "unsup_losses", "confident_fraction", "unsup_weight", "pool_size")
# Why 5, not 1: under CUDA mixed precision nnU-Net's GradScaler skips a step whose fp16 values overflowed and lowers
# its scale, so a lone non-finite loss can pass harmlessly; five in a row means the weights themselves are gone.
# (Without a scaler, on CPU, the first one already spoils them; the save guard keeps them off disk meanwhile.)
MAX_NON_FINITE_STEPS = 5
# the random streams of a training epoch, each seeded at the start of every epoch (nnFilterMatchTrainer.seed_epoch)
RANDOM_STREAMS = ("augmentation", "unlabelled", "views")


def epoch_seed(seed: int, epoch: int, rank: int, stream: str) -> int:
    """The seed of one random stream in one epoch on one DDP rank: 32 bits mixed by NumPy's ``SeedSequence``, so
    no two (seed, epoch, rank, stream) share a sequence, as sums like seed + epoch would."""
    return int(np.random.SeedSequence([seed, epoch, rank, RANDOM_STREAMS.index(stream)]).generate_state(1)[0])


class NonFiniteTrainingError(PreparationError):
    """The training diverged (non-finite loss or weights); the message names the epoch and the last good checkpoint."""


def _as_list(x: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return list(x) if isinstance(x, (list, tuple)) else [x]


class SemiSupervisedLoss(nn.Module):
    """nnU-Net's loss on the labelled rows plus a weighted, ignore-aware loss on the pseudo-labelled rows.

    ``n_labeled`` is None outside semi-supervised steps (validation, warm-up): then it is nnU-Net's loss unchanged.
    """

    def __init__(self, supervised: nn.Module, unsupervised: nn.Module):
        super().__init__()
        self.supervised = supervised
        self.unsupervised = unsupervised
        self.n_labeled: int | None = None
        self.weight = 0.0
        self.last: dict[str, float] = {}

    def forward(self, output: Any, target: Any) -> torch.Tensor:
        if self.n_labeled is None:
            loss = self.supervised(output, target)
            self.last = {"sup": float(loss.detach()), "unsup": 0.0}
            return loss
        n = self.n_labeled
        is_list = isinstance(output, (list, tuple))
        out, tgt = _as_list(output), _as_list(target)
        sup_args = ([o[:n] for o in out], [t[:n] for t in tgt])
        unsup_args = ([o[n:] for o in out], [t[n:] for t in tgt])
        if not is_list:
            sup_args = (sup_args[0][0], sup_args[1][0])
            unsup_args = (unsup_args[0][0], unsup_args[1][0])
        sup = self.supervised(*sup_args)
        unsup = self.unsupervised(*unsup_args)
        if not torch.is_tensor(unsup):  # nnU-Net returns a plain 0 when every pseudo-label voxel is ignored
            unsup = sup.new_zeros(())
        self.last = {"sup": float(sup.detach()), "unsup": float(unsup.detach())}
        return sup + self.weight * unsup


class nnFilterMatchTrainer(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming convention for trainers)
    """Mode ``filtermatch``: pseudo-labels plus the entropy filter on the unlabelled pool."""

    mode = "filtermatch"

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
        self.ignore_index = self.label_manager.num_segmentation_heads  # never a real class
        self.pool: list[str] | None = None
        self.filter_rounds: list[dict[str, Any]] = []
        self.teacher: nn.Module | None = None
        self.ssl_start_epoch: int | None = None  # first epoch with pseudo-labels (see start_semi_supervision_if_due)
        self.dataloader_unlabeled: Any = None
        self._epoch_stats: list[dict[str, float]] = []
        self._unlabeled_drawn: list[str] = []  # the unlabelled cases of this epoch's steps (the DDP rank digest)
        self._view_rng = torch.Generator()
        self._non_finite_steps = 0  # consecutive training steps with a non-finite loss
        self._non_finite_since: int | None = None  # the epoch of the first of them
        self._good_checkpoints: dict[str, int] = {}  # file name -> epoch it ends, for the checkpoints this run wrote
        for key in SSL_LOG_KEYS:
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    # ----- set-up -------------------------------------------------------------------------------------------
    @property
    def unlabeled_folder(self) -> Path:
        return Path(self.preprocessed_dataset_folder_base) / "unlabeled" / self.configuration_manager.data_identifier

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
        unsupervised: nn.Module = DC_and_CE_loss(
            {"batch_dice": self.configuration_manager.batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": self.is_ddp},
            {},
            weight_ce=1,
            # Dice on pseudo-labels pushes a class the teacher missed in a patch towards zero everywhere in it: at
            # small compute this erased the smaller Hippocampus class, so the default is cross-entropy only.
            weight_dice=1 if self.fm.unsup_loss == "dice_ce" else 0,
            ignore_label=self.ignore_index,
            dice_class=MemoryEfficientSoftDiceLoss,
        )
        if self.enable_deep_supervision:
            unsupervised = DeepSupervisionWrapper(unsupervised, self.loss.weight_factors)
        self.loss = SemiSupervisedLoss(self.loss, unsupervised)
        if self.fm.pseudo_labels_online and self.fm.teacher == "ema":
            self.teacher = copy.deepcopy(self.plain_network()).requires_grad_(False)

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

    def get_dataloaders(self):
        train, val = super().get_dataloaders()
        if self.fm.uses_unlabeled:
            if self.pool is None:
                self.pool = UnlabeledDataset.get_identifiers(str(self.unlabeled_folder))
            if not self.pool:
                raise RuntimeError(
                    f"no unlabelled cases in {self.unlabeled_folder}: mode {self.fm.mode} needs them. Add images to "
                    "imagesUnlabeled/ (or use a labelled list) and rerun `nnfiltermatch prepare`, or train --mode "
                    "supervised."
                )
            self.dataloader_unlabeled = self._build_unlabeled_loader()
        return train, val

    @property
    def unlabeled_batch_size(self) -> int:
        """From this process's labelled batch: under DDP nnU-Net splits the global batch, so this splits too."""
        return max(1, round(self.fm.unlabeled_ratio * self.batch_size))

    def _build_unlabeled_loader(self, pseudo_label_folder: Path | None = None):
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
        assert self.pool is not None
        return make_unlabeled_loader(
            self.unlabeled_folder,
            self.pool,
            self.unlabeled_batch_size,
            initial_patch_size,
            self.configuration_manager.patch_size,
            self.label_manager,
            transforms,
            pin_memory=self.device.type == "cuda",
            seed=epoch_seed(self.fm.seed, self.current_epoch, self.local_rank, "unlabelled"),
            pseudo_label_folder=pseudo_label_folder,
        )

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

    # ----- the semi-supervised step -------------------------------------------------------------------------
    def semi_supervised_now(self) -> bool:
        return self.ssl_start_epoch is not None and self.current_epoch >= self.ssl_start_epoch

    def on_epoch_start(self) -> None:
        super().on_epoch_start()
        self.seed_epoch()

    def seed_epoch(self) -> None:
        """Seed every random stream of this epoch from (seed, epoch, rank) alone, first thing in the epoch.

        Why: what an epoch draws then depends on the seed, the epoch and the state a checkpoint holds (weights,
        optimiser, teacher, pool, logs), never on what the process drew before it: nnU-Net's first batches in
        ``get_dataloaders``, or the epochs a resumed run did not run. So ``--continue`` from any checkpoint replays
        the epochs after it as the uninterrupted run drew them. The streams: Python's, NumPy's and torch's global
        generators (nnU-Net's labelled and validation loaders and their augmentation, in this process), the
        unlabelled stream's own state, and the strong-view generator; per rank, so DDP ranks draw different data.
        nnU-Net's worker processes (``nnUNet_n_proc_DA`` > 0) seed themselves from the operating system: nothing
        repeats them, resumed or not.
        """
        seed, epoch, rank = self.fm.seed, self.current_epoch, self.local_rank
        augmentation = epoch_seed(seed, epoch, rank, "augmentation")
        random.seed(augmentation)
        np.random.seed(augmentation)
        torch.manual_seed(augmentation)
        if isinstance(self.dataloader_unlabeled, OwnRandomStream):
            self.dataloader_unlabeled.reseed(epoch_seed(seed, epoch, rank, "unlabelled"))
        self._view_rng.manual_seed(epoch_seed(seed, epoch, rank, "views"))

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._epoch_stats = []
        self._unlabeled_drawn = []
        self.start_semi_supervision_if_due()
        due = self.current_epoch in self.fm.filter_epochs
        if due and not any(r["epoch"] == self.current_epoch for r in self.filter_rounds):
            if self.semi_supervised_now():
                self.run_filter_round()
                self.network.train()
            else:
                self.print_to_log_file(f"filter round of epoch {self.current_epoch} skipped: no pseudo-labels yet")

    def pseudo_label_model(self) -> nn.Module:
        """The EMA teacher once pseudo-labelling has started, else the student."""
        return self.teacher if self.teacher is not None and self.semi_supervised_now() else self.plain_network()

    def start_semi_supervision_if_due(self) -> bool:
        """Start pseudo-labelling after warm-up, once every class is found; copy the student into the EMA teacher.

        Why: pseudo-labels from a model that misses a class teach that class as background, and the EMA only runs
        on semi-supervised steps, so without the copy the first pseudo-labels would come from a teacher that is
        mostly the random initial weights. Both erased whole classes at small compute. nnU-Net's validation Dice is
        gathered over all DDP ranks, so every rank decides alike, and the students are identical.
        """
        if not self.fm.uses_unlabeled or self.ssl_start_epoch is not None:
            return False
        if self.current_epoch < (self.fm.warmup_epochs or 0):
            return False
        floor = self.fm.ssl_start_dice if self.fm.val_iters_per_epoch > 0 else 0.0  # no validation: cannot wait
        history = self.logger.local_logger.my_fantastic_logging.get("dice_per_class_or_region", [])
        last = ", ".join(f"{float(d):.3f}" for d in history[-1]) if history else "none yet"
        if not every_class_segmented(history, floor):
            self.print_to_log_file(
                f"pseudo-labels wait: validation pseudo-Dice per class [{last}] not all >= --ssl-start-dice {floor}"
            )
            return False
        self.ssl_start_epoch = self.current_epoch
        if self.teacher is not None:
            self.teacher.load_state_dict(self.plain_network().state_dict())
        self.print_to_log_file(f"pseudo-labels start at epoch {self.current_epoch} (pseudo-Dice per class [{last}])")
        return True

    def train_step(self, batch: dict) -> dict:
        assert isinstance(self.loss, SemiSupervisedLoss)
        if not self.semi_supervised_now():
            self.loss.n_labeled = None
            result = super().train_step(batch)
            self._epoch_stats.append({"sup": self.loss.last["sup"], "unsup": 0.0, "conf": float("nan"), "w": 0.0})
            return self.watch_loss(result)

        unlabeled = next(self.dataloader_unlabeled)
        self._unlabeled_drawn.extend(str(key) for key in unlabeled["keys"])
        weak = unlabeled["data"].to(self.device, non_blocking=True)
        model = self.pseudo_label_model()
        with torch.no_grad():
            with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
                weak_logits = _as_list(model(weak))
            pseudo, confident = pseudo_labels_for_scales(weak_logits, self.fm.tau, self.ignore_index)
            del weak_logits
            flip = self.current_epoch >= self.fm.flip_from_epoch
            transform = sample_geometric_transform([tuple(p.shape[-2:]) for p in pseudo], self._view_rng, flip)
            strong = transform.apply(weak)
            pseudo = [transform.apply(p) for p in pseudo]
            if self.fm.strong_intensity:
                strong = strong_intensity(strong, self._view_rng, p=self.fm.intensity_p)
            if self.fm.cutout_p > 0 and float(torch.rand((), generator=self._view_rng)) < self.fm.cutout_p:
                strong, pseudo = cutout(strong, pseudo, self._view_rng, self.ignore_index)
            if self.fm.cutmix_p > 0 and float(torch.rand((), generator=self._view_rng)) < self.fm.cutmix_p:
                strong, pseudo = cutmix(strong, pseudo, self._view_rng)
            labeled_targets = [t.to(self.device, non_blocking=True) for t in _as_list(batch["target"])]
            data = batch["data"].to(self.device, non_blocking=True)
            if self.fm.copy_paste_p > 0 and float(torch.rand((), generator=self._view_rng)) < self.fm.copy_paste_p:
                # BCP's box side: 2/3 of the patch, a labelled box with its true labels in each pseudo-labelled view
                strong, pseudo = paste_boxes(strong, pseudo, data, labeled_targets, self._view_rng, 2 / 3)

        targets = [torch.cat([t, p.to(t.dtype)]) for t, p in zip(labeled_targets, pseudo)]
        assert self.ssl_start_epoch is not None
        weight = ramp_weight(self.current_epoch, self.ssl_start_epoch, self.fm.rampup_epochs or 0, self.fm.lambda_u)
        self.loss.n_labeled, self.loss.weight = data.shape[0], weight
        joint = {
            "data": torch.cat([data, strong]),
            "target": targets if isinstance(batch["target"], (list, tuple)) else targets[0],
        }
        try:
            result = super().train_step(joint)
        finally:
            self.loss.n_labeled = None
        if self.teacher is not None:
            ema_update(self.teacher, self.plain_network(), self.fm.ema_decay)
        self._epoch_stats.append(
            {"sup": self.loss.last["sup"], "unsup": self.loss.last["unsup"], "conf": confident, "w": weight}
        )
        return self.watch_loss(result)

    def watch_loss(self, result: dict) -> dict:
        """Count consecutive non-finite training losses; stop the run at ``MAX_NON_FINITE_STEPS`` of them.

        Free on the normal path: nnU-Net's ``train_step`` already returns the loss as a CPU scalar.
        """
        loss = float(np.asarray(result["loss"]).mean())
        if math.isfinite(loss):
            self._non_finite_steps = 0
            self._non_finite_since = None
            return result
        self._non_finite_steps += 1
        if self._non_finite_since is None:
            self._non_finite_since = self.current_epoch
            self.print_to_log_file(
                f"warning: training loss {loss} at epoch {self.current_epoch}; the run stops after "
                f"{MAX_NON_FINITE_STEPS} non-finite steps in a row"
            )
        if self._non_finite_steps >= MAX_NON_FINITE_STEPS:
            raise NonFiniteTrainingError(
                self._diverged(
                    f"the training loss has been non-finite ({loss}) for {self._non_finite_steps} consecutive steps, "
                    f"since epoch {self._non_finite_since}"
                )
            )
        return result

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        stats = self._epoch_stats or [{"sup": float("nan"), "unsup": 0.0, "conf": float("nan"), "w": 0.0}]
        log = self.logger.log
        log("sup_losses", float(np.mean([s["sup"] for s in stats])), self.current_epoch)
        log("unsup_losses", float(np.mean([s["unsup"] for s in stats])), self.current_epoch)
        confs = [s["conf"] for s in stats if not np.isnan(s["conf"])]
        log("confident_fraction", float(np.mean(confs)) if confs else float("nan"), self.current_epoch)
        log("unsup_weight", float(stats[-1]["w"]), self.current_epoch)
        log("pool_size", len(self.pool) if self.pool is not None else 0, self.current_epoch)
        self.print_to_log_file(
            f"sup_loss {self.logger.get_value('sup_losses', -1):.4f} unsup_loss "
            f"{self.logger.get_value('unsup_losses', -1):.4f} (weight {stats[-1]['w']:.3f}) confident_fraction "
            f"{self.logger.get_value('confident_fraction', -1):.3f} pool_size {self.logger.get_value('pool_size', -1)}"
        )

    def on_epoch_end(self) -> None:
        super().on_epoch_end()
        if self.local_rank == 0:
            from nnfiltermatch.plots import plot_ssl_progress

            plot_ssl_progress(self.logger.local_logger.my_fantastic_logging, Path(self.output_folder))

    def on_train_end(self) -> None:
        if self.fm.uses_unlabeled and self.ssl_start_epoch is None:
            self.print_to_log_file(
                f"WARNING: pseudo-labels never started: the validation pseudo-Dice of some class stayed below "
                f"--ssl-start-dice {self.fm.ssl_start_dice}, so this run is supervised only. Train longer, or lower "
                "--ssl-start-dice if you accept pseudo-labels from a model that misses a class."
            )
        super().on_train_end()
        if self.dataloader_unlabeled is not None:
            shutdown_loader(self.dataloader_unlabeled)
            self.dataloader_unlabeled = None
        distributed.maybe_write_rank_digest(self.rank_digest())

    def rank_digest(self) -> dict[str, Any]:
        """What must agree across DDP ranks at the end (pool, rounds, weights), plus what must not (data seen)."""
        return {
            "device": str(self.device),
            "batch_size": self.batch_size,
            "unlabeled_batch_size": self.unlabeled_batch_size if self.fm.uses_unlabeled else 0,
            "pool": list(self.pool) if self.pool is not None else None,
            "ssl_start_epoch": self.ssl_start_epoch,
            "filter_rounds": [
                {"epoch": r["epoch"], "dropped": sorted(c["case"] for c in r["cases"] if not c["kept"])}
                for r in self.filter_rounds
            ],
            "student": distributed.state_digest(self.plain_network()),
            "teacher": distributed.state_digest(self.teacher),
            "unlabeled_drawn": sorted(set(self._unlabeled_drawn)),
        }

    # ----- the filter ---------------------------------------------------------------------------------------
    def pool_logits(self, model: nn.Module, case_ids: list[str], desc: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Each case's logits in the preprocessed geometry, by nnU-Net's sliding-window inference with ``model``."""
        decoder = model.decoder
        previous_ds = decoder.deep_supervision
        decoder.deep_supervision = False
        predictor = nnUNetPredictor(
            tile_step_size=self.fm.filter_tile_step,
            use_gaussian=True,
            use_mirroring=self.fm.filter_mirroring,
            perform_everything_on_device=self.device.type == "cuda",
            device=self.device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        predictor.manual_initialization(
            model,
            self.plans_manager,
            self.configuration_manager,
            None,
            self.dataset_json,
            type(self).__name__,
            self.inference_allowed_mirroring_axes,
        )
        dataset = UnlabeledDataset(str(self.unlabeled_folder), list(case_ids))
        try:
            for case_id in tqdm(case_ids, desc=desc, unit="case", disable=self.local_rank != 0):
                data = torch.from_numpy(np.ascontiguousarray(dataset.load_data(case_id)))
                with torch.no_grad():
                    yield case_id, predictor.predict_sliding_window_return_logits(data)
        finally:
            decoder.deep_supervision = previous_ds

    def score_pool(self, case_ids: list[str]) -> dict[str, float]:
        """Entropy score of every case with the pseudo-labelling model."""
        scores: dict[str, float] = {}
        for case_id, logits in self.pool_logits(
            self.pseudo_label_model(), case_ids, f"filter round (epoch {self.current_epoch})"
        ):
            probs = torch.softmax(logits.float(), dim=0)
            scores[case_id] = reduce_case_score(voxel_entropy(probs, dim=0), self.fm.score, self.fm.topk_fraction)
        return scores

    def _score_shared(self, case_ids: list[str]) -> dict[str, float]:
        """Window scores of ``case_ids`` on every rank; under DDP each case is scored by one rank only."""
        mine = distributed.shard(case_ids)
        return distributed.gather_scores(self.score_pool(mine) if mine else {})

    def run_filter_round(self) -> dict[str, Any]:
        """Score the pool, drop the most confident fraction, rebuild the unlabelled loader, record the round.

        Under DDP the ranks share the scoring, rank 0's decision is broadcast, and every rank rebuilds its loader on
        the same pool before a barrier.
        """
        assert self.pool is not None
        start = time.time()
        before = list(self.pool)
        scores = self._score_shared(before)
        dropped = set(select_cases_to_drop(scores, self.fm.filter_drop))
        seconds = time.time() - start
        record = {
            "epoch": self.current_epoch,
            "score": self.fm.score,
            "mirroring": self.fm.filter_mirroring,
            "tile_step": self.fm.filter_tile_step,
            "pool_before": len(before),
            "pool_after": len(before) - len(dropped),
            "seconds": round(seconds, 3),
            "cases": [{"case": c, "score": scores[c], "kept": c not in dropped} for c in sorted(before)],
        }
        if distributed.is_distributed():
            record["world_size"] = distributed.world_size()
            record = distributed.broadcast_from_rank0(record)  # rank 0 decides; every rank follows
            dropped = {c["case"] for c in record["cases"] if not c["kept"]}
        self.pool = [c for c in before if c not in dropped]
        self.filter_rounds.append(record)
        if self.local_rank == 0:
            target = Path(self.output_folder) / FILTER_DIRNAME / f"epoch_{self.current_epoch:04d}.json"
            atomic_write_text(target, json.dumps(record, indent=2))
        self.print_to_log_file(
            f"Filter round at epoch {self.current_epoch}: scored {len(before)} cases in {record['seconds']:.1f} s, "
            f"dropped {len(dropped)} ({', '.join(sorted(dropped))}), pool now {len(self.pool)}"
        )
        if self.dataloader_unlabeled is not None:
            shutdown_loader(self.dataloader_unlabeled)
            self.dataloader_unlabeled = self._build_unlabeled_loader()
        distributed.barrier()
        return record

    # ----- checkpoints --------------------------------------------------------------------------------------
    def state_for_checkpoint(self) -> dict[str, Any]:
        return {
            "config": self.fm.to_dict(),
            "mode": self.mode,
            "trainer_class": f"{type(self).__module__}.{type(self).__name__}",
            "pool": list(self.pool) if self.pool is not None else None,
            "filter_rounds": copy.deepcopy(self.filter_rounds),
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "ssl_start_epoch": self.ssl_start_epoch,
        }

    def live_weight_sets(self) -> dict[str, dict[str, torch.Tensor]]:
        """The weight sets a checkpoint stores, as ``runs.checkpoint_weight_sets`` reads them back."""
        sets = {"network_weights": self.plain_network().state_dict()}
        if self.teacher is not None:
            sets["teacher"] = self.teacher.state_dict()
        return sets

    def save_checkpoint(self, filename: str) -> None:
        # nnU-Net's save_checkpoint has no hook for extra state; its 'init_args' entry is saved and restored
        # verbatim, so our state rides there, with a digest of the weights that loading verifies. Written under a
        # temporary name, then renamed: a kill never leaves a truncated checkpoint behind.
        sets = self.live_weight_sets()
        # every rank checks (DDP keeps the weights identical), so every rank stops alike
        bad = {part: names for part, weights in sets.items() if (names := non_finite_tensors(weights))}
        if bad:
            found = " and ".join(f"{len(n)} of {len(sets[p])} tensors of the {p} ({listed(n)})" for p, n in bad.items())
            after = f", after the training loss became non-finite at epoch {self._non_finite_since}"
            raise NonFiniteTrainingError(
                self._diverged(
                    f"the weights hold NaN or infinite values in {found}"
                    f"{after if self._non_finite_since is not None else ''}; {Path(filename).name} was not written"
                )
            )
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
            self._good_checkpoints[Path(filename).name] = self.current_epoch

    def _diverged(self, reason: str) -> str:
        """The stop message: what went non-finite, the last good checkpoint, and how to resume from it."""
        folder = Path(self.output_folder)
        good = {name: epoch for name, epoch in self._good_checkpoints.items() if (folder / name).is_file()}
        text = f"training stopped at epoch {self.current_epoch}: {reason}."
        cure = f"a lower --lr (now {self.fm.lr}) or a look at the training data is the usual cure"
        if not good:
            return f"{text} No checkpoint was written before: start again with --overwrite ({cure})."
        last = max(good, key=lambda name: (good[name], name == "checkpoint_latest.pth"))
        text += f" The last good checkpoint is {folder / last} ({describe_epoch(good[last])}); nothing later was saved."
        resume = next((name for name in RESUME_ORDER if (folder / name).is_file()), last)
        if resume == last:
            text += " `--continue` resumes from it"
        else:
            text += (
                f" `--continue` resumes from {resume} ({describe_epoch(good.get(resume))}); to resume from {last}, "
                f"copy it over {resume} first"
            )
        return f"{text}; if the loss turns non-finite again, {cure}."

    def _start_epoch_before_the_gate(self) -> int | None:
        """For a checkpoint written before ``ssl_start_epoch`` existed: pseudo-labels then started right after
        warm-up, so a run already past it keeps that start instead of waiting on the new gate."""
        warmup = self.fm.warmup_epochs or 0
        if self.fm.uses_unlabeled and self.current_epoch > warmup:
            return warmup
        return None

    def _pool_still_unlabeled(self, pool: list[str] | None) -> list[str] | None:
        """The saved pool minus cases that left the unlabelled folder since (``prepare --add-labels``, or removed).

        Why: drawing them would fail. ``train --continue`` refuses a changed labelled set before it gets here, but a
        checkpoint loaded after ``--add-labels`` for validation (``train --val``), or one resumed after unlabelled
        images were removed and the dataset prepared again, still comes here.
        """
        if pool is None:
            return None
        available = set(UnlabeledDataset.get_identifiers(str(self.unlabeled_folder)))
        gone = [case for case in pool if case not in available]
        if gone:
            self.print_to_log_file(
                f"{len(gone)} case(s) of the saved unlabelled pool are no longer unlabelled (labelled with prepare "
                f"--add-labels, or removed): {', '.join(gone)}. The pool continues without them, so a resumed run "
                "no longer draws what the uninterrupted one would."
            )
        return [case for case in pool if case in available]

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        if isinstance(filename_or_checkpoint, str):
            # nnU-Net unpickles with weights_only=False; refuse a checkpoint with anything beyond plain data first,
            # and one whose weights or optimizer state are not finite, or differ from their digest.
            path = Path(filename_or_checkpoint)
            try:
                self._verify_optimizer_state(load_checkpoint_safely(path), path)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc} {self._resume_alternatives(path)}") from exc
        super().load_checkpoint(filename_or_checkpoint)
        state = self.my_init_kwargs.pop(STATE_KEY, None)
        if state is None:
            raise PreparationError(
                f"{filename_or_checkpoint} was not written by nnfiltermatch (no pool or filter state in it): "
                "cannot continue it as a semi-supervised run. Start a new run in another results folder."
            )
        if state["mode"] != self.mode:
            raise PreparationError(f"checkpoint is from mode {state['mode']!r}, this trainer runs {self.mode!r}")
        self.pool = self._pool_still_unlabeled(state["pool"])
        self.filter_rounds = state["filter_rounds"]
        self.ssl_start_epoch = state.get("ssl_start_epoch", self._start_epoch_before_the_gate())
        if self.teacher is not None and state["teacher"] is not None:
            self.teacher.load_state_dict(state["teacher"])
        for key in SSL_LOG_KEYS:
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])
        if isinstance(filename_or_checkpoint, str):
            self._good_checkpoints[Path(filename_or_checkpoint).name] = self.current_epoch - 1

    @staticmethod
    def _verify_optimizer_state(checkpoint: dict[str, Any], path: Path) -> None:
        """Momentum buffers are about half the file and not in the digest: a NaN there spoils the first step."""
        entries = (checkpoint.get("optimizer_state") or {}).get("state") or {}
        tensors = {f"{index}.{key}": value for index, entry in entries.items() for key, value in entry.items()}
        bad = non_finite_tensors(tensors)
        if bad:
            raise CheckpointError(
                f"{path}: unusable optimizer state: {len(bad)} of {len(tensors)} tensors of its optimizer_state hold "
                f"NaN or infinite values ({listed(bad)}); resuming would turn every weight NaN at the first step."
            )

    @staticmethod
    def _resume_alternatives(path: Path) -> str:
        """Which other checkpoints in the fold folder are usable, and the commands that resume from one."""
        others = usable_checkpoints_beside(path, RESUME_ORDER)
        if not others:
            return f"No other usable checkpoint in {path.parent}: start again with --overwrite."
        listing = ", ".join(f"{name} ({describe_epoch(epoch)})" for name, epoch in others.items())
        pick = max(others, key=lambda name: others[name] if others[name] is not None else -1)
        return (
            f"Usable checkpoints beside it: {listing}. To resume from {pick}: in {path.parent} run "
            f"`mv {path.name} {path.name}.bad && cp {pick} {path.name}`, then train again with --continue."
        )


class nnFilterMatchTrainer_ssl(nnFilterMatchTrainer):  # noqa: N801
    """Mode ``ssl``: pseudo-labels on the whole unlabelled pool, no filter (the paper's middle ablation row)."""

    mode = "ssl"


class nnFilterMatchTrainer_supervised(nnFilterMatchTrainer):  # noqa: N801
    """Mode ``supervised``: labelled cases only, the same code path with the unlabelled half switched off."""

    mode = "supervised"


class nnFilterMatchTrainer_selftrain(nnFilterMatchTrainer):  # noqa: N801
    """Mode ``selftrain``, the second stage of offline self-training (the recipe users run by hand with nnU-Net).

    Starts from the weights of a finished supervised run (``extra["selftrain_from"]``, set by ``training.train``),
    labels the whole unlabelled pool once with them (sliding window, argmax, saved in ``pseudo_labels/``), then
    trains with nnU-Net's own loss on batches of labelled and pseudo-labelled patches, both through nnU-Net's
    augmentation. No teacher, no threshold, no strong view, no filter: the baseline a user would otherwise run.
    """

    mode = "selftrain"

    @property
    def pseudo_label_folder(self) -> Path:
        return Path(self.output_folder) / PSEUDO_LABEL_DIRNAME

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        self._resumed = True

    def get_dataloaders(self):
        if not getattr(self, "_resumed", False):
            self._start_from_supervised_weights()
        if self.pool is None:
            self.pool = UnlabeledDataset.get_identifiers(str(self.unlabeled_folder))
        missing = sorted(set(self.pool) - pseudo_labelled_ids(self.pseudo_label_folder))
        if missing:  # all of them on a new run; those a killed run did not reach on --continue
            self._write_pseudo_labels(distributed.shard(missing))
            distributed.barrier()
        return super().get_dataloaders()

    def _start_from_supervised_weights(self) -> None:
        source = self.fm.extra.get("selftrain_from")
        if not source:
            raise PreparationError(
                "mode selftrain starts from a supervised model: train it with `nnfiltermatch train --mode selftrain`, "
                "which trains (or reuses) the supervised run first"
            )
        checkpoint = load_checkpoint_safely(Path(source))
        self.plain_network().load_state_dict(checkpoint["network_weights"])
        self.print_to_log_file(f"self-training starts from the supervised model {source}")

    def _write_pseudo_labels(self, case_ids: list[str]) -> None:
        model = self.plain_network()
        was_training = model.training
        model.eval()
        for case_id, logits in self.pool_logits(model, case_ids, "pseudo-labelling the unlabelled pool"):
            save_pseudo_label(self.pseudo_label_folder, case_id, logits.argmax(0, keepdim=True).cpu().numpy())
        model.train(was_training)
        self.print_to_log_file(f"pseudo-labelled {len(case_ids)} unlabelled cases with the supervised model")

    def _build_unlabeled_loader(self):
        return super()._build_unlabeled_loader(pseudo_label_folder=self.pseudo_label_folder)

    def start_semi_supervision_if_due(self) -> bool:
        """The pseudo-labels exist before the first step: they are used from epoch 0, with no gate."""
        if self.ssl_start_epoch is None:
            self.ssl_start_epoch = 0
        return False

    def train_step(self, batch: dict) -> dict:
        pseudo = next(self.dataloader_unlabeled)
        target = _as_list(batch["target"])
        joint_target = [torch.cat([t, p.to(t.dtype)]) for t, p in zip(target, _as_list(pseudo["target"]))]
        joint = {
            "data": torch.cat([batch["data"], pseudo["data"]]),
            "target": joint_target if isinstance(batch["target"], (list, tuple)) else joint_target[0],
        }
        assert isinstance(self.loss, SemiSupervisedLoss)
        self.loss.n_labeled = None  # nnU-Net's loss on every row: pseudo-labels count as labels
        result = nnUNetTrainer.train_step(self, joint)
        self._epoch_stats.append({"sup": self.loss.last["sup"], "unsup": 0.0, "conf": float("nan"), "w": 1.0})
        return self.watch_loss(result)
