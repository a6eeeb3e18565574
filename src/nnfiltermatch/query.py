"""Active learning: which unlabelled cases should be annotated next, and a folder for the annotators.

nnFilterMatch's filter keeps the uncertain cases for training but never tells the user which ones to label. This
module scores every case of the preprocessed unlabelled folder (``imagesUnlabeled`` and, in a label-budget
simulation, the unlabelled ``imagesTr`` cases) with nnU-Net's sliding-window predictor, exactly as the filter does
(no mirroring, the filter's tile step, the same per-case reduction), and writes a ranking: first pick first.

Strategies (:data:`STRATEGIES`, name -> :class:`Strategy`; a new one is one entry). Uncertainty strategies rank by
a voxel map reduced per case by :func:`nnfiltermatch.uncertainty.reduce_case_score`:

* ``entropy``: Shannon entropy of the softmax (the filter's score; the strongest simple choice in the literature);
* ``margin``: ``1 - (p1 - p2)`` of the two most likely classes;
* ``tta-variance``: variance of the softmax over the test-time flips (every combination of the predictor's mirror
  axes, the identity included), averaged over classes. It costs one prediction per flip (8 for 3D).

The baselines an uncertainty ranking has to beat (nnActive, TMLR 2025: none of the query methods it tested beat
foreground-aware random selection reliably) order the cases by a seeded draw instead (:func:`random_draw`):

* ``random``: every case, in random order; needs no prediction;
* ``foreground-random``: only the cases whose predicted foreground exceeds ``min_foreground_ml``, in the same random
  order. nnActive's foreground-aware baseline samples patches around the *true* foreground, an oracle a real
  annotation round does not have; per case and from the model's prediction is the version a user can run.

``--roi`` restricts the map to the bounding box of the predicted foreground plus a margin, so a small structure in
a large, easy background is not drowned out; the whole image is used when nothing is predicted.

Reuse of filter scores: a filter round at the start of epoch ``e`` scores the pool with the weights after ``e``
completed epochs; nnU-Net stores ``current_epoch`` = completed epochs in every checkpoint. So when the last round's
epoch equals the checkpoint's ``current_epoch`` and the round scored the same way (entropy, same reduction, no
mirroring, same tile step, with the student network that the checkpoint holds, not an EMA teacher), its scores
are exactly what a new computation would give, and they are reused. :func:`decide_reuse` spells this out.

Export (``--export DIR``): the top N cases' images (copied: annotators move folders), the model's segmentation as a
pre-annotation in each image's own geometry (nnU-Net's ``export_prediction_from_logits``, the path ``predict``
writes through: resampling, un-cropping and the image's header are nnU-Net's), the PNGs, ``selection.csv`` (why
each case was picked), ``query.json`` (the settings, recorded in rounds.json by ``prepare --add-labels``) and a
README.txt with the next round's commands. DIR appears complete or not at all (written under a
temporary name, then renamed).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import shlex
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nnfiltermatch.files import atomic_write_bytes
from nnfiltermatch.rounds import QUERY_SETTINGS_NAME
from nnfiltermatch.runs import (
    LATEST_QUERY,
    checkpoint_files,
    collect_filter_rounds,
    load_checkpoint_safely,
    read_model_folder,
    trainer_state,
)
from nnfiltermatch.uncertainty import margin_map, reduce_case_score, voxel_entropy

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

REDUCTIONS: tuple[str, ...] = ("mean", "topk")
REUSE_POLICIES: tuple[str, ...] = ("auto", "never")
DEFAULT_STEP_SIZE = 0.5  # nnU-Net's, for models without a recorded filter tile step
DEFAULT_PNG_TOP = 5
DEFAULT_SEED = 0
DEFAULT_MIN_FOREGROUND_ML = 0.1  # below this, a predicted "structure" is a few stray voxels, not something to draw
DISPLAY_MAP = "entropy"  # the voxel map shown (and predicted) for strategies that rank without one
SELECTION_CSV = "selection.csv"
EXPORT_README = "README.txt"
EXPORT_FOLDERS = {"images": "images", "preannotations": "preannotations", "png": "png", "labels": "labelsTr"}


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
    config = trainer_state(checkpoint).get("config") or {}
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
    # round files of older versions may mark cases "source": "running" (the removed --filter-scoring running):
    # those scores came from training crops, not from this network's sliding window, so they are not reused
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
        from nnfiltermatch.layout import MANIFEST_NAME, preprocessed_root
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

    def load_properties(self, case_id: str) -> dict[str, Any]:
        """nnU-Net's preprocessing record of the case (crop box, spacing, image header): what its export needs."""
        from nnfiltermatch.unlabeled import UnlabeledDataset

        return UnlabeledDataset(str(self.unlabeled_dir), [case_id]).load_properties(case_id)

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
    from nnfiltermatch.inference import load_predictor
    from nnfiltermatch.install import recover_interrupted_install
    from nnfiltermatch.layout import MANIFEST_NAME, preprocessed_root, unlabeled_folder

    model_dir = Path(model_dir)
    plans, dataset_json = read_model_folder(model_dir)
    files = checkpoint_files(model_dir, list(folds) if folds else None, checkpoint)
    first = load_checkpoint_safely(files[0][1])
    first.pop("network_weights", None)
    first.pop("optimizer_state", None)
    state = trainer_state(first)
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
    recover_interrupted_install(dataset_name)  # the manifest and unlabelled folder below must be one install's
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
    """Mean class probabilities and the logits an export starts from; with test-time augmentation also the voxel
    variance over the flips, and logits averaged over the flips (nnU-Net's mirroring averages logits too)."""

    probs: torch.Tensor
    tta_variance: torch.Tensor | None = None
    logits: torch.Tensor | None = None

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
        logits = predictor.predict_logits_from_preprocessed_data(data).float()
        return CasePrediction(torch.softmax(logits, dim=0), logits=logits)
    combos = flip_combinations(predictor.allowed_mirroring_axes)
    if len(combos) < 2:
        raise QueryError("tta-variance needs mirror axes, and this model allows none (its plan disables mirroring)")
    # mirror axes count the patch's spatial axes; a 2D model's data has one more (the slice axis) in front
    offset = 1 + (data.ndim - 1 - len(predictor.configuration_manager.patch_size))
    total = squares = logit_sum = None
    for combo in combos:
        dims = [a + offset for a in combo]
        view = torch.flip(data, dims) if dims else data
        logits = predictor.predict_logits_from_preprocessed_data(view).float()
        if dims:
            logits = torch.flip(logits, dims)
        probs = torch.softmax(logits, dim=0)
        total = probs if total is None else total + probs
        squares = probs * probs if squares is None else squares + probs * probs
        logit_sum = logits if logit_sum is None else logit_sum + logits
    assert total is not None and squares is not None and logit_sum is not None
    mean = total / len(combos)
    variance = (squares / len(combos) - mean * mean).clamp_min(0.0).mean(dim=0)
    return CasePrediction(mean, variance, logit_sum / len(combos))


