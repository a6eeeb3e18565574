"""The ``nnfiltermatch`` command: prepare, train, predict, evaluate, demo."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from nnfiltermatch import __version__
from nnfiltermatch.config import MODES, PRESETS, SCORES, TEACHERS, UNSUP_LOSSES


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class _Parser(argparse.ArgumentParser):
    """No prefix matching, here and in every sub-parser (``add_subparsers`` makes them of this class).

    With abbreviations nnU-Net habits turn into silent surprises: ``--val`` would be ``--val-iters-per-epoch``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


class _UseInstead(argparse.Action):
    """A flag that means something else here: fail naming the right one, so an old habit is not silently obeyed."""

    def __init__(self, option_strings: list[str], dest: str, *, instead: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.instead = instead

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        raise argparse.ArgumentError(self, self.instead)


CHECKPOINT_FILES: dict[str, str] = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}


def _checkpoint(value: str) -> str:
    """``final``/``best``, or nnU-Net's ``-chk`` name for them: one option, both spellings, a clear error otherwise."""
    for name, file_name in CHECKPOINT_FILES.items():
        if value in (name, file_name):
            return name
    allowed = ", ".join([*CHECKPOINT_FILES, *CHECKPOINT_FILES.values()])
    raise argparse.ArgumentTypeError(f"invalid checkpoint {value!r}: give one of {allowed}")


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        "-chk",
        type=_checkpoint,
        default="final",
        metavar="{final,best}",
        help="checkpoint_final.pth (default) or checkpoint_best.pth; -chk takes nnU-Net's file names",
    )


def _round_number(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"invalid round {value!r}: give 0, 1, 2 ...")
    return number


def _add_round(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--round",
        dest="round_number",
        type=_round_number,
        metavar="K",
        help=f"annotation round K: {what} <Trainer>_roundK__<Plans>__<configuration> (round 0 and the default: the "
        "plain folder)",
    )


