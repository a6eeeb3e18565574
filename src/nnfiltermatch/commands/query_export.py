"""What a query writes: the ranking CSV, the PNGs of the top cases and the ``--export`` folder for the annotators.

Export (``--export DIR``): the top N cases' images (copied: annotators move folders), the model's segmentation as a
pre-annotation in each image's own geometry (nnU-Net's ``export_prediction_from_logits``, the path ``predict``
writes through: resampling, un-cropping and the image's header are nnU-Net's), the PNGs, ``selection.csv`` (why
each case was picked), ``query.json`` (the settings, recorded in rounds.json by ``prepare --add-labels``) and a
README.txt with the next round's commands. DIR appears complete or not at all (written under a
temporary name, then renamed).
"""

from __future__ import annotations

import csv
import io
import json
import shlex
import shutil
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnfiltermatch.commands.query_model import QueryError, QueryModel, ShownSlice, logits_file
from nnfiltermatch.data.rounds import QUERY_SETTINGS_NAME
from nnfiltermatch.files import atomic_write_bytes
from nnfiltermatch.method.query_strategies import STRATEGIES, RankedCase, StrategyOptions
from nnfiltermatch.runs import trainer_state

SELECTION_CSV = "selection.csv"
EXPORT_README = "README.txt"
EXPORT_FOLDERS = {"images": "images", "preannotations": "preannotations", "png": "png", "labels": "labelsTr"}


# ----- the ranking CSV and the PNGs -------------------------------------------------------------------------------
def png_caption(row: RankedCase, strategy: str, options: StrategyOptions) -> str:
    """The PNG's title: rank, case and why (the same words as the export's selection.csv)."""
    return f"#{row.rank}  {row.case}   {strategy}: {STRATEGIES[strategy].explain(row, options)}"


def _column_name(name: str) -> str:
    return "_".join(name.split()) or "label"


def ranking_columns(labels: Mapping[int, str]) -> list[str]:
    volume = [f"{_column_name(labels[v])}_{unit}" for v in sorted(labels) for unit in ("voxels", "ml")]
    return ["rank", "case", "score", *volume, "source", "reason"]


