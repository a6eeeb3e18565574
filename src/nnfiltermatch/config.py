"""Training configuration: one dataclass, the paper preset, and the defaults that scale with the schedule.

nnU-Net's trainer constructor takes exactly five arguments, so the resolved configuration travels to the trainer
inside the plans dict under ``PLANS_KEY`` (nnU-Net itself passes ``continue_training`` the same way) and is popped
there before nnU-Net sees the plans.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nnfiltermatch.files import atomic_write_text
from nnfiltermatch.uncertainty import filter_schedule

Mode = Literal["supervised", "ssl", "filtermatch", "selftrain"]
MODES: tuple[str, ...] = ("supervised", "ssl", "filtermatch", "selftrain")
SCORES: tuple[str, ...] = ("mean", "sum", "topk")
UNSUP_LOSSES: tuple[str, ...] = ("ce", "dice_ce")
TEACHERS: tuple[str, ...] = ("student", "ema")
PRESETS: tuple[str, ...] = ("default", "paper")
PLANS_KEY = "nnfiltermatch_config"
CONFIG_FILENAME = "nnfiltermatch_config.json"


@dataclass
class TrainConfig:
    """Everything that decides a training run; written next to the results as ``nnfiltermatch_config.json``."""

    mode: str = "filtermatch"
    preset: str = "default"
    seed: int = 0
    # augmentation in the training process and deterministic cuDNN: the seed then repeats a run bit for bit on CPU,
    # and a run killed and resumed with --continue equals the uninterrupted one (every stream is seeded per epoch)
    deterministic: bool = False
    # schedule and optimiser (None: nnU-Net's own value, or the plan's for the batch size)
    epochs: int = 100
    iters_per_epoch: int = 250
    val_iters_per_epoch: int = 50
    lr: float = 1e-2
    weight_decay: float = 3e-5
    batch_size: int | None = None
    save_every: int = 50
    # semi-supervised step
    unlabeled_ratio: float = 1.0
    warmup_epochs: int | None = None
    # the unlabelled term starts only once the validation pseudo-Dice of every class reached this (0: at warm-up end)
    ssl_start_dice: float = 0.5
    teacher: str = "ema"
    ema_decay: float = 0.99
    tau: float = 0.9
    lambda_u: float = 1.0
    unsup_loss: str = "ce"
    rampup_epochs: int | None = None
    flip_from_epoch: int = 0
    strong_intensity: bool = True
    intensity_p: float = 0.5
    cutout_p: float = 0.0
    cutmix_p: float = 0.0
    # a labelled box (2/3 of the patch side, true labels) pasted into each strong view (BCP, Bai et al. 2023)
    copy_paste_p: float = 0.0
    # the filter
    filter_start: int | None = None
    filter_every: int | None = None
    filter_drop: float = 0.15
    score: str = "mean"
    topk_fraction: float = 0.1
    filter_mirroring: bool = False
    filter_tile_step: float = 1.0
    # bookkeeping filled in by the CLI
    labeled_fraction: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_unlabeled(self) -> bool:
        return self.mode in ("ssl", "filtermatch", "selftrain")

    @property
    def pseudo_labels_online(self) -> bool:
        """Pseudo-labels made during training by the model being trained (or its EMA); selftrain's are made once."""
        return self.mode in ("ssl", "filtermatch")

    @property
    def filter_epochs(self) -> list[int]:
        if self.mode != "filtermatch":
            return []
        return filter_schedule(self.epochs, self.filter_start, self.filter_every)

    def validate(self) -> None:
        """Reject impossible values before any long work starts, naming the option."""
        problems: list[str] = []
        if self.mode not in MODES:
            problems.append(f"--mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.teacher not in TEACHERS:
            problems.append(f"--teacher {self.teacher!r}: choose one of {', '.join(TEACHERS)}")
        if self.score not in SCORES:
            problems.append(f"--score {self.score!r}: choose one of {', '.join(SCORES)}")
        if self.unsup_loss not in UNSUP_LOSSES:
            problems.append(f"--unsup-loss {self.unsup_loss!r}: choose one of {', '.join(UNSUP_LOSSES)}")
        if self.seed < 0:  # the per-epoch seeds are derived by NumPy's SeedSequence, which takes no negatives
            problems.append(f"--seed must be >= 0, got {self.seed}")
        for name in ("epochs", "iters_per_epoch"):
            if getattr(self, name) < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.val_iters_per_epoch < 0:
            problems.append(f"--val-iters-per-epoch must be >= 0, got {self.val_iters_per_epoch}")
        if not 0.0 <= self.tau < 1.0:
            problems.append(f"--tau must be in [0, 1), got {self.tau}")
        if not 0.0 <= self.ssl_start_dice <= 1.0:
            problems.append(f"--ssl-start-dice must be in [0, 1], got {self.ssl_start_dice}")
        if not 0.0 <= self.filter_drop < 1.0:
            problems.append(f"--filter-drop must be in [0, 1), got {self.filter_drop}")
        if not 0.0 < self.ema_decay < 1.0:
            problems.append(f"--ema-decay must be in (0, 1), got {self.ema_decay}")
        if self.lambda_u < 0:
            problems.append(f"--lambda-u must be >= 0, got {self.lambda_u}")
        if self.unlabeled_ratio <= 0:
            problems.append(f"--unlabeled-ratio must be > 0, got {self.unlabeled_ratio}")
        if self.lr <= 0:
            problems.append(f"--lr must be > 0, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.filter_tile_step <= 1.0:
            problems.append(f"--filter-tile-step must be in (0, 1], got {self.filter_tile_step}")
        if not 0.0 < self.topk_fraction <= 1.0:
            problems.append(f"--topk-fraction must be in (0, 1], got {self.topk_fraction}")
        for name in ("intensity_p", "cutout_p", "cutmix_p", "copy_paste_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"--{name.replace('_', '-')} is a probability in [0, 1], got {getattr(self, name)}")
        for name in ("warmup_epochs", "rampup_epochs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                problems.append(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        # the filter scores a trained model: its first round runs at the start of epoch 1 at the earliest
        for name in ("filter_start", "filter_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if problems:
            raise ValueError("invalid training options:\n  " + "\n  ".join(problems))
        if self.mode == "filtermatch":
            filter_schedule(self.epochs, self.filter_start, self.filter_every)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["filter_epochs"] = self.filter_epochs
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def write(self, path: Path) -> None:
        """Atomic JSON write, so a crash never leaves a half-written configuration."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True))


def paper_values(labeled_fraction: float | None) -> dict[str, Any]:
    """The reference's schedule from method.md; lr, weight decay and warm-up depend on the label budget."""
    five_percent = labeled_fraction is not None and labeled_fraction <= 0.075
    return {
        "epochs": 300,
        "iters_per_epoch": 250,
        "lr": 5e-3 if five_percent else 1e-2,
        "weight_decay": 3e-3 if five_percent else 3e-5,
        "warmup_epochs": 5 if five_percent else 20,
        "ssl_start_dice": 0.0,
        "tau": 0.0,
        "teacher": "student",
        "lambda_u": 1.0,
        "unsup_loss": "dice_ce",
        "rampup_epochs": 0,
        "score": "sum",
        "filter_start": 100,
        "filter_every": 100,
        "filter_drop": 0.15,
        "flip_from_epoch": 100,
        "strong_intensity": False,
        "cutout_p": 0.0,
        "cutmix_p": 0.0,
        "copy_paste_p": 0.0,
        "filter_mirroring": True,
        "filter_tile_step": 0.5,
    }


def resolve_config(overrides: dict[str, Any], preset: str = "default") -> TrainConfig:
    """Apply preset values, then the user's explicit options (None means 'not given'), then derived defaults."""
    if preset not in PRESETS:
        raise ValueError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    values: dict[str, Any] = {}
    if preset == "paper":
        values.update(paper_values(given.get("labeled_fraction")))
    values.update(given)
    values["preset"] = preset
    config = TrainConfig.from_dict(values)
    # Defaults that scale with the schedule, so short runs still warm up, ramp and filter.
    if config.warmup_epochs is None:
        config.warmup_epochs = max(1, round(0.1 * config.epochs)) if config.epochs > 1 else 0
    if config.rampup_epochs is None:
        config.rampup_epochs = max(0, round(0.2 * config.epochs))
    config.validate()
    return config