PLANS_HELP = "plans name (default: the plans -d was prepared with, else nnUNetPlans)"


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", "-device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="validate, plan (labelled cases only) and preprocess labelled + unlabelled data")
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or DatasetXXX_Name under $nnUNet_raw")
    p.add_argument(
        "-c",
        "--configurations",
        nargs="+",
        default=None,
        help="plan configurations to preprocess (default 3d_fullres; 3d_fullres_cpu / 2d_cpu are small "
        "CPU-sized variants that reuse the same data; with --add-labels: every preprocessed one)",
    )
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--labeled-list", type=Path, help="text file of imagesTr case IDs that count as labelled")
    budget.add_argument("--labeled-fraction", type=float, help="simulate a label budget: sample this fraction")
    budget.add_argument(
        "--add-labels",
        type=Path,
        metavar="DIR",
        help="after annotating queried cases: CASE<ending> label files in DIR move those cases from the unlabelled "
        "to the labelled set, preprocessed with the existing plans (no re-planning)",
    )
    p.add_argument(
        "--query-export",
        type=Path,
        metavar="DIR",
        help="with --add-labels: the `query --export` folder that chose these cases, whose settings rounds.json "
        "records (default: the folder above --add-labels DIR when it is an export, i.e. DIR/labelsTr)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for --labeled-fraction (default 0)")
    p.add_argument(
        "-pl",
        "--planner",
        default=None,
        metavar="PLANNER",
        help="nnU-Net's planner by its name: ExperimentPlanner (default), nnUNetPlannerResEncM/L/XL (residual "
        "encoder presets), ...",
    )
    p.add_argument(
        "-p",
        "--plans",
        default=None,
        help="plans name (default: the planner's own, e.g. nnUNetPlans, nnUNetResEncUNetMPlans); one that is another "
        "planner's is refused",
    )
    p.add_argument("-np", "--num-processes", type=int, default=2, help="preprocessing processes (default 2)")
    p.add_argument(
        "--allow-no-unlabeled",
        action="store_true",
        help="accept a dataset without unlabelled images (only --mode supervised can train on it)",
    )


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=f"train one fold in mode {', '.join(MODES)}")
    p.add_argument("-d", "--dataset", required=True)
    p.add_argument("-c", "--configuration", required=True, help="e.g. 3d_fullres, 2d, 3d_fullres_cpu")
    p.add_argument("-f", "--fold", required=True, help="0-4 or all")
    p.add_argument("-p", "--plans", default=None, help="plans name (default: the plans the dataset was prepared with)")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="filtermatch",
        help="filtermatch (default): pseudo-labels + the entropy filter; ssl: pseudo-labels only; supervised: "
        "labelled cases only; selftrain: offline self-training (the supervised run, reused if finished with the same "
        "options, then training on labelled + its pseudo-labels at the compute of one ssl run)",
    )
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="default",
        help="paper: the reference schedule (300x250, tau 0, sum score, filter at 100 and 200)",
    )
    _add_device(p)
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help="repeatable runs: augmentation in the training process (nnUNet_n_proc_DA=0, the CPU default) and "
        "deterministic cuDNN; the same seed then gives the same model on CPU, and an ssl run whose pseudo-labels "
        "never start gives its supervised twin's",
    )
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
        type=_round_number,
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
    s.add_argument(
        "--ssl-start-dice",
        type=float,
        help="after warm-up, wait until nnU-Net's validation pseudo-Dice of every class reaches this before pseudo-"
        "labels are used (default 0.5; 0 starts right after warm-up)",
    )
    s.add_argument("--teacher", choices=TEACHERS, help="pseudo-labels from the student or its EMA (default ema)")
    s.add_argument("--ema-decay", type=float)
    s.add_argument("--tau", type=float, help="confidence threshold; 0 reproduces the paper (default 0.9)")
    s.add_argument("--lambda-u", type=float, help="unlabelled loss weight (default 1)")
    s.add_argument(
        "--unsup-loss",
        choices=UNSUP_LOSSES,
        help="loss on pseudo-labels: ce (default) or dice_ce (nnU-Net's Dice+CE, the paper's)",
    )
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
    s.add_argument(
        "--copy-paste-p",
        type=float,
        help="probability per step of pasting a labelled box with its labels into the strong views (BCP; default 0)",
    )
    f = p.add_argument_group("the filter (mode filtermatch)")
    f.add_argument("--filter-start", type=int, help="first filter epoch (default epochs/3)")
    f.add_argument("--filter-every", type=int, help="epochs between filter rounds (default epochs/3)")
    f.add_argument("--filter-drop", type=float, help="fraction of the pool dropped per round (default 0.15)")
    f.add_argument("--score", choices=SCORES, help="per-case reduction of voxel entropy (default mean)")
    f.add_argument("--topk-fraction", type=float)
    f.add_argument("--filter-mirroring", action="store_true", default=None, help="mirror when scoring (8x slower)")
    f.add_argument(
        "--filter-tile-step",
        type=float,
        help="sliding-window step (fraction of the patch) when scoring; 1.0 = no overlap (default)",
    )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice, Jaccard, HD95, ASD, ASSD per case and class")
    p.add_argument("-r", "--ref", required=True, type=Path, help="folder of reference label maps")
    p.add_argument("--pred", "--predictions", required=True, type=Path, help="folder of predicted label maps")
    p.add_argument(
        "-p",
        action=_UseInstead,
        instead="give the prediction folder with --pred (or --predictions); -p names the plans in the other commands",
    )
    p.add_argument("-o", "--output", type=Path, help="summary JSON (a CSV is written beside it)")
    p.add_argument("--labels", "-l", type=int, nargs="+", help="labels to evaluate (default: all in the references)")
    p.add_argument("--units", choices=("voxel", "mm"), default="voxel")
    p.add_argument(
        "--allow-missing", "--chill", action="store_true", help="report missing predictions instead of failing"
    )
    p.add_argument("--file-ending", default=".nii.gz")
    p.add_argument(
        "--resample-to-reference",
        action="store_true",
        help="resample predictions whose size, spacing, origin or direction differ from their reference onto the "
        "reference grid (nearest neighbour) and list them, instead of refusing them",
    )
    p.add_argument(
        "--dataset-json",
        type=Path,
        help="dataset.json whose 'labels' name the classes in the table (default: one found in the reference folder, "
        "its parent, or the prediction folder)",
    )
    p.add_argument(
        "--nsd-tolerance",
        type=float,
        metavar="MM",
        help="also report normalised surface Dice at this tolerance in mm (header spacing, whatever --units says)",
    )


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment a folder of CASE_0000 images with a trained model (nnU-Net's sliding window, fold ensemble)",
    )
    p.add_argument("-i", "--input", required=True, type=Path, help="folder of CASE_XXXX<ending> images")
    p.add_argument("-o", "--output", required=True, type=Path, help="folder for CASE<ending> label maps")
    p.add_argument(
        "-m", "--model-dir", type=Path, help="trained model folder (plans.json, fold_X/); instead of -d/-c/--mode"
    )
    p.add_argument("-d", "--dataset", help="dataset ID or name: with -c and --mode, finds the folder train wrote")
    p.add_argument("-c", "--configuration", help="e.g. 3d_fullres, 3d_fullres_cpu")
    p.add_argument("--mode", choices=MODES, default=None, help="the trained mode (default filtermatch)")
    p.add_argument("-p", "--plans", default=None, help=PLANS_HELP)
    _add_round(p, "with -d/-c/--mode, predict with the model in")
    p.add_argument("-f", "--folds", nargs="+", help="folds to ensemble, e.g. -f 0 1 2 or -f all (default: found)")
    _add_checkpoint(p)
    _add_device(p)
    p.add_argument(
        "--no-mirroring",
        "--disable_tta",
        dest="mirroring",
        action="store_false",
        help="no mirroring test-time augmentation. Default: on, for every configuration including the _cpu ones; "
        "it runs the network on all 8 flips of each 3D window (4 in 2D), so --no-mirroring predicts about 8x "
        "faster (Hippocampus 3d_fullres_cpu: 3.9 s -> 0.5 s per case on one core) but costs Dice (README)",
    )
    p.add_argument(
        "--step-size",
        "-step_size",
        type=float,
        default=0.5,
        help="sliding-window step, fraction of the patch. Default 0.5 for every configuration, _cpu included: "
        "windows overlap by half, up to 2x the windows per axis of --step-size 1.0 (8x in 3D); the _cpu "
        "configurations have half the patch, so they need about 8x the windows of their base on large images "
        "(Hippocampus 3d_fullres_cpu: 27 windows per case at 0.5, 8 at 1.0; 3.9 s vs 1.3 s per case)",
    )
    p.add_argument(
        "--save-probabilities",
        "--save_probabilities",
        "--npz",
        action="store_true",
        help="also write softmax .npz + .pkl (nnU-Net's)",
    )
    existing = p.add_mutually_exclusive_group()
    existing.add_argument(
        "--continue_prediction",
        "--continue-prediction",
        "--c",
        dest="continue_prediction",
        action="store_true",
        help="resume an interrupted run: keep cases whose output in -o is complete, predict the others "
        "(segmentations are written under a temporary name and renamed, so a file there is a finished one)",
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="predict every case and replace its output in -o (default: refuse if -o holds any of them)",
    )


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a public h5 benchmark (LA, ACDC) to an nnU-Net raw dataset")
    formats = p.add_subparsers(dest="format", required=True, metavar="FORMAT")

    def common(q: argparse.ArgumentParser, name: str) -> None:
        q.add_argument("-d", "--dataset", required=True, type=int, metavar="ID", help="writes DatasetXXX_<name>")
        q.add_argument("--name", default=name, help=f"dataset name (default {name})")
        q.add_argument(
            "--spacing",
            nargs=3,
            type=float,
            metavar=("X", "Y", "Z"),
            help="voxel spacing in mm, ITK order (X: last h5 axis, Z: first); default 1 1 1 (the h5 files have none)",
        )
        q.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")

    la = formats.add_parser("la-h5", help="UA-MT layout: SRC/2018LA_Seg_Training Set/<CASE>/mri_norm2.h5")
    la.add_argument("src", type=Path, metavar="SRC", help="folder holding '2018LA_Seg_Training Set' and the lists")
    common(la, "LA")
    la.add_argument("--train-list", type=Path, help="default SRC/train.list")
    la.add_argument("--test-list", type=Path, help="default SRC/test.list (no imagesTs when absent)")
    acdc = formats.add_parser("acdc-h5", help="SSL4MIS layout: SRC/data/slices/*.h5, SRC/data/*.h5, lists")
    acdc.add_argument("src", type=Path, metavar="SRC", help="folder holding data/ and train.list, val.list, test.list")
    common(acdc, "ACDC")
    acdc.add_argument("--train-list", type=Path, help="default SRC/train.list")
    acdc.add_argument("--val-list", type=Path, help="default SRC/val.list")
    acdc.add_argument("--test-list", type=Path, help="default SRC/test.list (skipped when absent)")


