"""Active learning: which unlabelled cases should be annotated next, ranked by the trained model's uncertainty.

nnFilterMatch's filter keeps the uncertain cases for training but never tells the user which ones to label. This
module scores every case of the preprocessed unlabelled folder (``imagesUnlabeled`` and, in a label-budget
simulation, the unlabelled ``imagesTr`` cases) with nnU-Net's sliding-window predictor, exactly as the filter does
(no mirroring, the filter's tile step, the same per-case reduction), and writes a ranking: most uncertain first.

Scores (voxel maps, reduced per case by :func:`nnfiltermatch.uncertainty.reduce_case_score`):

* ``entropy``: Shannon entropy of the softmax (the filter's score; the strongest simple choice in the literature);
* ``margin``: ``1 - (p1 - p2)`` of the two most likely classes;
* ``tta-variance``: variance of the softmax over the test-time flips (every combination of the predictor's mirror
  axes, the identity included), averaged over classes. It costs one prediction per flip (8 for 3D).

``--roi`` restricts the map to the bounding box of the predicted foreground plus a margin, so a small structure in
a large, easy background is not drowned out; the whole image is used when nothing is predicted.

Reuse of filter scores: a filter round at the start of epoch ``e`` scores the pool with the weights after ``e``
completed epochs; nnU-Net stores ``current_epoch`` = completed epochs in every checkpoint. So when the last round's
epoch equals the checkpoint's ``current_epoch`` and the round scored the same way (entropy, same reduction, no
mirroring, same tile step, with the student network that the checkpoint holds, not an EMA teacher), its scores
are exactly what a new computation would give, and they are reused. :func:`decide_reuse` spells this out.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nnfiltermatch.files import atomic_write_bytes
from nnfiltermatch.uncertainty import margin_map, reduce_case_score, voxel_entropy

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

SCORE_TYPES: tuple[str, ...] = ("entropy", "margin", "tta-variance")
REDUCTIONS: tuple[str, ...] = ("mean", "topk")
REUSE_POLICIES: tuple[str, ...] = ("auto", "never")
DEFAULT_STEP_SIZE = 0.5  # nnU-Net's, for models without a recorded filter tile step
DEFAULT_PNG_TOP = 5
FILTER_DIRNAME = "filter_rounds"  # as the trainer writes it (kept here so query does not import the trainer)
STATE_KEY = "nnfiltermatch_state"


class QueryError(ValueError):
    """The query cannot run; the message names the file or option and the fix."""


# ----- pure pieces ------------------------------------------------------------------------------------------------
def bounding_box(mask: np.ndarray | torch.Tensor, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every non-zero voxel, grown by ``margin`` voxels and clipped to the array.

    None when the mask is empty, so the caller can fall back to the whole image.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    arr = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    if not arr.any():
        return None
    box = []
    for axis in range(arr.ndim):
        others = tuple(a for a in range(arr.ndim) if a != axis)
        present = np.flatnonzero(arr.any(axis=others)) if others else np.flatnonzero(arr)
        box.append(slice(max(0, int(present[0]) - margin), min(arr.shape[axis], int(present[-1]) + 1 + margin)))
    return tuple(box)


def uncertainty_map(probs: torch.Tensor, score: str, tta_variance: torch.Tensor | None = None) -> torch.Tensor:
    """The voxel map behind a score, from class probabilities ``(C, *spatial)``."""
    if score == "entropy":
        return voxel_entropy(probs, dim=0)
    if score == "margin":
        return margin_map(probs, dim=0)
    if score == "tta-variance":
        if tta_variance is None:
            raise ValueError("tta-variance needs the per-flip probabilities (predict with tta=True)")
        return tta_variance
    raise ValueError(f"score must be one of {', '.join(SCORE_TYPES)}, got {score!r}")


def case_score(
    umap: torch.Tensor,
    prediction: torch.Tensor,
    reduce: str = "mean",
    topk_fraction: float = 0.1,
    roi: bool = False,
    roi_margin: int = 5,
) -> float:
    """One number per case, as the filter reduces it; with ``roi`` only inside the predicted foreground's box."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    if roi:
        box = bounding_box(prediction > 0, roi_margin)
        if box is not None:
            umap = umap[box]
    return reduce_case_score(umap, reduce, topk_fraction)  # type: ignore[arg-type]


