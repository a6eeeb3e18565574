"""The commands that train: train (and train --val), demo."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

from nnfiltermatch.cli.common import add_device, round_number
from nnfiltermatch.config import (
    MODES,
    TRAIN_OPTION_NAMES,
    OptionSpec,
    TrainConfig,
    option_flag,
    option_flags,
    training_options,
)
from nnfiltermatch.nnunet.trained_model import default_device


def _shown(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _option_help(spec: OptionSpec, default: Any) -> str | None:
    """The option's help with the default it takes (a flag's default, off, goes without saying)."""
    if isinstance(default, bool):
        text = spec.help
    else:
        shown = spec.default_text if spec.default_text is not None else _shown(default)
        text = f"{spec.help} (default: {shown})" if spec.help else f"default: {shown}"
    return text.replace("%", "%%") or None  # argparse formats help with %


def add_training_options(parser: argparse.ArgumentParser, *, sectioned: bool) -> None:
    """``TrainConfig``'s options as arguments, generated from its fields: those without a section on ``parser``
    (``sectioned`` False), or the others, each in its section's argument group (``sectioned`` True).

    An option left out parses as None ("not given"), so the preset's or the schedule's default applies and
    ``--continue`` keeps the stored value; mode and preset always have one, as they select the others' defaults.
    """
    hints = typing.get_type_hints(TrainConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, spec in training_options():
        if (spec.section is not None) != sectioned:
            continue
        if spec.section is not None and spec.section not in groups:
            groups[spec.section] = parser.add_argument_group(spec.section)
        target = parser if spec.section is None else groups[spec.section]
        default = defaults[name]
        arguments: dict[str, Any] = {"dest": name, "help": _option_help(spec, default)}
        kind = next((t for t in typing.get_args(hints[name]) if t is not type(None)), hints[name])
        if kind is bool:
            arguments.update(action="store_false" if default else "store_true", default=None)
        else:
            arguments.update(type=kind, choices=spec.choices, default=default if spec.always_given else None)
        target.add_argument(*option_flags(name), **arguments)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=f"train one fold in mode {', '.join(MODES)}")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", required=True, help="e.g. 3d_fullres, 2d, 3d_fullres_cpu")
    p.add_argument("-f", "--fold", required=True, help="0-4 or all")
    p.add_argument("-p", "--plans", default=None, help="plans name (default: the plans the dataset was prepared with)")
    add_training_options(p, sectioned=False)
    add_device(p)
    p.add_argument(
        "--continue", "--c", dest="continue_training", action="store_true", help="resume from the last checkpoint"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a finished or interrupted run")
    v = p.add_argument_group("nnU-Net's final validation (fold_X/validation/: segmentations and summary.json)")
    v.add_argument("--no-final-validation", action="store_true", help="skip nnU-Net's validation after training")
    v.add_argument(
        "--npz",
        "--save-probabilities",
        "--save_probabilities",
        dest="save_probabilities",
        action="store_true",
        help="the final validation also writes each case's softmax as .npz + .pkl, as nnUNetv2_train --npz does: "
        "what nnUNetv2_find_best_configuration and nnUNetv2_ensemble read",
    )
    v.add_argument(
        "--val",
        dest="validation_only",
        action="store_true",
        help="train nothing: only run the final validation of the trained fold from checkpoint_final.pth, with "
        "the configuration stored beside it (nnUNetv2_train --val), e.g. with --npz for a model trained without it",
    )
    v.add_argument(
        "--val_best",
        "--val-best",
        dest="val_best",
        action="store_true",
        help="validate with checkpoint_best.pth instead of checkpoint_final.pth (after training, or with --val); it "
        "writes the same validation/ folder, as nnU-Net's does",
    )
    p.add_argument(
        "--round",
        dest="round_number",
        type=round_number,
        metavar="K",
        help="annotation round K (after `prepare --add-labels` recorded it): train into "
        "<Trainer>_roundK__<Plans>__<configuration>, so each round keeps its model, and record the model in "
        "rounds.json; refused when the labelled set is not round K's. Round 0 is the plain folder, as without it",
    )
    d = p.add_argument_group("multi-process training (DDP)")
    d.add_argument(
        "--num-gpus",
        "--num-processes",
        "-num_gpus",
        dest="num_processes",
        type=int,
        default=1,
        help="DDP processes on this machine: one per GPU with --device cuda, CPU processes with --device cpu "
        "(default 1). The batch size is the global one, split over the processes. Under torchrun leave it out.",
    )
    d.add_argument(
        "--backend", choices=("gloo", "nccl"), help="process-group backend (default: nccl on cuda, gloo on cpu)"
    )
    add_training_options(p, sectioned=True)


def _rounds_or_none(dataset_name: str) -> dict[str, Any] | None:
    """rounds.json for a note after training; an unreadable one must not turn a finished training into an error."""
    from nnfiltermatch.data.rounds import load_rounds

    try:
        return load_rounds(dataset_name)
    except ValueError:
        return None


def cmd_train(args: argparse.Namespace) -> int:
    from nnfiltermatch.commands.training import train
    from nnfiltermatch.config import resolve_config
    from nnfiltermatch.data.layout import dataset_name_from_id
    from nnfiltermatch.data.manifest import load_prepared
    from nnfiltermatch.data.rounds import rounds_path
    from nnfiltermatch.runs import parse_fold

    _check_validation_options(args)  # before the dataset is looked up: a wrong combination is wrong anywhere
    dataset_name = dataset_name_from_id(args.dataset)
    if args.validation_only:
        return _validate_only(args, dataset_name)
    overrides = {name: getattr(args, name) for name in TRAIN_OPTION_NAMES}
    overrides["mode"] = args.mode
    overrides["labeled_fraction"] = load_prepared(dataset_name).labeled_fraction
    config = resolve_config(overrides, preset=args.preset)
    result = train(
        dataset_name,
        args.configuration,
        parse_fold(args.fold),
        config,
        args.device or default_device(),
        continue_training=args.continue_training,
        overwrite=args.overwrite,
        final_validation=not args.no_final_validation,
        explicit_options={name for name in TRAIN_OPTION_NAMES if getattr(args, name) is not None},
        num_processes=args.num_processes,
        backend=args.backend,
        round_number=args.round_number,
        plans_name=args.plans,
        save_probabilities=args.save_probabilities,
        validation_checkpoint="best" if args.val_best else "final",
    )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(f"Model written to {result.output_folder}")
        if not args.no_final_validation:
            print(_validation_note(result.output_folder / "validation", args.save_probabilities))
        if args.round_number is not None:
            print(f"Recorded as round {args.round_number}'s model in {rounds_path(dataset_name)}")
        elif (rounds := _rounds_or_none(dataset_name)) and len(rounds["rounds"]) > 1:
            last = max(int(r["round"]) for r in rounds["rounds"])
            print(
                f"Note: {rounds_path(dataset_name)} records annotation rounds up to {last}; with --round {last} "
                "each round keeps its own model folder and the report shows the rounds"
            )
    return 0


def _check_validation_options(args: argparse.Namespace) -> None:
    """Combinations of the validation flags that cannot mean anything, refused before any work."""
    from nnfiltermatch.errors import PreparationError

    if args.no_final_validation:
        given = [f for f, on in (("--val", args.validation_only), ("--npz", args.save_probabilities)) if on]
        if args.val_best:
            given.append("--val_best")
        if given:
            raise PreparationError(f"--no-final-validation skips the validation that {', '.join(given)} asks for")
    if not args.validation_only:
        return
    training = [option_flag(name) for name in TRAIN_OPTION_NAMES if getattr(args, name) is not None]
    training += [
        flag
        for flag, on in (
            ("--continue", args.continue_training),
            ("--overwrite", args.overwrite),
            (f"--preset {args.preset}", args.preset != "default"),
            (f"--num-gpus {args.num_processes}", args.num_processes != 1),
            (f"--backend {args.backend}", args.backend is not None),
        )
        if on
    ]
    if training:
        raise PreparationError(
            f"--val only validates the trained model, with the configuration stored in its folder; leave out "
            f"{', '.join(training)} (they change a training, and --val trains nothing)"
        )


def _validation_note(folder: Path, save_probabilities: bool) -> str:
    """One line on what the final validation wrote: its mean foreground Dice, and the softmax files if any."""
    import json

    summary = folder / "summary.json"
    try:
        dice = float(json.loads(summary.read_text())["foreground_mean"]["Dice"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"Final validation: no {summary}"
    cases = len(list(folder.glob("*.npz")))
    softmax = f"; softmax of {cases} case(s) as .npz + .pkl" if save_probabilities else ""
    return f"Final validation in {folder}: mean foreground Dice {dice:.4f} (nnU-Net's summary.json){softmax}"


def _validate_only(args: argparse.Namespace, dataset_name: str) -> int:
    """``train --val``: nnU-Net's final validation of a trained fold, nothing trained."""
    from nnfiltermatch.commands.final_validation import validate_trained
    from nnfiltermatch.runs import parse_fold

    folder = validate_trained(
        dataset_name,
        args.configuration,
        parse_fold(args.fold),
        args.mode,
        args.device or default_device(),
        save_probabilities=args.save_probabilities,
        checkpoint="best" if args.val_best else "final",
        round_number=args.round_number,
        plans_name=args.plans,
    )
    print(_validation_note(folder, args.save_probabilities))
    return 0


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole job on the shipped Hippocampus subset: supervised vs filtermatch")
    p.add_argument(
        "--out", type=Path, default=Path("nnfiltermatch_demo"), help="working folder (default ./nnfiltermatch_demo)"
    )
    p.add_argument(
        "--quick", action="store_true", help="a short schedule for a first look (about 3 minutes on 2 cores)"
    )
    add_device(p)
    p.add_argument("--seed", type=int, default=0)


def cmd_demo(args: argparse.Namespace) -> int:
    from nnfiltermatch.commands.demo import run_demo

    results = run_demo(args.out, quick=args.quick, device=args.device or default_device(), seed=args.seed)
    print(f"Wrote {args.out / 'results.md'} and {args.out / 'results.json'} ({results['total_seconds']:.0f} s)")
    return 0