TRAIN_OPTION_NAMES = (
    "seed",
    "deterministic",
    "epochs",
    "iters_per_epoch",
    "val_iters_per_epoch",
    "lr",
    "weight_decay",
    "batch_size",
    "save_every",
    "unlabeled_ratio",
    "warmup_epochs",
    "ssl_start_dice",
    "teacher",
    "ema_decay",
    "tau",
    "lambda_u",
    "unsup_loss",
    "rampup_epochs",
    "flip_from_epoch",
    "strong_intensity",
    "intensity_p",
    "cutout_p",
    "cutmix_p",
    "copy_paste_p",
    "filter_start",
    "filter_every",
    "filter_drop",
    "score",
    "topk_fraction",
    "filter_mirroring",
    "filter_tile_step",
)


def cmd_prepare(args: argparse.Namespace) -> int:
    from nnfiltermatch.add_labels import add_labels
    from nnfiltermatch.errors import PreparationError
    from nnfiltermatch.layout import dataset_name_from_id
    from nnfiltermatch.manifest import load_prepared
    from nnfiltermatch.preparation import prepare
    from nnfiltermatch.rounds import rounds_path

    if args.query_export is not None and args.add_labels is None:
        raise PreparationError("--query-export goes with --add-labels: it names the export that chose those cases")
    if args.add_labels is not None:
        added = add_labels(args.dataset, args.add_labels, args.configurations, query_export=args.query_export)
        print(
            f"Labelled {len(added.cases)} case(s): {', '.join(added.cases)} (images moved from imagesUnlabeled/: "
            f"{len(added.moved_from_unlabeled_folder)}; already in imagesTr: {len(added.already_in_images_tr)}); "
            f"preprocessed for {', '.join(added.configurations)} with the existing plans"
        )
        for message in added.messages:
            print(f"Note: {message}")
        prepared = load_prepared(dataset_name_from_id(args.dataset))
        print(
            f"{prepared.dataset_name}: {len(prepared.labeled_ids)} labelled, {len(prepared.unlabeled_ids)} "
            "unlabelled cases"
        )
        if added.round is not None:
            k, query = added.round["round"], added.round.get("query")
            chosen = (
                f"chosen by {query.get('strategy')} with {query.get('model_dir') or 'an unrecorded model'}"
                if query
                else "no query export found beside the labels, so what chose them is not recorded"
            )
            print(
                f"Recorded as annotation round {k} in {rounds_path(prepared.dataset_name)} ({chosen}); train its "
                f"model with `nnfiltermatch train -d {args.dataset} ... --round {k}`"
            )
        return 0
    prepared = prepare(
        args.dataset,
        args.configurations or ["3d_fullres"],
        labeled_list=args.labeled_list,
        labeled_fraction=args.labeled_fraction,
        seed=args.seed,
        plans_name=args.plans,
        num_processes=args.num_processes,
        allow_no_unlabeled=args.allow_no_unlabeled,
        planner=args.planner,
    )
    print(
        f"{prepared.dataset_name}: {len(prepared.labeled_ids)} labelled, {len(prepared.unlabeled_ids)} unlabelled "
        f"cases; preprocessed configurations: {', '.join(prepared.configurations)}"
    )
    return 0