def most_uncertain_slice(umap: torch.Tensor) -> int:
    """Index along the first axis with the largest summed uncertainty: the slice a reviewer should look at."""
    if umap.ndim < 2:
        return 0
    return int(torch.argmax(umap.double().sum(dim=tuple(range(1, umap.ndim)))).item())


# ----- reuse of the last filter round -----------------------------------------------------------------------------
@dataclass
class ReuseDecision:
    """Which scores of a filter round can stand in for new ones, and why (or why not): printed to the user."""

    scores: dict[str, float]
    epoch: int | None
    reason: str

    @property
    def reused(self) -> bool:
        return bool(self.scores)


def collect_filter_rounds(fold_dir: Path, checkpoint: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rounds the checkpoint carries, plus ``filter_rounds/epoch_XXXX.json`` files of later rounds.

    A round at the start of epoch ``e`` runs after the checkpoint saved at the end of epoch ``e - 1``, so that
    checkpoint does not hold it: only the file does. Rounds in the checkpoint win over files of the same epoch.
    """
    state = (checkpoint.get("init_args") or {}).get(STATE_KEY) or {}
    rounds = {int(r["epoch"]): dict(r) for r in state.get("filter_rounds") or []}
    folder = Path(fold_dir) / FILTER_DIRNAME
    if folder.is_dir():
        for path in sorted(folder.glob("epoch_*.json")):
            try:
                record = json.loads(path.read_text())
                epoch = int(record["epoch"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a damaged record is simply not reused
            rounds.setdefault(epoch, record)
    return [rounds[e] for e in sorted(rounds)]


def decide_reuse(
    checkpoint: Mapping[str, Any],
    rounds: Sequence[Mapping[str, Any]],
    *,
    score: str,
    reduce: str,
    topk_fraction: float,
    roi: bool,
    step_size: float,
    n_folds: int = 1,
    policy: str = "auto",
) -> ReuseDecision:
    """Reuse the last filter round's scores only when they are what this query would compute.

    Conditions: policy ``auto``; score ``entropy`` without ``--roi``; one fold; the checkpoint holds the network
    that scored (the last round's ``epoch`` == the checkpoint's ``current_epoch``, i.e. no training step since, and
    the run's pseudo-labelling model is the student, not an EMA teacher); same reduction (and top-k fraction), no
    mirroring and the same tile step. Only cases the round scored by sliding window are reused.
    """

    def no(reason: str) -> ReuseDecision:
        return ReuseDecision({}, None, reason)

    if policy not in REUSE_POLICIES:
        raise QueryError(f"--reuse-filter-scores {policy!r}: choose one of {', '.join(REUSE_POLICIES)}")
    if policy == "never":
        return no("--reuse-filter-scores never")
    if score != "entropy":
        return no(f"the filter scores entropy, this query scores {score}")
    if roi:
        return no("the filter scored whole images, this query scores the --roi box")
    if n_folds != 1:
        return no(f"filter rounds belong to one fold, this query ensembles {n_folds}")
    if not rounds:
        return no("the model has no filter round")
    last = rounds[-1]
    state = (checkpoint.get("init_args") or {}).get(STATE_KEY) or {}
    config = state.get("config") or {}
    current = checkpoint.get("current_epoch")
    epoch = int(last["epoch"])
    if current is None or int(current) != epoch:
        return no(
            f"the last filter round (epoch {epoch}) scored the weights after {epoch} epochs, the checkpoint holds "
            f"those after {current}: the model changed since"
        )
    if config.get("teacher", "ema") != "student" and config.get("mode", "filtermatch") != "supervised":
        return no("the filter scored with the EMA teacher, the checkpoint's network is the student")
    if last.get("score") != reduce:
        return no(f"the filter reduced per case by {last.get('score')}, this query by {reduce}")
    if reduce == "topk" and not math.isclose(float(config.get("topk_fraction", -1.0)), topk_fraction):
        return no(f"the filter's top-k fraction was {config.get('topk_fraction')}, this query's is {topk_fraction}")
    if last.get("mirroring"):
        return no("the filter scored with mirroring, this query without")
    if not math.isclose(float(last.get("tile_step", -1.0)), step_size):
        return no(f"the filter's tile step was {last.get('tile_step')}, this query's is {step_size}")
    scores = {
        str(c["case"]): float(c["score"])
        for c in last.get("cases") or []
        if c.get("source", "window") == "window" and c.get("score") is not None and math.isfinite(float(c["score"]))
    }
    if not scores:
        return no(f"the filter round at epoch {epoch} scored no case by sliding window")
    return ReuseDecision(scores, epoch, f"the filter round at epoch {epoch} scored this checkpoint's network")


# ----- the model and its unlabelled cases -------------------------------------------------------------------------
@dataclass
class QueryModel:
    """A loaded model with what a query needs: the predictor, its unlabelled cases and how to measure volumes."""

    model_dir: Path
    folds: list[str | int]
    checkpoint_paths: list[Path]
    checkpoint: dict[str, Any]  # the first fold's, without weights
    predictor: nnUNetPredictor
    dataset_name: str
    unlabeled_dir: Path
    step_size: float
    labels: dict[int, str]  # foreground label -> name

    @property
    def fold_dir(self) -> Path:
        return self.checkpoint_paths[0].parent

    def case_ids(self) -> list[str]:
        """The cases of the preprocessed unlabelled folder, as far as the prepare manifest lists them."""
        from nnfiltermatch.preparation import MANIFEST_NAME, preprocessed_root
        from nnfiltermatch.unlabeled import UnlabeledDataset

        if not self.unlabeled_dir.is_dir():
            raise QueryError(
                f"no unlabelled cases: {self.unlabeled_dir} does not exist. Add images to imagesUnlabeled/ (or prepare "
                f"with a labelled list) and run `nnfiltermatch prepare -d {self.dataset_name}`"
            )
        found = UnlabeledDataset.get_identifiers(str(self.unlabeled_dir))
        manifest = preprocessed_root(self.dataset_name) / MANIFEST_NAME
        if manifest.is_file():
            listed = set(json.loads(manifest.read_text()).get("unlabeled_ids") or [])
            found = [c for c in found if c in listed]
        if not found:
            raise QueryError(
                f"no unlabelled cases in {self.unlabeled_dir}: nothing to rank (every case is labelled). Add images "
                "to imagesUnlabeled/ and rerun `nnfiltermatch prepare`."
            )
        return found

    def load_case(self, case_id: str) -> tuple[torch.Tensor, dict[str, Any]]:
        from nnfiltermatch.unlabeled import UnlabeledDataset

        dataset = UnlabeledDataset(str(self.unlabeled_dir), [case_id])
        data = torch.from_numpy(np.ascontiguousarray(dataset.load_data(case_id), dtype=np.float32))
        return data, dataset.load_properties(case_id)

    def voxel_volume_ml(self, properties: Mapping[str, Any], spatial_ndim: int) -> float:
        """Volume of one preprocessed voxel in mL (2D configurations: the through-plane spacing is not resampled)."""
        spacing = list(self.predictor.configuration_manager.spacing)
        if len(spacing) < spatial_ndim:
            transpose = self.predictor.plans_manager.transpose_forward
            spacing = [float(properties["spacing"][transpose[0]]), *spacing]
        return float(np.prod(spacing)) / 1000.0


def load_query_model(
    model_dir: Path,
    folds: Sequence[str | int] | None = None,
    checkpoint: str = "final",
    device: str = "cpu",
    step_size: float | None = None,
) -> QueryModel:
    """Load the predictor (no mirroring) and find the dataset's preprocessed unlabelled folder."""
    from nnfiltermatch.inference import checkpoint_files, load_checkpoint_safely, load_predictor, read_model_folder
    from nnfiltermatch.preparation import MANIFEST_NAME, preprocessed_root, unlabeled_folder

    model_dir = Path(model_dir)
    plans, dataset_json = read_model_folder(model_dir)
    files = checkpoint_files(model_dir, list(folds) if folds else None, checkpoint)
    first = load_checkpoint_safely(files[0][1])
    first.pop("network_weights", None)
    first.pop("optimizer_state", None)
    state = (first.get("init_args") or {}).get(STATE_KEY) or {}
    if step_size is None:
        step_size = float((state.get("config") or {}).get("filter_tile_step", DEFAULT_STEP_SIZE))
    predictor = load_predictor(
        model_dir, [f for f, _ in files], checkpoint, device, mirroring=False, step_size=step_size
    )
    configuration_manager = predictor.configuration_manager
    if configuration_manager.previous_stage_name is not None:
        raise QueryError(f"{model_dir} is a cascade stage: use a full-resolution or 2d model")
    dataset_name = str(plans.get("dataset_name") or model_dir.parent.name)
    data_identifier = configuration_manager.data_identifier
    manifest = preprocessed_root(dataset_name) / MANIFEST_NAME
    if manifest.is_file():
        plans_name = json.loads(manifest.read_text()).get("plans_name")
        prepared_plans = preprocessed_root(dataset_name) / f"{plans_name}.json"
        if prepared_plans.is_file():
            configuration = str((first.get("init_args") or {}).get("configuration") or model_dir.name.split("__")[-1])
            _check_same_preprocessing(plans, json.loads(prepared_plans.read_text()), configuration, prepared_plans)
    label_names = {}
    for name, value in (dataset_json.get("labels") or {}).items():
        if isinstance(value, int) and not isinstance(value, bool):
            label_names[value] = str(name)
    labels = {int(v): label_names.get(int(v), f"label{v}") for v in predictor.label_manager.foreground_labels}
    return QueryModel(
        model_dir=model_dir,
        folds=[f for f, _ in files],
        checkpoint_paths=[p for _, p in files],
        checkpoint=first,
        predictor=predictor,
        dataset_name=dataset_name,
        unlabeled_dir=unlabeled_folder(dataset_name, data_identifier),
        step_size=step_size,
        labels=labels,
    )


def _check_same_preprocessing(model_plans: dict, prepared_plans: dict, configuration: str, where: Path) -> None:
    """The unlabelled data must have been preprocessed with the model's plan, or the scores mean nothing."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        ours = PlansManager(model_plans).get_configuration(configuration)
        theirs = PlansManager(prepared_plans).get_configuration(configuration)
    except Exception:  # the configuration is not in both plans under this name: nothing reliable to compare
        return
    differences = [
        key
        for key in ("data_identifier", "spacing", "normalization_schemes", "use_mask_for_norm")
        if ours.configuration.get(key) != theirs.configuration.get(key)
    ]
    if differences or model_plans.get("transpose_forward") != prepared_plans.get("transpose_forward"):
        raise QueryError(
            f"the model's plans.json and {where} preprocess differently ({', '.join(differences) or 'transpose'}): "
            "the unlabelled folder was prepared for another plan. Rerun `nnfiltermatch prepare` with the model's "
            "plans, or query the model trained on this preparation."
        )


# ----- prediction -------------------------------------------------------------------------------------------------
@dataclass
class CasePrediction:
    """Mean class probabilities, and for test-time augmentation the voxel variance map over the flips."""

    probs: torch.Tensor
    tta_variance: torch.Tensor | None = None

    @property
    def segmentation(self) -> torch.Tensor:
        return self.probs.argmax(0)


def flip_combinations(mirror_axes: Iterable[int] | None) -> list[tuple[int, ...]]:
    """Every subset of the mirror axes, the identity first: the views nnU-Net's mirroring averages."""
    axes = tuple(mirror_axes or ())
    return [combo for k in range(len(axes) + 1) for combo in itertools.combinations(axes, k)]


def predict_case(predictor: Any, data: torch.Tensor, tta: bool = False) -> CasePrediction:
    """Softmax of nnU-Net's sliding-window logits (folds averaged as nnU-Net does), optionally per test-time flip."""
    if not tta:
        logits = predictor.predict_logits_from_preprocessed_data(data)
        return CasePrediction(torch.softmax(logits.float(), dim=0))
    combos = flip_combinations(predictor.allowed_mirroring_axes)
    if len(combos) < 2:
        raise QueryError("tta-variance needs mirror axes, and this model allows none (its plan disables mirroring)")
    # mirror axes count the patch's spatial axes; a 2D model's data has one more (the slice axis) in front
    offset = 1 + (data.ndim - 1 - len(predictor.configuration_manager.patch_size))
    total = squares = None
    for combo in combos:
        dims = [a + offset for a in combo]
        view = torch.flip(data, dims) if dims else data
        probs = torch.softmax(predictor.predict_logits_from_preprocessed_data(view).float(), dim=0)
        if dims:
            probs = torch.flip(probs, dims)
        total = probs if total is None else total + probs
        squares = probs * probs if squares is None else squares + probs * probs
    assert total is not None and squares is not None
    mean = total / len(combos)
    variance = (squares / len(combos) - mean * mean).clamp_min(0.0).mean(dim=0)
    return CasePrediction(mean, variance)


# ----- the ranking ------------------------------------------------------------------------------------------------
@dataclass
class RankedCase:
    case: str
    score: float
    source: str  # "computed" or "reused"
    voxels: dict[int, int] | None = None  # foreground label -> predicted voxels (None: not predicted)
    voxel_ml: float | None = None
    rank: int = 0


@dataclass
class _Slice:
    """What a case's PNG shows, kept only for the cases that may end up in the top N."""

    index: int
    image: np.ndarray
    segmentation: np.ndarray
    uncertainty: np.ndarray


@dataclass
class QueryResult:
    ranking: list[RankedCase]
    total_cases: int
    decision: ReuseDecision
    csv_path: Path | None
    pngs: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    score: str = "entropy"
    reduce: str = "mean"

    @property
    def n_reused(self) -> int:
        return sum(1 for r in self.ranking if r.source == "reused")


def _validate_options(score: str, reduce: str, topk_fraction: float, roi_margin: int, top_n: int | None) -> None:
    problems = []
    if score not in SCORE_TYPES:
        problems.append(f"--score {score!r}: choose one of {', '.join(SCORE_TYPES)}")
    if reduce not in REDUCTIONS:
        problems.append(f"--reduce {reduce!r}: choose one of {', '.join(REDUCTIONS)}")
    if not 0.0 < topk_fraction <= 1.0:
        problems.append(f"--topk-fraction must be in (0, 1], got {topk_fraction}")
    if roi_margin < 0:
        problems.append(f"--roi-margin must be >= 0, got {roi_margin}")
    if top_n is not None and top_n < 1:
        problems.append(f"-n must be >= 1, got {top_n}")
    if problems:
        raise QueryError("; ".join(problems))


def score_cases(
    model: QueryModel,
    case_ids: Sequence[str],
    score: str = "entropy",
    reduce: str = "mean",
    topk_fraction: float = 0.1,
    roi: bool = False,
    roi_margin: int = 5,
    keep_slices: int = 0,
    progress: bool = True,
) -> tuple[dict[str, RankedCase], dict[str, _Slice]]:
    """Predict and score the given cases; keeps the PNG slices of the ``keep_slices`` highest scores only."""
    from tqdm import tqdm

    results: dict[str, RankedCase] = {}
    slices: dict[str, _Slice] = {}
    for case_id in tqdm(case_ids, desc=f"scoring ({score})", unit="case", disable=not progress):
        data, properties = model.load_case(case_id)
        with torch.no_grad():
            prediction = predict_case(model.predictor, data, tta=score == "tta-variance")
        segmentation = prediction.segmentation
        umap = uncertainty_map(prediction.probs, score, prediction.tta_variance)
        value = case_score(umap, segmentation, reduce, topk_fraction, roi, roi_margin)
        counts = torch.bincount(segmentation.reshape(-1), minlength=max(model.labels, default=0) + 1)
        results[case_id] = RankedCase(
            case_id,
            value,
            "computed",
            {label: int(counts[label]) for label in model.labels},
            model.voxel_volume_ml(properties, segmentation.ndim),
        )
        if keep_slices > 0:
            index = most_uncertain_slice(umap)
            slices[case_id] = _Slice(
                index, data[0, index].numpy().copy(), segmentation[index].numpy().copy(), umap[index].numpy().copy()
            )
            if len(slices) > keep_slices:  # drop the lowest score: it can no longer reach the top N
                del slices[min(slices, key=lambda c: (results[c].score, c))]
    return results, slices


def run_query(
    model_dir: Path,
    folds: Sequence[str | int] | None = None,
    checkpoint: str = "final",
    device: str = "cpu",
    score: str = "entropy",
    reduce: str = "mean",
    topk_fraction: float = 0.1,
    roi: bool = False,
    roi_margin: int = 5,
    step_size: float | None = None,
    reuse: str = "auto",
    top_n: int | None = None,
    output: Path | None = None,
    png_dir: Path | None = None,
    png_top: int = DEFAULT_PNG_TOP,
    cases: Sequence[str] | None = None,
    progress: bool = True,
) -> QueryResult:
    """Rank the unlabelled cases, most uncertain first; write the CSV (atomically) and the top cases' PNGs.

    ``output`` None: ``<model_dir>/query_ranking_<score>.csv``; ``png_dir`` None: ``<csv stem>_png`` beside it.
    ``cases`` restricts the query to some unlabelled cases (tests, quick looks).
    """
    start = time.time()
    _validate_options(score, reduce, topk_fraction, roi_margin, top_n)
    if png_top < 0:
        raise QueryError(f"--png-top must be >= 0, got {png_top}")
    model = load_query_model(model_dir, folds, checkpoint, device, step_size)
    available = model.case_ids()
    if cases is not None:
        unknown = sorted(set(cases) - set(available))
        if unknown:
            raise QueryError(f"not unlabelled cases of {model.dataset_name}: {', '.join(unknown[:8])}")
        available = [c for c in available if c in set(cases)]
    rounds = collect_filter_rounds(model.fold_dir, model.checkpoint)
    decision = decide_reuse(
        model.checkpoint,
        rounds,
        score=score,
        reduce=reduce,
        topk_fraction=topk_fraction,
        roi=roi,
        step_size=model.step_size,
        n_folds=len(model.folds),
        policy=reuse,
    )
    wanted = set(available)
    reused = {c: s for c, s in decision.scores.items() if c in wanted}
    if decision.reused and not reused:
        decision = ReuseDecision({}, None, f"the filter round at epoch {decision.epoch} scored none of these cases")
    else:
        decision = ReuseDecision(reused, decision.epoch, decision.reason)
    to_compute = [c for c in available if c not in reused]
    n_png = min(png_top, top_n) if top_n is not None else png_top
    computed, slices = score_cases(
        model, to_compute, score, reduce, topk_fraction, roi, roi_margin, keep_slices=n_png, progress=progress
    )
    results = {**{c: RankedCase(c, s, "reused") for c, s in reused.items()}, **computed}
    ranking = sorted(results.values(), key=lambda r: (-r.score, r.case))
    for i, row in enumerate(ranking, start=1):
        row.rank = i
    listed = ranking[:top_n] if top_n is not None else ranking

    top = listed[:n_png]
    missing = [r.case for r in top if r.case not in slices]
    if missing:  # reused scores: predict the shown cases now (their score stays the reused one)
        extra, extra_slices = score_cases(
            model, missing, score, reduce, topk_fraction, roi, roi_margin, keep_slices=len(missing), progress=False
        )
        for case_id, row in extra.items():
            results[case_id].voxels, results[case_id].voxel_ml = row.voxels, row.voxel_ml
        slices.update(extra_slices)

    csv_path = Path(output) if output is not None else model.model_dir / f"query_ranking_{score}.csv"
    write_ranking_csv(listed, model.labels, csv_path)
    pngs: list[Path] = []
    if top:
        folder = Path(png_dir) if png_dir is not None else csv_path.with_name(csv_path.stem + "_png")
        folder.mkdir(parents=True, exist_ok=True)
        for row in top:
            target = folder / f"{row.rank:03d}_{row.case}.png"
            render_case_png(slices[row.case], row, score, reduce, roi, model.labels, target)
            pngs.append(target)
    return QueryResult(
        ranking=listed,
        total_cases=len(ranking),
        decision=decision,
        csv_path=csv_path,
        pngs=pngs,
        seconds=time.time() - start,
        score=score,
        reduce=reduce,
    )


def _column_name(name: str) -> str:
    return "_".join(name.split()) or "label"


def ranking_columns(labels: Mapping[int, str]) -> list[str]:
    volume = [f"{_column_name(labels[v])}_{unit}" for v in sorted(labels) for unit in ("voxels", "ml")]
    return ["rank", "case", "score", *volume, "source"]


def write_ranking_csv(rows: Sequence[RankedCase], labels: Mapping[int, str], path: Path) -> Path:
    """The ranking as CSV, written to a temporary file and renamed: readers never see half a ranking."""
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
        writer.writerow([row.rank, row.case, repr(float(row.score)), *volumes, row.source])
    return atomic_write_bytes(path, buffer.getvalue().encode())


def render_case_png(
    view: _Slice, row: RankedCase, score: str, reduce: str, roi: bool, labels: Mapping[int, str], target: Path
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
    for ax, title in zip(axes, ("image", "prediction", f"{score} (voxel map)")):
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    how = f"{reduce}{', ROI' if roi else ''}"
    fig.suptitle(f"#{row.rank}  {row.case}   {score} ({how}) = {row.score:.4g}   slice {view.index}", fontsize=12)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return atomic_write_bytes(target, buffer.getvalue())


def format_ranking(result: QueryResult, labels: Mapping[int, str] | None = None, limit: int = 10) -> str:
    """A short text table of the top of the ranking, for the terminal."""
    lines = [f"{'rank':>4}  {'case':<24} {'score':>10}  source"]
    for row in result.ranking[:limit]:
        lines.append(f"{row.rank:>4}  {row.case:<24} {row.score:>10.5f}  {row.source}")
    if len(result.ranking) > limit:
        lines.append(f"  ... {len(result.ranking) - limit} more in the CSV")
    return "\n".join(lines)