# ----- the ranking ------------------------------------------------------------------------------------------------
@dataclass
class RankedCase:
    case: str
    score: float  # what the ranking sorts by, highest first: the case's uncertainty, or a strategy's random draw
    source: str  # "computed", "reused" (from a filter round) or "drawn" (a random strategy's draw)
    voxels: dict[int, int] | None = None  # foreground label -> predicted voxels (None: not predicted)
    voxel_ml: float | None = None
    rank: int = 0

    @property
    def foreground_ml(self) -> float | None:
        """Predicted foreground of all labels together in mL; None when the case was not predicted."""
        if self.voxels is None or self.voxel_ml is None:
            return None
        return sum(self.voxels.values()) * self.voxel_ml


# ----- strategies -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StrategyOptions:
    """Every setting a strategy may read, in one object: a new strategy needs an entry, not new plumbing."""

    seed: int = DEFAULT_SEED
    min_foreground_ml: float = DEFAULT_MIN_FOREGROUND_ML
    reduce: str = "mean"
    roi: bool = False


@dataclass(frozen=True)
class Strategy:
    """How a strategy orders the pool: what must be predicted first, each case's priority (highest first; None
    leaves the case out of the ranking) and the words for why a case was picked."""

    summary: str
    voxel_map: str | None  # the uncertainty map reduced per case (see uncertainty_map); None: ranks by a draw
    predicts: bool  # every case is predicted first (for its uncertainty or its predicted foreground)
    priority: Callable[[RankedCase, StrategyOptions], float | None]
    explain: Callable[[RankedCase, StrategyOptions], str]

    @property
    def shown_map(self) -> str:
        """The voxel map the PNGs show (and score_cases computes): a random strategy shows the entropy."""
        return self.voxel_map or DISPLAY_MAP


