"""The data commands: prepare (and --add-labels), convert, evaluate."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


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


def add_prepare(sub: argparse._SubParsersAction) -> None:
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


def cmd_prepare(args: argparse.Namespace) -> int:
    from nnfiltermatch.data.add_labels import add_labels
    from nnfiltermatch.data.layout import dataset_name_from_id
    from nnfiltermatch.data.manifest import load_prepared
    from nnfiltermatch.data.preparation import prepare
    from nnfiltermatch.data.rounds import rounds_path
    from nnfiltermatch.errors import PreparationError

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


def add_convert(sub: argparse._SubParsersAction) -> None:
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


def cmd_convert(args: argparse.Namespace) -> int:
    from nnfiltermatch.data.converters_acdc import convert_acdc_h5
    from nnfiltermatch.data.converters_la import convert_la_h5

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


def add_evaluate(sub: argparse._SubParsersAction) -> None:
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nnfiltermatch.evaluation.evaluate import evaluate_folders

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