def _rounds_or_none(dataset_name: str) -> dict[str, Any] | None:
    """rounds.json for a note after training; an unreadable one must not turn a finished training into an error."""
    from nnfiltermatch.rounds import load_rounds

    try:
        return load_rounds(dataset_name)
    except ValueError:
        return None


def cmd_train(args: argparse.Namespace) -> int:
    from nnfiltermatch.config import resolve_config
    from nnfiltermatch.layout import dataset_name_from_id
    from nnfiltermatch.manifest import load_prepared
    from nnfiltermatch.rounds import rounds_path
    from nnfiltermatch.training import parse_fold, train

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
        args.device or _default_device(),
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
    training = [f"--{name.replace('_', '-')}" for name in TRAIN_OPTION_NAMES if getattr(args, name) is not None]
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
    from nnfiltermatch.training import parse_fold, validate_trained

    folder = validate_trained(
        dataset_name,
        args.configuration,
        parse_fold(args.fold),
        args.mode,
        args.device or _default_device(),
        save_probabilities=args.save_probabilities,
        checkpoint="best" if args.val_best else "final",
        round_number=args.round_number,
        plans_name=args.plans,
    )
    print(_validation_note(folder, args.save_probabilities))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nnfiltermatch.evaluation import evaluate_folders

    result = evaluate_folders(
        args.ref,
        args.pred,
        labels=args.labels,
        units=args.units,
        allow_missing=args.allow_missing,
        file_ending=args.file_ending,
        resample_to_reference=args.resample_to_reference,
        dataset_json=args.dataset_json,
        nsd_tolerance=args.nsd_tolerance,
    )
    print(result.format_table())
    if args.output is not None:
        result.to_json(args.output)
        result.to_csv(args.output.with_suffix(".csv"))
        print(f"Wrote {args.output} and {args.output.with_suffix('.csv')}")
    return 0


