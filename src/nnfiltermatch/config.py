"""Training configuration: one dataclass, the paper preset, and the defaults that scale with the schedule.

Each training option is declared once, as a field of ``TrainConfig`` made with :func:`option`: its default, and in
the field's metadata its help text, choices and command-line section. The ``train`` command's options, the list of
option names and the defaults its help quotes are generated from the fields, so adding an option is one field plus
its use.

nnU-Net's trainer constructor takes exactly five arguments, so the resolved configuration travels to the trainer
inside the plans dict under ``PLANS_KEY`` (nnU-Net itself passes ``continue_training`` the same way) and is popped
there before nnU-Net sees the plans.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nnfiltermatch.files import atomic_write_text
from nnfiltermatch.method.uncertainty import filter_schedule

Mode = Literal["supervised", "ssl", "filtermatch", "selftrain"]
MODES: tuple[str, ...] = ("supervised", "ssl", "filtermatch", "selftrain")
SCORES: tuple[str, ...] = ("mean", "sum", "topk")
UNSUP_LOSSES: tuple[str, ...] = ("ce", "dice_ce")
TEACHERS: tuple[str, ...] = ("student", "ema")
PRESETS: tuple[str, ...] = ("default", "paper")
PLANS_KEY = "nnfiltermatch_config"
CONFIG_FILENAME = "nnfiltermatch_config.json"

# the sections of ``train --help``; an option without one is listed with the command's own options
SCHEDULE = "schedule and optimiser"
SEMI_SUPERVISED = "semi-supervised step"
FILTER = "the filter (mode filtermatch)"

_OPTION_KEY = "nnfiltermatch_option"


@dataclass(frozen=True)
class OptionSpec:
    """How a ``TrainConfig`` field is offered as an option: what a user reads about it and where."""

    help: str = ""
    flags: tuple[str, ...] = ()  # empty: the field name, dashed (a boolean that defaults to True: --no-<name>)
    choices: tuple[str, ...] | None = None
    section: str | None = None
    # what the help quotes as the default when the field's own default says nothing (None: derived at run time)
    default_text: str | None = None
    # the option selects the defaults of the others (mode, preset), so it always has a value and is never "given"
    always_given: bool = False


def option(
    default: Any,
    *,
    help: str = "",
    flags: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    section: str | None = None,
    default_text: str | None = None,
    always_given: bool = False,
) -> Any:
    """A ``TrainConfig`` field that is a training option. ``help`` says what the flag does (for a boolean that
    defaults to True: what ``--no-<name>`` does); the help's "(default: X)" is added from ``default`` or
    ``default_text``."""
    spec = OptionSpec(help, flags, choices, section, default_text, always_given)
    return field(default=default, metadata={_OPTION_KEY: spec})


@dataclass
class TrainConfig:
    """Everything that decides a training run; written next to the results as ``nnfiltermatch_config.json``."""

    mode: str = option(
        "filtermatch",
        help="filtermatch: pseudo-labels + the entropy filter; ssl: pseudo-labels only; supervised: labelled cases "
        "only; selftrain: offline self-training (the supervised run, reused if finished with the same options, then "
        "training on labelled + its pseudo-labels at the compute of one ssl run)",
        choices=MODES,
        always_given=True,
    )
    preset: str = option(
        "default",
        help="paper: the reference schedule (300x250, tau 0, sum score, filter at 100 and 200)",
        choices=PRESETS,
        default_text="default, whose values this help shows",
        always_given=True,
    )
    seed: int = option(0)
    # augmentation in the training process and deterministic cuDNN: the seed then repeats a run bit for bit on CPU,
    # and a run killed and resumed with --continue equals the uninterrupted one (every stream is seeded per epoch)
    deterministic: bool = option(
        False,
        help="repeatable runs: augmentation in the training process (nnUNet_n_proc_DA=0, the CPU default) and "
        "deterministic cuDNN; the same seed then gives the same model on CPU, and an ssl run whose pseudo-labels "
        "never start gives its supervised twin's",
    )
    # schedule and optimiser (None: nnU-Net's own value, or the plan's for the batch size)
    epochs: int = option(100, section=SCHEDULE)
    iters_per_epoch: int = option(250, section=SCHEDULE)
    val_iters_per_epoch: int = option(50, section=SCHEDULE)
    lr: float = option(1e-2, section=SCHEDULE)
    weight_decay: float = option(3e-5, section=SCHEDULE)
    batch_size: int | None = option(
        None, help="labelled batch size", section=SCHEDULE, default_text="the plan's batch size"
    )
    save_every: int = option(50, help="write checkpoint_latest.pth every N epochs", section=SCHEDULE)
    # semi-supervised step
    unlabeled_ratio: float = option(1.0, help="unlabelled : labelled batch size", section=SEMI_SUPERVISED)
    warmup_epochs: int | None = option(
        None, help="supervised-only epochs first", section=SEMI_SUPERVISED, default_text="10% of epochs"
    )
    # the unlabelled term starts only once the validation pseudo-Dice of every class reached this (0: at warm-up end)
    ssl_start_dice: float = option(
        0.5,
        help="after warm-up, wait until nnU-Net's validation pseudo-Dice of every class reaches this before pseudo-"
        "labels are used (0 starts right after warm-up)",
        section=SEMI_SUPERVISED,
    )
    teacher: str = option(
        "ema", help="pseudo-labels from the student or its EMA", choices=TEACHERS, section=SEMI_SUPERVISED
    )
    ema_decay: float = option(0.99, section=SEMI_SUPERVISED)
    tau: float = option(0.9, help="confidence threshold; 0 reproduces the paper", section=SEMI_SUPERVISED)
    lambda_u: float = option(1.0, help="unlabelled loss weight", section=SEMI_SUPERVISED)
    unsup_loss: str = option(
        "ce",
        help="loss on pseudo-labels: ce or dice_ce (nnU-Net's Dice+CE, the paper's)",
        choices=UNSUP_LOSSES,
        section=SEMI_SUPERVISED,
    )
    rampup_epochs: int | None = option(
        None, help="linear ramp of lambda-u after warm-up", section=SEMI_SUPERVISED, default_text="20% of epochs"
    )
    flip_from_epoch: int = option(
        0, help="add random in-plane flips to the strong view from this epoch", section=SEMI_SUPERVISED
    )
    strong_intensity: bool = option(True, help="strong view without noise/contrast/gamma/blur", section=SEMI_SUPERVISED)
    intensity_p: float = option(0.5, section=SEMI_SUPERVISED)
    cutout_p: float = option(0.0, section=SEMI_SUPERVISED)
    cutmix_p: float = option(0.0, section=SEMI_SUPERVISED)
    # a labelled box (2/3 of the patch side, true labels) pasted into each strong view (BCP, Bai et al. 2023)
    copy_paste_p: float = option(
        0.0,
        help="probability per step of pasting a labelled box with its labels into the strong views (BCP)",
        section=SEMI_SUPERVISED,
    )
    # the filter
    filter_start: int | None = option(None, help="first filter epoch", section=FILTER, default_text="epochs/3")
    filter_every: int | None = option(
        None, help="epochs between filter rounds", section=FILTER, default_text="ceil(epochs/3)"
    )
    filter_drop: float = option(0.15, help="fraction of the pool dropped per round", section=FILTER)
    score: str = option("mean", help="per-case reduction of voxel entropy", choices=SCORES, section=FILTER)
    topk_fraction: float = option(0.1, section=FILTER)
    filter_mirroring: bool = option(False, help="mirror when scoring (8x slower)", section=FILTER)
    filter_tile_step: float = option(
        1.0, help="sliding-window step (fraction of the patch) when scoring; 1.0 = no overlap", section=FILTER
    )
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
        """Reject impossible values before any long work starts, each problem named by its field."""
        problems: list[tuple[str, str]] = []

        def require(name: str, ok: bool, message: str) -> None:
            if not ok:
                problems.append((name, f"{message}, got {getattr(self, name)}"))

        for name, spec in training_options():
            value = getattr(self, name)
            if spec.choices is not None and value not in spec.choices:
                problems.append((name, f"{value!r}: choose one of {', '.join(spec.choices)}"))
        # the per-epoch seeds are derived by NumPy's SeedSequence, which takes no negatives
        require("seed", self.seed >= 0, "must be >= 0")
        require("epochs", self.epochs >= 1, "must be >= 1")
        require("iters_per_epoch", self.iters_per_epoch >= 1, "must be >= 1")
        require("val_iters_per_epoch", self.val_iters_per_epoch >= 0, "must be >= 0")
        require("tau", 0.0 <= self.tau < 1.0, "must be in [0, 1)")
        require("ssl_start_dice", 0.0 <= self.ssl_start_dice <= 1.0, "must be in [0, 1]")
        require("filter_drop", 0.0 <= self.filter_drop < 1.0, "must be in [0, 1)")
        require("ema_decay", 0.0 < self.ema_decay < 1.0, "must be in (0, 1)")
        require("lambda_u", self.lambda_u >= 0, "must be >= 0")
        require("unlabeled_ratio", self.unlabeled_ratio > 0, "must be > 0")
        require("lr", self.lr > 0, "must be > 0")
        require("batch_size", self.batch_size is None or self.batch_size >= 1, "must be >= 1")
        require("filter_tile_step", 0.0 < self.filter_tile_step <= 1.0, "must be in (0, 1]")
        require("topk_fraction", 0.0 < self.topk_fraction <= 1.0, "must be in (0, 1]")
        for name in ("intensity_p", "cutout_p", "cutmix_p", "copy_paste_p"):
            require(name, 0.0 <= getattr(self, name) <= 1.0, "is a probability in [0, 1]")
        for name in ("warmup_epochs", "rampup_epochs"):
            require(name, getattr(self, name) is None or getattr(self, name) >= 0, "must be >= 0")
        # the filter scores a trained model: its first round runs at the start of epoch 1 at the earliest
        for name in ("filter_start", "filter_every"):
            require(name, getattr(self, name) is None or getattr(self, name) >= 1, "must be >= 1")
        if problems:
            raise ConfigError(problems)
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
    """Apply preset values, then the user's explicit options (None means 'not given'), then derived defaults.

    An unknown preset is refused by :meth:`TrainConfig.validate`, with the other impossible values."""
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


def training_options() -> list[tuple[str, OptionSpec]]:
    """The fields of ``TrainConfig`` that are training options, in declaration order, with their specification."""
    return [(f.name, f.metadata[_OPTION_KEY]) for f in dataclasses.fields(TrainConfig) if _OPTION_KEY in f.metadata]


def option_flags(name: str) -> tuple[str, ...]:
    """The command-line flags of option ``name``: its declared ones, else the name dashed (``--no-<name>`` for a
    boolean that defaults to True, since the flag turns it off)."""
    found = {f.name: f for f in dataclasses.fields(TrainConfig)}.get(name)
    spec = found.metadata.get(_OPTION_KEY) if found is not None else None
    if spec is not None and spec.flags:
        return spec.flags
    negated = found is not None and found.default is True
    return (f"--{'no-' if negated else ''}{name.replace('_', '-')}",)


def option_flag(name: str) -> str:
    """The flag that names option ``name`` in messages: its first."""
    return option_flags(name)[0]


# the options a user may give, None meaning "not given" (mode and preset always have a value)
TRAIN_OPTION_NAMES: tuple[str, ...] = tuple(name for name, spec in training_options() if not spec.always_given)


class ConfigError(ValueError):
    """Impossible training options: ``problems`` holds (field name, message) pairs, so the configuration names the
    option without knowing how it was given; the text renders each field as its command-line flag."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__(self.render())

    def __reduce__(self) -> tuple[type[ConfigError], tuple[tuple[tuple[str, str], ...]]]:
        return type(self), (self.problems,)  # rebuilt from its problems, not from the rendered text

    def render(self, name_of: Callable[[str], str] = option_flag) -> str:
        return "invalid training options:\n  " + "\n  ".join(f"{name_of(n)} {m}" for n, m in self.problems)
