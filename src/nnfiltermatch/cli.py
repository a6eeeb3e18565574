"""The ``nnfiltermatch`` command: prepare, train, predict, evaluate, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnfiltermatch import __version__
from nnfiltermatch.config import MODES, PRESETS, SCORES, TEACHERS


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="validate, plan (labelled cases only) and preprocess labelled + unlabelled data")
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or DatasetXXX_Name under $nnUNet_raw")
    p.add_argument(
        "-c",
        "--configurations",
        nargs="+",
        default=["3d_fullres"],
        help="plan configurations to preprocess (default 3d_fullres; 3d_fullres_cpu / 2d_cpu are small "
        "CPU-sized variants that reuse the same data)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--labeled-list", type=Path, help="text file of imagesTr case IDs that count as labelled")
    budget.add_argument("--labeled-fraction", type=float, help="simulate a label budget: sample this fraction")
    p.add_argument("--seed", type=int, default=0, help="seed for --labeled-fraction (default 0)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans name (default nnUNetPlans)")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="preprocessing processes (default 2)")
    p.add_argument(
        "--allow-no-unlabeled",
        action="store_true",
        help="accept a dataset without unlabelled images (only --mode supervised can train on it)",
    )


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train one fold in mode supervised, ssl or filtermatch")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", required=True, help="e.g. 3d_fullres, 2d, 3d_fullres_cpu")
    p.add_argument("-f", "--fold", required=True, help="0-4 or all")
    p.add_argument("--mode", choices=MODES, default="filtermatch")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="default",
        help="paper: the reference schedule (300x250, tau 0, sum score, filter at 100 and 200)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--seed", type=int)
    p.add_argument("--continue", dest="continue_training", action="store_true", help="resume from the last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or interrupted run")
    p.add_argument("--no-final-validation", action="store_true", help="skip nnU-Net's validation after training")
    g = p.add_argument_group("schedule and optimiser")
    g.add_argument("--epochs", type=int)
    g.add_argument("--iters-per-epoch", type=int)
    g.add_argument("--val-iters-per-epoch", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--batch-size", type=int, help="labelled batch size (default: the plan's)")
    g.add_argument("--save-every", type=int, help="write checkpoint_latest.pth every N epochs (default 50)")
    s = p.add_argument_group("semi-supervised step")
    s.add_argument("--unlabeled-ratio", type=float, help="unlabelled : labelled batch size (default 1)")
    s.add_argument("--warmup-epochs", type=int, help="supervised-only epochs first (default 10%% of --epochs)")
    s.add_argument("--teacher", choices=TEACHERS, help="pseudo-labels from the student or its EMA (default ema)")
    s.add_argument("--ema-decay", type=float)
    s.add_argument("--tau", type=float, help="confidence threshold; 0 reproduces the paper (default 0.9)")
    s.add_argument("--lambda-u", type=float, help="unlabelled loss weight (default 1)")
    s.add_argument("--rampup-epochs", type=int, help="linear ramp of lambda-u after warm-up (default 20%% of epochs)")
    s.add_argument("--flip-from-epoch", type=int, help="add random in-plane flips to the strong view from this epoch")
    s.add_argument(
        "--no-strong-intensity",
        dest="strong_intensity",
        action="store_false",
        default=None,
        help="strong view without noise/contrast/gamma/blur",
    )
    s.add_argument("--intensity-p", type=float)
    s.add_argument("--cutout-p", type=float)
    s.add_argument("--cutmix-p", type=float)
    f = p.add_argument_group("the filter (mode filtermatch)")
    f.add_argument("--filter-start", type=int, help="first filter epoch (default epochs/3)")
    f.add_argument("--filter-every", type=int, help="epochs between filter rounds (default epochs/3)")
    f.add_argument("--filter-drop", type=float, help="fraction of the pool dropped per round (default 0.15)")
    f.add_argument("--score", choices=SCORES, help="per-case reduction of voxel entropy (default mean)")
    f.add_argument("--topk-fraction", type=float)
    f.add_argument("--filter-mirroring", action="store_true", default=None, help="mirror when scoring (8x slower)")
    f.add_argument("--filter-tile-step", type=float, help="sliding-window step when scoring (default 0.5)")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice, Jaccard, HD95, ASD, ASSD per case and class")
    p.add_argument("-r", "--ref", required=True, type=Path, help="folder of reference label maps")
    p.add_argument("-p", "--pred", required=True, type=Path, help="folder of predicted label maps")
    p.add_argument("-o", "--output", type=Path, help="summary JSON (a CSV is written beside it)")
    p.add_argument("--labels", type=int, nargs="+", help="labels to evaluate (default: all in the references)")
    p.add_argument("--units", choices=("voxel", "mm"), default="voxel")
    p.add_argument("--allow-missing", action="store_true", help="report missing predictions instead of failing")
    p.add_argument("--file-ending", default=".nii.gz")


TRAIN_OPTION_NAMES = (
    "seed",
    "epochs",
    "iters_per_epoch",
    "val_iters_per_epoch",
    "lr",
    "weight_decay",
    "batch_size",
    "save_every",
    "unlabeled_ratio",
    "warmup_epochs",
    "teacher",
    "ema_decay",
    "tau",
    "lambda_u",
    "rampup_epochs",
    "flip_from_epoch",
    "strong_intensity",
    "intensity_p",
    "cutout_p",
    "cutmix_p",
    "filter_start",
    "filter_every",
    "filter_drop",
    "score",
    "topk_fraction",
    "filter_mirroring",
    "filter_tile_step",
)


def cmd_prepare(args: argparse.Namespace) -> int:
    from nnfiltermatch.preparation import prepare

    prepared = prepare(
        args.dataset,
        args.configurations,
        labeled_list=args.labeled_list,
        labeled_fraction=args.labeled_fraction,
        seed=args.seed,
        plans_name=args.plans,
        num_processes=args.num_processes,
        allow_no_unlabeled=args.allow_no_unlabeled,
    )
    print(
        f"{prepared.dataset_name}: {len(prepared.labeled_ids)} labelled, {len(prepared.unlabeled_ids)} unlabelled "
        f"cases; preprocessed configurations: {', '.join(prepared.configurations)}"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from nnfiltermatch.config import resolve_config
    from nnfiltermatch.preparation import dataset_name_from_id, load_prepared
    from nnfiltermatch.training import parse_fold, train

    dataset_name = dataset_name_from_id(args.dataset)
    overrides = {name: getattr(args, name) for name in TRAIN_OPTION_NAMES}
    overrides["mode"] = args.mode
    overrides["labeled_fraction"] = load_prepared(dataset_name).labeled_fraction
    config = resolve_config(overrides, preset=args.preset)
    result = train(
        dataset_name,
        args.configuration,
        parse_fold(args.fold),
        config,
        args.device or _default_device(),
        continue_training=args.continue_training,
        overwrite=args.overwrite,
        final_validation=not args.no_final_validation,
    )
    print(f"Model written to {result.output_folder}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nnfiltermatch.metrics import evaluate_folders

    result = evaluate_folders(
        args.ref,
        args.pred,
        labels=args.labels,
        units=args.units,
        allow_missing=args.allow_missing,
        file_ending=args.file_ending,
    )
    print(result.format_table())
    if args.output is not None:
        result.to_json(args.output)
        result.to_csv(args.output.with_suffix(".csv"))
        print(f"Wrote {args.output} and {args.output.with_suffix('.csv')}")
    return 0


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "evaluate": cmd_evaluate}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnfiltermatch",
        description="Semi-supervised nnU-Net training with entropy filtering of the unlabelled pool (nnFilterMatch).",
    )
    parser.add_argument("--version", action="version", version=f"nnfiltermatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_train(sub)
    _add_evaluate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nnfiltermatch.inventory import DataValidationError
    from nnfiltermatch.metrics import EvaluationError
    from nnfiltermatch.preparation import PreparationError

    try:
        return COMMANDS[args.command](args)
    except (DataValidationError, PreparationError, EvaluationError, ValueError) as exc:
        print(f"nnfiltermatch {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