def _model_dir_from_args(args: argparse.Namespace, error: type[ValueError]) -> Path:
    """``-m MODEL_DIR``, or the folder that ``-d/-c/--mode/-p/--round`` name in nnU-Net's results layout (not both)."""
    from nnfiltermatch.inference import resolve_model_dir
    from nnfiltermatch.rounds import model_dir_for_round

    round_number = getattr(args, "round_number", None)
    named = [
        flag
        for flag, value in (
            ("-d", args.dataset),
            ("-c", args.configuration),
            ("--mode", args.mode),
            ("-p", args.plans),
            ("--round", round_number),
        )
        if value is not None
    ]
    if args.model_dir is not None:
        if named:
            raise error(f"give either -m MODEL_DIR or -d/-c/--mode/--round, not both (got -m and {', '.join(named)})")
        return args.model_dir
    if args.dataset is None or args.configuration is None:
        raise error(
            "give the model folder (-m MODEL_DIR; for report, MODEL_DIR), or -d DATASET and -c CONFIGURATION (and "
            "--mode, default filtermatch; --round K)"
        )
    model_dir = resolve_model_dir(
        args.dataset, args.configuration, args.mode or "filtermatch", args.plans or _prepared_plans(args.dataset)
    )
    return model_dir_for_round(model_dir, round_number) if round_number is not None else model_dir


def _prepared_plans(dataset: str) -> str:
    """The plans ``dataset`` was prepared with (so a ResEnc preparation needs no -p), else nnU-Net's default."""
    from nnfiltermatch.errors import PreparationError
    from nnfiltermatch.layout import dataset_name_from_id
    from nnfiltermatch.manifest import load_prepared
    from nnfiltermatch.planners import DEFAULT_PLANS

    try:
        return load_prepared(dataset_name_from_id(dataset)).plans_name
    except (PreparationError, OSError, ValueError, KeyError):  # not prepared here (e.g. a copied results folder)
        return DEFAULT_PLANS


