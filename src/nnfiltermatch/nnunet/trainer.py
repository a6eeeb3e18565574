"""The nnFilterMatch trainers: nnU-Net's ``nnUNetTrainer`` with a semi-supervised step and the entropy filter.

``RunTrainer`` (run_trainer.py) is what every run needs from nnU-Net's trainer, whatever the mode.

``nnFilterMatchTrainer`` adds the method through the hooks that must change: ``initialize`` (teacher, unlabelled
loss), ``get_dataloaders`` (the unlabelled stream), ``train_step`` (weak view -> pseudo-labels -> strong view -> one
forward pass), ``on_epoch_start`` (every random stream seeded from seed and epoch, so ``--continue`` is the
uninterrupted run), ``on_train_epoch_start`` (the filter, ``pool_filter``), epoch-end logging, and the state a
checkpoint carries (pool, rounds, teacher). The other modes are thin subclasses, so each gets its own nnU-Net results
folder, as nnU-Net's trainer variants do.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnfiltermatch import distributed
from nnfiltermatch.errors import PreparationError
from nnfiltermatch.files import atomic_write_text
from nnfiltermatch.method.pool_filter import FilterRound, decide_round
from nnfiltermatch.method.pseudo_labels import ema_update, every_class_segmented, pseudo_labels_for_scales, ramp_weight
from nnfiltermatch.method.semi_supervised import (
    SemiSupervisedLoss,
    StrongViewOptions,
    as_list,
    epoch_summary,
    joint_batch,
    strong_view,
)
from nnfiltermatch.nnunet.filter_scoring import pool_logits, score_cases
from nnfiltermatch.nnunet.run_trainer import RunTrainer
from nnfiltermatch.nnunet.seeding import epoch_seed, seed_epoch
from nnfiltermatch.nnunet.unlabeled import (
    UnlabeledDataset,
    make_unlabeled_loader,
    pseudo_labelled_ids,
    save_pseudo_label,
    shutdown_loader,
)
from nnfiltermatch.runs import (
    FILTER_DIRNAME,
    PSEUDO_LABEL_DIRNAME,
    load_checkpoint_safely,
)

SSL_LOG_KEYS = ("sup_losses", "unsup_losses", "confident_fraction", "unsup_weight", "pool_size")


def pseudo_label_loss(
    batch_dice: bool, ddp: bool, unsup_loss: str, ignore_index: int, weight_factors: Any | None
) -> nn.Module:
    """nnU-Net's loss for pseudo-labels: voxels marked ``ignore_index`` (not confident) count for nothing; with
    deep supervision (``weight_factors``) over every scale."""
    loss: nn.Module = DC_and_CE_loss(
        {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": ddp},
        {},
        weight_ce=1,
        # Dice on pseudo-labels pushes a class the teacher missed in a patch towards zero everywhere in it: at
        # small compute this erased the smaller Hippocampus class, so the default is cross-entropy only.
        weight_dice=1 if unsup_loss == "dice_ce" else 0,
        ignore_label=ignore_index,
        dice_class=MemoryEfficientSoftDiceLoss,
    )
    return DeepSupervisionWrapper(loss, weight_factors) if weight_factors is not None else loss


class nnFilterMatchTrainer(RunTrainer):  # noqa: N801 (nnU-Net's naming convention for trainers)
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
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.ignore_index = self.label_manager.num_segmentation_heads  # never a real class
        self.filter_rounds: list[FilterRound] = []
        self.teacher: nn.Module | None = None
        self.ssl_start_epoch: int | None = None  # first epoch with pseudo-labels (see start_semi_supervision_if_due)
        self.dataloader_unlabeled: Any = None
        self._epoch_stats: list[dict[str, float]] = []
        self._unlabeled_drawn: list[str] = []  # the unlabelled cases of this epoch's steps (the DDP rank digest)
        self._view_rng = torch.Generator()
        for key in SSL_LOG_KEYS:
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    # ----- set-up -------------------------------------------------------------------------------------------
    @property
    def unlabeled_folder(self) -> Path:
        return Path(self.preprocessed_dataset_folder_base) / "unlabeled" / self.configuration_manager.data_identifier

    def initialize(self) -> None:
        if self.was_initialized:
            return
        super().initialize()
        weight_factors = self.loss.weight_factors if self.enable_deep_supervision else None
        unsupervised = pseudo_label_loss(
            self.configuration_manager.batch_dice, self.is_ddp, self.fm.unsup_loss, self.ignore_index, weight_factors
        )
        self.loss = SemiSupervisedLoss(self.loss, unsupervised)
        if self.fm.pseudo_labels_online and self.fm.teacher == "ema":
            self.teacher = copy.deepcopy(self.plain_network()).requires_grad_(False)

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
        transforms, initial_patch_size = self.training_transforms()
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

    # ----- the semi-supervised step -------------------------------------------------------------------------
    def semi_supervised_now(self) -> bool:
        return self.ssl_start_epoch is not None and self.current_epoch >= self.ssl_start_epoch

    def on_epoch_start(self) -> None:
        super().on_epoch_start()
        seed_epoch(self.fm.seed, self.current_epoch, self.local_rank, self.dataloader_unlabeled, self._view_rng)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._epoch_stats = []
        self._unlabeled_drawn = []
        self.start_semi_supervision_if_due()
        due = self.current_epoch in self.fm.filter_epochs
        if due and not any(r.epoch == self.current_epoch for r in self.filter_rounds):
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
        data = batch["data"].to(self.device, non_blocking=True)
        targets = [t.to(self.device, non_blocking=True) for t in as_list(batch["target"])]
        model = self.pseudo_label_model()
        with torch.no_grad():
            with torch.autocast(self.device.type, enabled=self.device.type == "cuda"):
                weak_logits = as_list(model(weak))
            pseudo, confident = pseudo_labels_for_scales(weak_logits, self.fm.tau, self.ignore_index)
            del weak_logits
            views = StrongViewOptions.of(self.fm)
            strong, pseudo = strong_view(
                weak, pseudo, data, targets, self._view_rng, views, self.current_epoch, self.ignore_index
            )

        assert self.ssl_start_epoch is not None
        weight = ramp_weight(self.current_epoch, self.ssl_start_epoch, self.fm.rampup_epochs or 0, self.fm.lambda_u)
        self.loss.n_labeled, self.loss.weight = data.shape[0], weight
        target = targets if isinstance(batch["target"], (list, tuple)) else targets[0]
        try:
            result = super().train_step(joint_batch(data, target, strong, pseudo))
        finally:
            self.loss.n_labeled = None
        if self.teacher is not None:
            ema_update(self.teacher, self.plain_network(), self.fm.ema_decay)
        self._epoch_stats.append(
            {"sup": self.loss.last["sup"], "unsup": self.loss.last["unsup"], "conf": confident, "w": weight}
        )
        return self.watch_loss(result)

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        for key, value in epoch_summary(self._epoch_stats).items():
            self.logger.log(key, value, self.current_epoch)
        self.logger.log("pool_size", len(self.pool) if self.pool is not None else 0, self.current_epoch)
        value = self.logger.get_value
        self.print_to_log_file(
            f"sup_loss {value('sup_losses', -1):.4f} unsup_loss {value('unsup_losses', -1):.4f} (weight "
            f"{value('unsup_weight', -1):.3f}) confident_fraction {value('confident_fraction', -1):.3f} pool_size "
            f"{value('pool_size', -1)}"
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
            "filter_rounds": [{"epoch": r.epoch, "dropped": r.dropped} for r in self.filter_rounds],
            "student": distributed.state_digest(self.plain_network()),
            "teacher": distributed.state_digest(self.teacher),
            "unlabeled_drawn": sorted(set(self._unlabeled_drawn)),
        }

    # ----- the filter ---------------------------------------------------------------------------------------
    def score_pool(self, case_ids: list[str]) -> dict[str, float]:
        """Entropy score of every case with the pseudo-labelling model."""
        return score_cases(self, self.pseudo_label_model(), case_ids, f"filter round (epoch {self.current_epoch})")

    def run_filter_round(self) -> FilterRound:
        """Score the pool, drop the most confident fraction (``decide_round``), rebuild the unlabelled loader, record
        the round. Under DDP each case is scored by one rank, rank 0's decision is broadcast, and every rank rebuilds
        its loader on the same pool before a barrier.
        """
        assert self.pool is not None
        start = time.time()
        before = list(self.pool)
        mine = distributed.shard(before)
        scores = distributed.gather_scores(self.score_pool(mine) if mine else {})
        fm = self.fm
        settings = {"score": fm.score, "mirroring": fm.filter_mirroring, "tile_step": fm.filter_tile_step}
        record = decide_round(
            before, scores, fm.filter_drop, epoch=self.current_epoch, seconds=time.time() - start, **settings
        )
        if distributed.is_distributed():
            record = dataclasses.replace(record, world_size=distributed.world_size())
            record = distributed.broadcast_from_rank0(record)  # rank 0 decides; every rank follows
        self.pool = record.remaining(before)
        self.filter_rounds.append(record)
        if self.local_rank == 0:
            target = Path(self.output_folder) / FILTER_DIRNAME / f"epoch_{self.current_epoch:04d}.json"
            atomic_write_text(target, json.dumps(record.to_json(), indent=2))
        self.print_to_log_file(
            f"Filter round at epoch {self.current_epoch}: scored {len(before)} cases in {record.seconds:.1f} s, "
            f"dropped {len(record.dropped)} ({', '.join(record.dropped)}), pool now {len(self.pool)}"
        )
        if self.dataloader_unlabeled is not None:
            shutdown_loader(self.dataloader_unlabeled)
            self.dataloader_unlabeled = self._build_unlabeled_loader()
        distributed.barrier()
        return record

    # ----- checkpoints --------------------------------------------------------------------------------------
    def state_for_checkpoint(self) -> dict[str, Any]:
        return {
            **super().state_for_checkpoint(),
            "pool": list(self.pool) if self.pool is not None else None,
            "filter_rounds": [r.to_json() for r in self.filter_rounds],
            "teacher": self.teacher.state_dict() if self.teacher is not None else None,
            "ssl_start_epoch": self.ssl_start_epoch,
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        self.pool = self._pool_still_unlabeled(state["pool"])
        self.filter_rounds = [FilterRound.from_json(r) for r in state["filter_rounds"]]
        self.ssl_start_epoch = state.get("ssl_start_epoch")
        if self.teacher is not None and state["teacher"] is not None:
            self.teacher.load_state_dict(state["teacher"])
        for key in SSL_LOG_KEYS:
            self.logger.local_logger.my_fantastic_logging.setdefault(key, [])

    def live_weight_sets(self) -> dict[str, dict[str, torch.Tensor]]:
        sets = super().live_weight_sets()
        if self.teacher is not None:
            sets["teacher"] = self.teacher.state_dict()
        return sets

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
        for case_id, logits in pool_logits(self, model, case_ids, "pseudo-labelling the unlabelled pool"):
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
        joint = joint_batch(batch["data"], batch["target"], pseudo["data"], pseudo["target"])
        assert isinstance(self.loss, SemiSupervisedLoss)
        self.loss.n_labeled = None  # nnU-Net's loss on every row: pseudo-labels count as labels
        result = nnUNetTrainer.train_step(self, joint)
        self._epoch_stats.append({"sup": self.loss.last["sup"], "unsup": 0.0, "conf": float("nan"), "w": 1.0})
        return self.watch_loss(result)