def write_ranking_csv(
    rows: Sequence[RankedCase],
    labels: Mapping[int, str],
    path: Path,
    explain: Callable[[RankedCase], str] | None = None,
) -> Path:
    """The ranking as CSV, written to a temporary file and renamed: readers never see half a ranking.

    ``explain``: the words for why a case is where it is (the strategy's, as in the PNG and selection.csv)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ranking_columns(labels))
    for row in rows:
        volumes: list[str] = []
        for label in sorted(labels):
            if row.voxels is None or row.voxel_ml is None:
                volumes += ["", ""]
            else:
                volumes += [str(row.voxels[label]), f"{row.voxels[label] * row.voxel_ml:.4f}"]
        reason = explain(row) if explain is not None else ""
        writer.writerow([row.rank, row.case, repr(float(row.score)), *volumes, row.source, reason])
    return atomic_write_bytes(path, buffer.getvalue().encode())


def render_case_png(
    view: ShownSlice, row: RankedCase, caption: str, voxel_map: str, labels: Mapping[int, str], target: Path
) -> Path:
    """Image, prediction overlay and uncertainty heat map of the most uncertain slice, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    palette = plt.get_cmap("tab10")
    n_labels = max(labels, default=0)
    colours = ListedColormap([palette(i % 10) for i in range(max(1, n_labels))])
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    image = view.image
    low, high = np.percentile(image, [0.5, 99.5]) if image.size else (0.0, 1.0)
    for ax in axes[:2]:
        ax.imshow(image, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
    overlay = np.ma.masked_where(view.segmentation == 0, view.segmentation - 1)
    axes[1].imshow(overlay, cmap=colours, vmin=0, vmax=max(1, n_labels) - 1, alpha=0.55, interpolation="nearest")
    heat = axes[2].imshow(view.uncertainty, cmap="inferno", interpolation="nearest")
    fig.colorbar(heat, ax=axes[2], fraction=0.046, pad=0.04)
    present = sorted(int(v) for v in np.unique(view.segmentation) if v > 0)
    if present:
        axes[1].legend(
            handles=[Patch(color=palette((v - 1) % 10), label=labels.get(v, str(v))) for v in present],
            loc="lower right",
            fontsize=8,
            framealpha=0.7,
        )
    for ax, title in zip(axes, ("image", "prediction", f"{voxel_map} (voxel map)")):
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle(f"{caption}   slice {view.index}", fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return atomic_write_bytes(target, buffer.getvalue())


# ----- the export: one folder for the annotators ------------------------------------------------------------------
def check_export_target(target: Path, overwrite: bool) -> None:
    """Refuse, before anything is predicted, an export folder whose contents would be lost.

    A file, or a non-empty folder without ``overwrite``; even with it, a folder that is not an earlier export (no
    selection.csv: ``--export ~ --overwrite`` must not empty a home folder) or whose labelsTr/ holds masks (the
    annotators' corrections).
    """
    target = Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise QueryError(f"--export {target} exists and is not a folder: give the name of a new folder")
    if not target.is_dir() or not any(target.iterdir()):
        return
    if not overwrite:
        raise QueryError(
            f"--export {target} exists and is not empty: give a new folder, or add --overwrite to replace an "
            "earlier export"
        )
    if not (target / SELECTION_CSV).is_file():
        raise QueryError(
            f"--export {target} --overwrite: the folder is not an earlier query export (it has no {SELECTION_CSV}), "
            "so it is left alone; give a new folder"
        )
    labels = target / EXPORT_FOLDERS["labels"]
    done = sorted(p.name for p in labels.iterdir() if not p.name.startswith(".")) if labels.is_dir() else []
    if done:
        listed = ", ".join(done[:4]) + (f" and {len(done) - 4} more" if len(done) > 4 else "")
        raise QueryError(
            f"--export {target} --overwrite: {labels} holds {len(done)} file(s) ({listed}), corrected masks that "
            f"would be lost. Add them first (`nnfiltermatch prepare -d DATASET --add-labels {labels}`) or move them "
            "elsewhere, then export again"
        )


def staging_folder(target: Path) -> Path:
    """A hidden sibling of DIR: the same file system, so the final rename is atomic."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def install_export(staging: Path, target: Path, overwrite: bool) -> Path:
    """Rename the finished staging folder to DIR, replacing an empty folder or, with ``overwrite``, an earlier
    export (checked again: the folder may have changed while the cases were predicted)."""
    check_export_target(target, overwrite)
    replaced = None
    if target.is_dir():
        if any(target.iterdir()):
            replaced = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
            target.rename(replaced)
        else:
            target.rmdir()
    try:
        staging.rename(target)
    except BaseException:
        if replaced is not None:
            replaced.rename(target)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return target


def raw_image_files(model: QueryModel, case_ids: Sequence[str]) -> dict[str, list[Path]]:
    """Each case's raw image files, one per channel: imagesUnlabeled/ first, then imagesTr/ (a label-budget
    simulation), the places ``prepare --add-labels`` takes them from. Looked up before any prediction."""
    from nnfiltermatch.data.layout import env_folder

    raw = env_folder("nnUNet_raw") / model.dataset_name
    dataset_json = model.predictor.dataset_json
    ending = dataset_json.get("file_ending", ".nii.gz")
    n_channels = max(1, len(dataset_json.get("channel_names") or dataset_json.get("modality") or {}))
    found: dict[str, list[Path]] = {}
    missing: list[str] = []
    for case_id in case_ids:
        names = [f"{case_id}_{i:04d}{ending}" for i in range(n_channels)]
        for folder in ("imagesUnlabeled", "imagesTr"):
            paths = [raw / folder / name for name in names]
            if all(p.is_file() for p in paths):
                found[case_id] = paths
                break
        else:
            missing.append(case_id)
    if missing:
        raise QueryError(
            f"--export copies each case's images, and {raw} has none for {', '.join(missing[:8])} (looked for "
            f"CASE_0000{ending} ... in imagesUnlabeled/ and imagesTr/): is nnUNet_raw the folder prepare read?"
        )
    return found


def selection_columns(labels: Mapping[int, str]) -> list[str]:
    volume = [f"{_column_name(labels[v])}_ml" for v in sorted(labels)]
    return [
        "rank", "case", "strategy", "score", "reason", "images", "preannotation", "png", "save_label_as", *volume,
        "original_images",
    ]  # fmt: skip


def write_export(
    model: QueryModel,
    rows: Sequence[RankedCase],
    originals: Mapping[str, Sequence[Path]],
    staging: Path,
    logits_dir: Path,
    pngs: Mapping[str, Path],
    *,
    strategy: str,
    options: StrategyOptions,
    n_ranked: int,
    excluded: Sequence[str],
    final: Path,
) -> None:
    """Fill the staging folder: images (copied), pre-annotations, selection.csv, query.json (the settings, which
    ``prepare --add-labels`` records in rounds.json), README.txt and an empty labelsTr/.

    The pre-annotation is the query's own prediction (the one the ranking and the PNG show) written by nnU-Net's
    ``export_prediction_from_logits``: resampled to the original spacing, un-cropped, transposed back and saved with
    the image's header, exactly as ``predict`` writes segmentations. Paths in the CSV are relative to DIR, so the
    folder can be moved.
    """
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    predictor = model.predictor
    dataset_json = predictor.dataset_json
    ending = dataset_json.get("file_ending", ".nii.gz")
    folders = {key: staging / name for key, name in EXPORT_FOLDERS.items()}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(selection_columns(model.labels))
    threads = max(1, torch.get_num_threads())
    for row in rows:
        images = []
        for source in originals[row.case]:
            shutil.copyfile(source, folders["images"] / source.name)  # a copy: the folder travels to annotators
            images.append(f"{EXPORT_FOLDERS['images']}/{source.name}")
        logits = np.load(logits_file(logits_dir, row.case))
        export_prediction_from_logits(
            logits,
            model.load_properties(row.case),
            predictor.configuration_manager,
            predictor.plans_manager,
            dataset_json,
            str(folders["preannotations"] / row.case),
            save_probabilities=False,
            num_threads_torch=threads,
        )
        del logits
        volumes = [
            "" if row.voxels is None or row.voxel_ml is None else f"{row.voxels[label] * row.voxel_ml:.4f}"
            for label in sorted(model.labels)
        ]
        png = pngs.get(row.case)
        writer.writerow([
            row.rank,
            row.case,
            strategy,
            repr(float(row.score)),
            f"rank {row.rank} of {n_ranked} by {strategy}: {STRATEGIES[strategy].explain(row, options)}",
            ";".join(images),
            f"{EXPORT_FOLDERS['preannotations']}/{row.case}{ending}",
            f"{EXPORT_FOLDERS['png']}/{png.name}" if png is not None else "",
            f"{EXPORT_FOLDERS['labels']}/{row.case}{ending}",
            *volumes,
            ";".join(str(p) for p in originals[row.case]),
        ])  # fmt: skip
    (staging / SELECTION_CSV).write_text(buffer.getvalue())
    settings = export_settings(model, rows, strategy, options, n_ranked, excluded)
    (staging / QUERY_SETTINGS_NAME).write_text(json.dumps(settings, indent=2) + "\n")
    (staging / EXPORT_README).write_text(
        export_readme(model, rows, strategy, options, n_ranked, excluded, Path(final).resolve(), settings)
    )
    shutil.rmtree(logits_dir)


def export_settings(
    model: QueryModel,
    rows: Sequence[RankedCase],
    strategy: str,
    options: StrategyOptions,
    n_ranked: int,
    excluded: Sequence[str],
) -> dict[str, Any]:
    """What chose these cases (query.json): ``prepare --add-labels`` copies it into the round's rounds.json entry."""
    from nnfiltermatch.data.rounds import next_round, round_of_model_dir, split_model_folder_name

    init_args = model.checkpoint.get("init_args") or {}
    parts = split_model_folder_name(model.model_dir.name)
    return {
        "dataset": model.dataset_name,
        "strategy": strategy,
        "reduce": options.reduce,
        "roi": options.roi,
        "seed": options.seed,
        "min_foreground_ml": options.min_foreground_ml,
        "n": len(rows),
        "n_ranked": n_ranked,
        "n_excluded": len(excluded),
        "cases": [row.case for row in rows],
        "model_dir": str(model.model_dir.resolve()),
        "model_round": round_of_model_dir(model.model_dir),
        "folds": [str(f) for f in model.folds],
        "checkpoint": model.checkpoint_paths[0].name,
        "mode": str((trainer_state(model.checkpoint).get("config") or {}).get("mode") or "filtermatch"),
        "configuration": str(init_args.get("configuration") or (parts[2] if parts else "")),
        "plans": parts[1] if parts else None,
        "next_round": next_round(model.dataset_name, model.model_dir),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def export_readme(
    model: QueryModel,
    rows: Sequence[RankedCase],
    strategy: str,
    options: StrategyOptions,
    n_ranked: int,
    excluded: Sequence[str],
    final: Path,
    settings: Mapping[str, Any] | None = None,
) -> str:
    """What the folder holds and the commands of the next round, with this dataset's names and round filled in."""
    settings = settings or export_settings(model, rows, strategy, options, n_ranked, excluded)
    dataset_json = model.predictor.dataset_json
    ending = dataset_json.get("file_ending", ".nii.gz")
    configuration, mode, k = settings["configuration"], settings["mode"], int(settings["next_round"])
    plans = f" -p {settings['plans']}" if settings.get("plans") not in (None, "nnUNetPlans") else ""
    model_args = f"-d {model.dataset_name} -c {configuration} -f {model.folds[0]} --mode {mode}{plans} --round {k}"
    label_values = ", ".join(f"{value} {name}" for name, value in (dataset_json.get("labels") or {}).items())
    spec = STRATEGIES[strategy]
    how = f"{strategy} ({options.reduce}{', ROI' if options.roi else ''})" if spec.voxel_map else strategy
    if spec.voxel_map is None:
        how += f" (seed {options.seed})"
    left_out = (
        f"\n{len(excluded)} case(s) were left out: predicted foreground at most {options.min_foreground_ml:g} mL."
        if excluded
        else ""
    )
    first = rows[0].case if rows else "CASE"
    labels_dir = final / EXPORT_FOLDERS["labels"]
    folds = " ".join(str(f) for f in model.folds)
    lines = [
        f"nnFilterMatch query export: {len(rows)} case(s) of {model.dataset_name} to annotate",
        "",
        f"Chosen by {how} with the model {model.model_dir} (fold(s) {folds}),",
        f"on {time.strftime('%Y-%m-%d %H:%M')}: the top {len(rows)} of {n_ranked} ranked unlabelled case(s).{left_out}",
        f"{SELECTION_CSV} gives each case's rank, score and the reason it was picked, and the files below;",
        f"{QUERY_SETTINGS_NAME} the query's settings. Once added, these labels are annotation round {k}.",
        "",
        "What is here",
        f"  {EXPORT_FOLDERS['images']}/          "
        f"the images to annotate (copies), CASE_0000{ending}: one file per channel",
        f"  {EXPORT_FOLDERS['preannotations']}/  the model's segmentation of each case in the image's own geometry:",
        "                   a starting point to correct, not ground truth",
        f"  {EXPORT_FOLDERS['png']}/             the most uncertain slice of each case: image, prediction, uncertainty",
        f"  {EXPORT_FOLDERS['labels']}/        empty: the corrected masks go here",
        "",
        "What to do next",
        f"  1. For each case, e.g. {first}: open {EXPORT_FOLDERS['images']}/{first}_0000{ending} in ITK-SNAP or",
        f"     3D Slicer and load {EXPORT_FOLDERS['preannotations']}/{first}{ending} as its segmentation.",
        f"  2. Correct it. Label values (dataset.json): {label_values}.",
        f"  3. Save the corrected mask as {EXPORT_FOLDERS['labels']}/{first}{ending}: the case name without _0000, the",
        "     image's geometry. Only cases with a file there are added; the others stay unlabelled. Do not copy an",
        "     uncorrected pre-annotation there: it would become ground truth.",
        "  4. Move the cases to the labelled set (validated, preprocessed with the existing plans, no re-planning);",
        f"     this records round {k} in rounds.json (the cases, this query's settings from {QUERY_SETTINGS_NAME}):",
        f"       nnfiltermatch prepare -d {model.dataset_name} --add-labels {shlex.quote(str(labels_dir))}",
        "     (if this folder was moved, use its new path; if only labelsTr/ was moved, add --query-export and",
        f"     this folder, {final}).",
        f"  5. Train round {k}'s model into its own folder, so the model that chose these cases stays as it is:",
        f"       nnfiltermatch train {model_args}",
        "  6. See the rounds (labelled cases and validation Dice per round) in the report of the new model:",
        f"       nnfiltermatch report {model_args}",
        f"  7. The next round: query round {k}'s model the same way, into a new folder:",
        f"       nnfiltermatch query {model_args} --strategy {strategy} -n {len(rows)} "
        f"--export {shlex.quote(str(final.with_name(_next_export_name(final.name, k + 1))))}",
        "",
    ]
    return "\n".join(lines)


def _next_export_name(name: str, round_number: int) -> str:
    """round1 -> round2; other names get a suffix: the next export must not replace this one."""
    import re

    match = re.fullmatch(r"(.*?)(\d+)", name)
    return f"{match[1]}{round_number}" if match else f"{name}_round{round_number}"