def cmd_predict(args: argparse.Namespace) -> int:
    from nnfiltermatch.inference import PredictionError, predict_folder

    model_dir = _model_dir_from_args(args, PredictionError)
    written = predict_folder(
        args.input,
        args.output,
        model_dir,
        folds=args.folds,
        checkpoint=args.checkpoint,
        device=args.device or _default_device(),
        mirroring=args.mirroring,
        step_size=args.step_size,
        save_probabilities=args.save_probabilities,
        existing="continue" if args.continue_prediction else "overwrite" if args.overwrite else "refuse",
    )
    print(f"Wrote {len(written)} segmentations to {args.output} (model {model_dir})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from nnfiltermatch.converters_acdc import convert_acdc_h5
    from nnfiltermatch.converters_la import convert_la_h5

    common = {"dataset_id": args.dataset, "name": args.name, "spacing": args.spacing, "overwrite": args.overwrite}
    if args.format == "la-h5":
        result = convert_la_h5(args.src, train_list=args.train_list, test_list=args.test_list, **common)
    else:
        result = convert_acdc_h5(
            args.src, train_list=args.train_list, val_list=args.val_list, test_list=args.test_list, **common
        )
    for message in result.messages:
        print(message)
    print(result.summary())
    return 0


def _add_query(sub: argparse._SubParsersAction) -> None:
    from nnfiltermatch.query import (
        DEFAULT_MIN_FOREGROUND_ML,
        DEFAULT_PNG_TOP,
        DEFAULT_SEED,
        REDUCTIONS,
        REUSE_POLICIES,
        STRATEGIES,
    )

    p = sub.add_parser(
        "query",
        help="active learning: rank the unlabelled cases (uncertainty or a random baseline) and export the top ones "
        "for annotation",
    )
    p.add_argument("-m", "--model-dir", type=Path, help="trained model folder (plans.json, fold_X/)")
    p.add_argument("-d", "--dataset", help="dataset ID or name: with -c and --mode, finds the folder train wrote")
    p.add_argument("-c", "--configuration", help="e.g. 3d_fullres, 3d_fullres_cpu")
    p.add_argument("--mode", choices=MODES, default=None, help="the trained mode (default filtermatch)")
    p.add_argument("-p", "--plans", default=None, help=PLANS_HELP)
    _add_round(p, "with -d/-c/--mode, rank with the model in")
    p.add_argument("-f", "--folds", nargs="+", help="folds to ensemble (default: found); reuse needs one fold")
    _add_checkpoint(p)
    p.add_argument("-n", "--top", type=int, help="list only the N first picks (with --export: the N exported)")
    p.add_argument(
        "--strategy",
        "--score",
        dest="strategy",
        choices=STRATEGIES,
        default="entropy",
        metavar="NAME",
        help="how to pick: "
        + "; ".join(f"{name}: {spec.summary}" for name, spec in STRATEGIES.items())
        + " (default entropy)",
    )
    p.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"seed of the random strategies (default {DEFAULT_SEED})"
    )
    p.add_argument(
        "--min-foreground-ml",
        type=float,
        default=DEFAULT_MIN_FOREGROUND_ML,
        metavar="ML",
        help="foreground-random: leave out cases whose predicted foreground (all labels) is at most this many mL "
        f"(default {DEFAULT_MIN_FOREGROUND_ML:g})",
    )
    p.add_argument("--reduce", choices=REDUCTIONS, default="mean", help="per-case reduction (default mean)")
    p.add_argument("--topk-fraction", type=float, default=0.1, help="fraction of voxels for --reduce topk")
    p.add_argument("--roi", action="store_true", help="score inside the predicted foreground's bounding box only")
    p.add_argument("--roi-margin", type=int, default=5, help="voxels added around the --roi box (default 5)")
    p.add_argument("--step-size", type=float, help="sliding-window step (default: the filter's tile step)")
    p.add_argument(
        "--reuse-filter-scores",
        choices=REUSE_POLICIES,
        default="auto",
        help="auto: reuse the last filter round's scores when they are what this query computes (default)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        help="ranking CSV (default MODEL_DIR/query_ranking_<strategy>.csv); MODEL_DIR/query_latest.json records where "
        "it went and how it was made, for the report",
    )
    p.add_argument("--png-dir", type=Path, help="folder for the top cases' PNGs (default beside the CSV)")
    p.add_argument(
        "--png-top", type=int, default=DEFAULT_PNG_TOP, help=f"PNGs for the N top cases (default {DEFAULT_PNG_TOP})"
    )
    p.add_argument(
        "--export",
        type=Path,
        metavar="DIR",
        help="write the -n top cases for annotation into DIR: images (copied), the model's segmentation as a "
        "pre-annotation in each image's geometry, PNGs, selection.csv (why each case) and README.txt (next steps)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier --export DIR")
    _add_device(p)


