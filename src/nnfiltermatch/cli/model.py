"""The commands that read a trained model folder: predict, query, report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnfiltermatch.cli.common import add_device, add_round
from nnfiltermatch.config import MODES
from nnfiltermatch.nnunet.trained_model import default_device

CHECKPOINT_FILES: dict[str, str] = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}


def _checkpoint(value: str) -> str:
    """``final``/``best``, or nnU-Net's ``-chk`` name for them: one option, both spellings, a clear error otherwise."""
    for name, file_name in CHECKPOINT_FILES.items():
        if value in (name, file_name):
            return name
    allowed = ", ".join([*CHECKPOINT_FILES, *CHECKPOINT_FILES.values()])
    raise argparse.ArgumentTypeError(f"invalid checkpoint {value!r}: give one of {allowed}")


def _add_model_folder_name(p: argparse.ArgumentParser, verb: str) -> None:
    """-d/-c/--mode/-p/--round: the model folder named as train wrote it in nnU-Net's results layout."""
    p.add_argument("-d", "--dataset", help="dataset ID or name: with -c and --mode, finds the folder train wrote")
    p.add_argument("-c", "--configuration", help="e.g. 3d_fullres, 3d_fullres_cpu")
    p.add_argument("--mode", choices=MODES, default=None, help="the trained mode (default filtermatch)")
    p.add_argument("-p", "--plans", default=None, help=PLANS_HELP)
    add_round(p, f"with -d/-c/--mode, {verb} the model in")


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        "-chk",
        type=_checkpoint,
        default="final",
        metavar="{final,best}",
        help="checkpoint_final.pth (default) or checkpoint_best.pth; -chk takes nnU-Net's file names",
    )


PLANS_HELP = "plans name (default: the plans -d was prepared with, else nnUNetPlans)"


def _model_dir_from_args(args: argparse.Namespace, error: type[ValueError]) -> Path:
    """``-m MODEL_DIR``, or the folder that ``-d/-c/--mode/-p/--round`` name in nnU-Net's results layout (not both)."""
    from nnfiltermatch.data.rounds import model_dir_for_round
    from nnfiltermatch.runs import resolve_model_dir

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
    from nnfiltermatch.data.layout import dataset_name_from_id
    from nnfiltermatch.data.manifest import load_prepared
    from nnfiltermatch.data.planners import DEFAULT_PLANS
    from nnfiltermatch.errors import PreparationError

    try:
        return load_prepared(dataset_name_from_id(dataset)).plans_name
    except (PreparationError, OSError, ValueError, KeyError):  # not prepared here (e.g. a copied results folder)
        return DEFAULT_PLANS


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="segment a folder of CASE_0000 images with a trained model (nnU-Net's sliding window, fold ensemble)",
    )
    p.add_argument("-i", "--input", required=True, type=Path, help="folder of CASE_XXXX<ending> images")
    p.add_argument("-o", "--output", required=True, type=Path, help="folder for CASE<ending> label maps")
    p.add_argument(
        "-m", "--model-dir", type=Path, help="trained model folder (plans.json, fold_X/); instead of -d/-c/--mode"
    )
    _add_model_folder_name(p, "predict with")
    p.add_argument("-f", "--folds", nargs="+", help="folds to ensemble, e.g. -f 0 1 2 or -f all (default: found)")
    _add_checkpoint(p)
    add_device(p)
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
    p.add_argument(
        "-npp",
        "--preprocessing-workers",
        dest="preprocessing_workers",
        type=int,
        help="processes that read and preprocess the images (nnU-Net's -npp; default 1 on CPU, up to 3 on a GPU)",
    )
    p.add_argument(
        "-nps",
        "--export-workers",
        dest="export_workers",
        type=int,
        help="processes that resample and write the segmentations (nnU-Net's -nps; default 1 on CPU, up to 3 on a GPU)",
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


def cmd_predict(args: argparse.Namespace) -> int:
    from nnfiltermatch.commands.predict import predict_folder
    from nnfiltermatch.data.predict_cases import PredictionError

    model_dir = _model_dir_from_args(args, PredictionError)
    written = predict_folder(
        args.input,
        args.output,
        model_dir,
        folds=args.folds,
        checkpoint=args.checkpoint,
        device=args.device or default_device(),
        mirroring=args.mirroring,
        step_size=args.step_size,
        save_probabilities=args.save_probabilities,
        existing="continue" if args.continue_prediction else "overwrite" if args.overwrite else "refuse",
        preprocessing_workers=args.preprocessing_workers,
        export_workers=args.export_workers,
    )
    print(f"Wrote {len(written)} segmentations to {args.output} (model {model_dir})")
    return 0


def add_query(sub: argparse._SubParsersAction) -> None:
    from nnfiltermatch.commands.query import DEFAULT_PNG_TOP, REUSE_POLICIES
    from nnfiltermatch.method.query_scores import REDUCTIONS
    from nnfiltermatch.method.query_strategies import DEFAULT_MIN_FOREGROUND_ML, DEFAULT_SEED, STRATEGIES

    p = sub.add_parser(
        "query",
        help="active learning: rank the unlabelled cases (uncertainty or a random baseline) and export the top ones "
        "for annotation",
    )
    p.add_argument("-m", "--model-dir", type=Path, help="trained model folder (plans.json, fold_X/)")
    _add_model_folder_name(p, "rank with")
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
    add_device(p)


def cmd_query(args: argparse.Namespace) -> int:
    from nnfiltermatch.commands.query import format_ranking, run_query
    from nnfiltermatch.commands.query_export import EXPORT_FOLDERS
    from nnfiltermatch.commands.query_model import QueryError
    from nnfiltermatch.method.query_strategies import STRATEGIES

    model_dir = _model_dir_from_args(args, QueryError)
    result = run_query(
        model_dir,
        folds=args.folds,
        checkpoint=args.checkpoint,
        device=args.device or default_device(),
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


def add_report(sub: argparse._SubParsersAction) -> None:
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
    _add_model_folder_name(p, "report on")
    p.add_argument("-f", "--fold", help="the fold, when MODEL_DIR holds several")
    p.add_argument("-o", "--output", type=Path, help="HTML file (default MODEL_DIR/fold_X/report.html)")
    p.add_argument(
        "--evaluation", type=Path, help="summary JSON of `nnfiltermatch evaluate -o` (default: one found in the folder)"
    )


def cmd_report(args: argparse.Namespace) -> int:
    from nnfiltermatch.commands.reports import ReportError, build_report

    target = build_report(
        _model_dir_from_args(args, ReportError), output=args.output, evaluation=args.evaluation, fold=args.fold
    )
    print(f"Wrote {target}")
    return 0