def random_draw(seed: int, case: str) -> float:
    """A uniform number in [0, 1) fixed by the seed and the case ID alone.

    Why a hash rather than a generator stepping through the pool: a case keeps its draw whatever else is in the
    pool, so a random ranking is reproducible across machines and Python versions, a ``--cases`` subset ranks as
    in the full pool, and foreground-random picks exactly random's order restricted to its eligible cases.
    """
    digest = hashlib.sha256(f"nnfiltermatch-query:{seed}:{case}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def _by_uncertainty(row: RankedCase, options: StrategyOptions) -> float | None:
    return row.score


def _by_draw(row: RankedCase, options: StrategyOptions) -> float | None:
    return random_draw(options.seed, row.case)


def _by_draw_with_foreground(row: RankedCase, options: StrategyOptions) -> float | None:
    volume = row.foreground_ml
    if volume is None:
        raise ValueError(f"foreground-random needs the prediction of {row.case}; it was not predicted")
    return random_draw(options.seed, row.case) if volume > options.min_foreground_ml else None


def _explain_uncertainty(row: RankedCase, options: StrategyOptions) -> str:
    return f"per-case {options.reduce}{' in the ROI' if options.roi else ''} = {row.score:.4g} ({row.source})"


def _explain_draw(row: RankedCase, options: StrategyOptions) -> str:
    return f"random draw {row.score:.4f} (seed {options.seed})"


def _explain_draw_with_foreground(row: RankedCase, options: StrategyOptions) -> str:
    volume = row.foreground_ml
    return (
        f"predicted foreground {volume:.3g} mL > {options.min_foreground_ml:g} mL; random draw {row.score:.4f} "
        f"(seed {options.seed})"
    )


STRATEGIES: dict[str, Strategy] = {
    "entropy": Strategy(
        "Shannon entropy of the softmax, per case (the filter's score)",
        "entropy",
        True,
        _by_uncertainty,
        _explain_uncertainty,
    ),
    "margin": Strategy(
        "1 - (p1 - p2) of the two most likely classes", "margin", True, _by_uncertainty, _explain_uncertainty
    ),
    "tta-variance": Strategy(
        "variance of the softmax over the test-time flips (one prediction per flip)",
        "tta-variance",
        True,
        _by_uncertainty,
        _explain_uncertainty,
    ),
    "random": Strategy("every case in a seeded random order (no prediction)", None, False, _by_draw, _explain_draw),
    "foreground-random": Strategy(
        "the seeded random order, among cases whose predicted foreground exceeds --min-foreground-ml",
        None,
        True,
        _by_draw_with_foreground,
        _explain_draw_with_foreground,
    ),
}
SCORE_TYPES: tuple[str, ...] = tuple(name for name, s in STRATEGIES.items() if s.voxel_map is not None)


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
    strategy: str = "entropy"
    reduce: str = "mean"
    seed: int = DEFAULT_SEED
    excluded: list[str] = field(default_factory=list)  # cases the strategy left out (foreground-random)
    export_dir: Path | None = None
    latest_error: str | None = None  # why MODEL_DIR/query_latest.json could not be written (None: it was)

    @property
    def n_reused(self) -> int:
        return sum(1 for r in self.ranking if r.source == "reused")


def _validate_options(
    strategy: str,
    reduce: str,
    topk_fraction: float,
    roi_margin: int,
    top_n: int | None,
    roi: bool = False,
    min_foreground_ml: float = DEFAULT_MIN_FOREGROUND_ML,
) -> None:
    problems = []
    if strategy not in STRATEGIES:
        problems.append(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    elif roi and STRATEGIES[strategy].voxel_map is None:
        problems.append(f"--roi restricts an uncertainty score to a box, and {strategy} ranks by a draw: leave it out")
    if reduce not in REDUCTIONS:
        problems.append(f"--reduce {reduce!r}: choose one of {', '.join(REDUCTIONS)}")
    if not 0.0 < topk_fraction <= 1.0:
        problems.append(f"--topk-fraction must be in (0, 1], got {topk_fraction}")
    if roi_margin < 0:
        problems.append(f"--roi-margin must be >= 0, got {roi_margin}")
    if top_n is not None and top_n < 1:
        problems.append(f"-n must be >= 1, got {top_n}")
    if not min_foreground_ml >= 0.0:
        problems.append(f"--min-foreground-ml must be >= 0, got {min_foreground_ml}")
    if problems:
        raise QueryError("; ".join(problems))


def _logits_file(folder: Path, case_id: str) -> Path:
    return folder / f"{case_id}.npy"


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
    priority: Callable[[RankedCase], float | None] | None = None,
    logits_dir: Path | None = None,
) -> tuple[dict[str, RankedCase], dict[str, _Slice]]:
    """Predict and score the given cases (``score``: the voxel map).

    What a shown case needs is kept only for the ``keep_slices`` cases of highest ``priority`` (default: the
    score; None: never shown): its PNG slice, and with ``logits_dir`` its logits for the export's pre-annotation
    (``<case>.npy`` there, deleted when the case drops out), so memory and disk stay bounded by N, not the pool.
    """
    from tqdm import tqdm

    rank_key = priority or (lambda row: row.score)
    results: dict[str, RankedCase] = {}
    slices: dict[str, _Slice] = {}
    kept: dict[str, float] = {}
    for case_id in tqdm(case_ids, desc=f"scoring ({score})", unit="case", disable=not progress):
        data, properties = model.load_case(case_id)
        with torch.no_grad():
            prediction = predict_case(model.predictor, data, tta=score == "tta-variance")
        segmentation = prediction.segmentation
        umap = uncertainty_map(prediction.probs, score, prediction.tta_variance)
        value = case_score(umap, segmentation, reduce, topk_fraction, roi, roi_margin)
        counts = torch.bincount(segmentation.reshape(-1), minlength=max(model.labels, default=0) + 1)
        row = RankedCase(
            case_id,
            value,
            "computed",
            {label: int(counts[label]) for label in model.labels},
            model.voxel_volume_ml(properties, segmentation.ndim),
        )
        results[case_id] = row
        key = rank_key(row) if keep_slices > 0 else None
        if key is None:
            continue
        kept[case_id] = key
        index = most_uncertain_slice(umap)
        slices[case_id] = _Slice(
            index, data[0, index].numpy().copy(), segmentation[index].numpy().copy(), umap[index].numpy().copy()
        )
        if logits_dir is not None:
            assert prediction.logits is not None
            np.save(_logits_file(logits_dir, case_id), prediction.logits.cpu().numpy())
        if len(kept) > keep_slices:  # the last in ranking order (-priority, case) can no longer reach the top N
            drop = max(kept, key=lambda c: (-kept[c], c))
            del kept[drop], slices[drop]
            if logits_dir is not None:
                _logits_file(logits_dir, drop).unlink(missing_ok=True)
    return results, slices


def run_query(
    model_dir: Path,
    folds: Sequence[str | int] | None = None,
    checkpoint: str = "final",
    device: str = "cpu",
    strategy: str = "entropy",
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
    seed: int = DEFAULT_SEED,
    min_foreground_ml: float = DEFAULT_MIN_FOREGROUND_ML,
    export: Path | None = None,
    overwrite: bool = False,
) -> QueryResult:
    """Rank the unlabelled cases, first pick first; write the CSV (atomically), the top cases' PNGs and, with
    ``export``, the annotation folder of the top ``top_n`` (see :func:`write_export`).

    ``output`` None: ``<model_dir>/query_ranking_<strategy>.csv``; ``png_dir`` None: ``<csv stem>_png`` beside it
    (with ``export``: ``export/png``, one PNG per exported case). ``cases`` restricts the query to some unlabelled
    cases (tests, quick looks). Everything that can be refused (options, the export folder, missing raw images) is
    refused before the first prediction.
    """
    start = time.time()
    _validate_options(strategy, reduce, topk_fraction, roi_margin, top_n, roi, min_foreground_ml)
    if png_top < 0:
        raise QueryError(f"--png-top must be >= 0, got {png_top}")
    target = Path(export) if export is not None else None
    if target is not None:
        if top_n is None:
            raise QueryError("--export needs -n N: how many of the top cases to hand to the annotators")
        if png_dir is not None:
            raise QueryError("--export writes one PNG per exported case into DIR/png: leave --png-dir out")
        check_export_target(target, overwrite)
    chosen = STRATEGIES[strategy]
    options = StrategyOptions(seed, min_foreground_ml, reduce, roi)
    model = load_query_model(model_dir, folds, checkpoint, device, step_size)
    available = model.case_ids()
    if cases is not None:
        unknown = sorted(set(cases) - set(available))
        if unknown:
            raise QueryError(f"not unlabelled cases of {model.dataset_name}: {', '.join(unknown[:8])}")
        available = [c for c in available if c in set(cases)]
    originals = raw_image_files(model, available) if target is not None else {}
    if chosen.voxel_map is not None:
        rounds = collect_filter_rounds(model.fold_dir, model.checkpoint)
        decision = decide_reuse(
            model.checkpoint,
            rounds,
            score=chosen.voxel_map,
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
    elif chosen.predicts:
        decision = ReuseDecision({}, None, f"{strategy} needs each case's predicted foreground, which no round records")
    else:
        decision = ReuseDecision({}, None, f"{strategy} draws its order and needs no scores")
    reused = decision.scores
    to_compute = [c for c in available if c not in reused]
    n_show = top_n if target is not None else (min(png_top, top_n) if top_n is not None else png_top)

    staging = _staging_folder(target) if target is not None else None
    try:
        logits_dir = staging / ".logits" if staging is not None else None
        if logits_dir is not None:
            logits_dir.mkdir(parents=True)

        def priority(row: RankedCase) -> float | None:
            return chosen.priority(row, options)

        if chosen.predicts:
            computed, slices = score_cases(
                model,
                to_compute,
                chosen.shown_map,
                reduce,
                topk_fraction,
                roi,
                roi_margin,
                keep_slices=n_show,
                progress=progress,
                priority=priority,
                logits_dir=logits_dir,
            )
        else:
            computed, slices = {c: RankedCase(c, math.nan, "drawn") for c in to_compute}, {}
        results = {**{c: RankedCase(c, s, "reused") for c, s in reused.items()}, **computed}
        ranking: list[RankedCase] = []
        excluded: list[str] = []
        for case_id, row in results.items():
            value = priority(row)
            if value is None:
                excluded.append(case_id)
                continue
            row.score = float(value)
            if chosen.voxel_map is None:
                row.source = "drawn"
            ranking.append(row)
        ranking.sort(key=lambda r: (-r.score, r.case))
        for i, row in enumerate(ranking, start=1):
            row.rank = i
        listed = ranking[:top_n] if top_n is not None else ranking

        top = listed[:n_show]
        missing = [
            r.case
            for r in top
            if r.case not in slices or (logits_dir is not None and not _logits_file(logits_dir, r.case).is_file())
        ]
        if missing:  # reused scores or random draws: predict the shown cases now (their score stays)
            extra, extra_slices = score_cases(
                model,
                missing,
                chosen.shown_map,
                reduce,
                topk_fraction,
                roi,
                roi_margin,
                keep_slices=len(missing),
                progress=False,
                logits_dir=logits_dir,
            )
            for case_id, row in extra.items():
                results[case_id].voxels, results[case_id].voxel_ml = row.voxels, row.voxel_ml
            slices.update(extra_slices)

        if target is not None and not top:
            raise QueryError(
                f"--export {target}: nothing to export, {strategy} ranked none of the {len(results)} case(s) "
                f"({len(excluded)} left out{': predicted foreground <= --min-foreground-ml' if excluded else ''})"
            )
        csv_path = Path(output) if output is not None else model.model_dir / f"query_ranking_{strategy}.csv"
        write_ranking_csv(listed, model.labels, csv_path, lambda row: chosen.explain(row, options))
        pngs: list[Path] = []
        if top:
            if staging is not None:
                folder = staging / EXPORT_FOLDERS["png"]
            else:
                folder = Path(png_dir) if png_dir is not None else csv_path.with_name(csv_path.stem + "_png")
            folder.mkdir(parents=True, exist_ok=True)
            for row in top:
                png = folder / f"{row.rank:03d}_{row.case}.png"
                render_case_png(
                    slices[row.case], row, png_caption(row, strategy, options), chosen.shown_map, model.labels, png
                )
                pngs.append(png)
        export_dir = None
        if staging is not None and target is not None and logits_dir is not None:
            write_export(
                model,
                top,
                originals,
                staging,
                logits_dir,
                {row.case: png for row, png in zip(top, pngs)},
                strategy=strategy,
                options=options,
                n_ranked=len(ranking),
                excluded=excluded,
                final=target,
            )
            export_dir = install_export(staging, target, overwrite)
            pngs = [export_dir / EXPORT_FOLDERS["png"] / p.name for p in pngs]
    finally:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    latest = {
        "ranking": str(csv_path.resolve()),
        "strategy": strategy,
        "reduce": reduce,
        "roi": roi,
        "seed": seed,
        "min_foreground_ml": min_foreground_ml,
        "folds": [str(f) for f in model.folds],
        "checkpoint": model.checkpoint_paths[0].name,
        "n_ranked": len(ranking),
        "n_listed": len(listed),
        "n_excluded": len(excluded),
        "pngs": str(pngs[0].parent.resolve()) if pngs else None,
        "export": str(export_dir.resolve()) if export_dir is not None else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    latest_error = None
    try:  # a read-only model folder must not fail a finished query: the ranking is written
        atomic_write_bytes(model.model_dir / LATEST_QUERY, (json.dumps(latest, indent=2) + "\n").encode())
    except OSError as exc:
        latest_error = f"cannot write {model.model_dir / LATEST_QUERY}: {exc.strerror or exc}"
    return QueryResult(
        ranking=listed,
        total_cases=len(ranking),
        decision=decision,
        csv_path=csv_path,
        pngs=pngs,
        seconds=time.time() - start,
        strategy=strategy,
        reduce=reduce,
        seed=seed,
        excluded=sorted(excluded),
        export_dir=export_dir,
        latest_error=latest_error,
    )


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
    view: _Slice, row: RankedCase, caption: str, voxel_map: str, labels: Mapping[int, str], target: Path
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


def format_ranking(result: QueryResult, labels: Mapping[int, str] | None = None, limit: int = 10) -> str:
    """A short text table of the top of the ranking, for the terminal."""
    lines = [f"{'rank':>4}  {'case':<24} {'score':>10}  source"]
    for row in result.ranking[:limit]:
        lines.append(f"{row.rank:>4}  {row.case:<24} {row.score:>10.5f}  {row.source}")
    if len(result.ranking) > limit:
        lines.append(f"  ... {len(result.ranking) - limit} more in the CSV")
    return "\n".join(lines)


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


def _staging_folder(target: Path) -> Path:
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
    from nnfiltermatch.layout import env_folder

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
        logits = np.load(_logits_file(logits_dir, row.case))
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
    from nnfiltermatch.rounds import next_round, round_of_model_dir, split_model_folder_name

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