def cmd_query(args: argparse.Namespace) -> int:
    from nnfiltermatch.query import EXPORT_FOLDERS, STRATEGIES, QueryError, format_ranking, run_query

    model_dir = _model_dir_from_args(args, QueryError)
    result = run_query(
        model_dir,
        folds=args.folds,
        checkpoint=args.checkpoint,
        device=args.device or _default_device(),
        strategy=args.strategy,
        reduce=args.reduce,
        topk_fraction=args.topk_fraction,
        roi=args.roi,
        roi_margin=args.roi_margin,
        step_size=args.step_size,
        reuse=args.reuse_filter_scores,
        top_n=args.top,
        output=args.output,
        png_dir=args.png_dir,
        png_top=args.png_top,
        seed=args.seed,
        min_foreground_ml=args.min_foreground_ml,
        export=args.export,
        overwrite=args.overwrite,
    )
    spec = STRATEGIES[result.strategy]
    reused, computed = result.n_reused, len(result.ranking) - result.n_reused
    if spec.voxel_map is None:
        print(f"Order drawn with seed {result.seed} ({result.strategy}: {spec.summary}).")
    elif result.decision.reused:
        print(
            f"Scores reused for {len(result.decision.scores)} case(s) ({result.decision.reason}); the others computed."
        )
    else:
        print(f"Scores computed (not reused: {result.decision.reason}).")
    if result.excluded:
        shown = ", ".join(result.excluded[:8]) + (" ..." if len(result.excluded) > 8 else "")
        print(
            f"Left out {len(result.excluded)} case(s) whose predicted foreground is at most {args.min_foreground_ml:g} "
            f"mL: {shown}"
        )
    print(format_ranking(result))
    how = f"{result.strategy} ({result.reduce})" if spec.voxel_map else f"{result.strategy} (seed {result.seed})"
    counts = f"listed: {reused} reused, {computed} computed" if spec.voxel_map else f"listed: {len(result.ranking)}"
    print(
        f"Ranked {result.total_cases} unlabelled case(s) by {how} in {result.seconds:.1f} s ({counts}); wrote "
        f"{result.csv_path}" + (f" and {len(result.pngs)} PNG(s) to {result.pngs[0].parent}" if result.pngs else "")
    )
    if result.latest_error is not None:
        print(f"Note: `nnfiltermatch report` will not show this ranking: {result.latest_error}", file=sys.stderr)
    if result.export_dir is not None:
        n = len(result.ranking)
        print(
            f"Exported {n} case(s) for annotation to {result.export_dir}: correct the pre-annotations, save them in "
            f"{result.export_dir / EXPORT_FOLDERS['labels']}, then `nnfiltermatch prepare --add-labels` "
            "(its README.txt has the commands)"
        )
    return 0


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="one self-contained HTML page: curves, pool, filter rounds, annotation rounds, configuration"
    )
    p.add_argument(
        "model_dir",
        type=Path,
        nargs="?",
        metavar="MODEL_DIR",
        help="a fold folder, or a model folder with one fold (or name it with -d/-c/--mode/--round)",
    )
    p.add_argument("-d", "--dataset", help="dataset ID or name: with -c and --mode, finds the folder train wrote")
    p.add_argument("-c", "--configuration", help="e.g. 3d_fullres, 3d_fullres_cpu")
    p.add_argument("--mode", choices=MODES, default=None, help="the trained mode (default filtermatch)")
    p.add_argument("-p", "--plans", default=None, help=PLANS_HELP)
    _add_round(p, "with -d/-c/--mode, report on the model in")
    p.add_argument("-f", "--fold", help="the fold, when MODEL_DIR holds several")
    p.add_argument("-o", "--output", type=Path, help="HTML file (default MODEL_DIR/fold_X/report.html)")
    p.add_argument(
        "--evaluation", type=Path, help="summary JSON of `nnfiltermatch evaluate -o` (default: one found in the folder)"
    )


def cmd_report(args: argparse.Namespace) -> int:
    from nnfiltermatch.reports import ReportError, build_report

    target = build_report(
        _model_dir_from_args(args, ReportError), output=args.output, evaluation=args.evaluation, fold=args.fold
    )
    print(f"Wrote {target}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole job on the shipped Hippocampus subset: supervised vs filtermatch")
    p.add_argument(
        "--out", type=Path, default=Path("nnfiltermatch_demo"), help="working folder (default ./nnfiltermatch_demo)"
    )
    p.add_argument(
        "--quick", action="store_true", help="a short schedule for a first look (about 3 minutes on 2 cores)"
    )
    _add_device(p)
    p.add_argument("--seed", type=int, default=0)


def cmd_demo(args: argparse.Namespace) -> int:
    from nnfiltermatch.demo import run_demo

    results = run_demo(args.out, quick=args.quick, device=args.device or _default_device(), seed=args.seed)
    print(f"Wrote {args.out / 'results.md'} and {args.out / 'results.json'} ({results['total_seconds']:.0f} s)")
    return 0


COMMANDS = {
    "demo": cmd_demo,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "convert": cmd_convert,
    "predict": cmd_predict,
    "query": cmd_query,
    "report": cmd_report,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nnfiltermatch",
        description="Semi-supervised nnU-Net training with entropy filtering of the unlabelled pool (nnFilterMatch).",
    )
    parser.add_argument("--version", action="version", version=f"nnfiltermatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_query(sub)
    _add_report(sub)
    _add_convert(sub)
    _add_demo(sub)
    return parser


# where each command writes: (attribute, option named in the error, a file rather than a folder); train and prepare
# write under nnU-Net's folders, named by their variables
OUTPUTS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "evaluate": (("output", "-o", True),),
    "predict": (("output", "-o", False),),
    "query": (("output", "-o", True), ("png_dir", "--png-dir", False), ("export", "--export", False)),
    "report": (("output", "-o", True),),
    "demo": (("out", "--out", False),),
}
ENV_OUTPUTS = {"train": "nnUNet_results", "prepare": "nnUNet_preprocessed"}


def check_outputs_writable(args: argparse.Namespace) -> None:
    """Every output location of the command is writable, checked before any work starts."""
    from nnfiltermatch.files import require_writable

    for attribute, option, is_file in OUTPUTS.get(args.command, ()):
        value = getattr(args, attribute, None)
        if value is not None:
            require_writable(value, option, is_file)
    variable = ENV_OUTPUTS.get(args.command)
    if variable and os.environ.get(variable):
        require_writable(os.environ[variable], f"${variable} =")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from nnfiltermatch.errors import DataValidationError, PreparationError
    from nnfiltermatch.evaluation import EvaluationError

    try:
        check_outputs_writable(args)
        return COMMANDS[args.command](args)
    except (DataValidationError, PreparationError, EvaluationError, ValueError) as exc:
        print(f"nnfiltermatch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:  # a location the checks above could not foresee (e.g. a file inside the output)
        print(f"nnfiltermatch {args.command}: error: permission denied: {exc.filename or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
