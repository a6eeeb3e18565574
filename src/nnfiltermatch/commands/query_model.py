"""The model a query ranks with: loaded with its unlabelled cases, predicting a case, scoring cases one by one.

The predictor is nnU-Net's sliding window, set up as the filter scores (no mirroring, the filter's tile step); the
unlabelled folder must have been preprocessed with the model's plan. ``tta-variance`` predicts once per test-time
flip. :func:`score_cases` keeps what a shown case needs (its PNG slice, its logits for the export) only for the cases
that may still reach the top N, so memory and disk stay bounded by N, not by the pool.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from nnfiltermatch.method.query_scores import case_score, most_uncertain_slice, uncertainty_map
from nnfiltermatch.method.query_strategies import RankedCase
from nnfiltermatch.runs import checkpoint_files, load_checkpoint_safely, read_model_folder, trainer_state

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

DEFAULT_STEP_SIZE = 0.5  # nnU-Net's, for models without a recorded filter tile step


class QueryError(ValueError):
    """The query cannot run; the message names the file or option and the fix."""


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
        from nnfiltermatch.data.layout import MANIFEST_NAME, preprocessed_root
        from nnfiltermatch.nnunet.unlabeled import UnlabeledDataset

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
        from nnfiltermatch.nnunet.unlabeled import UnlabeledDataset

        dataset = UnlabeledDataset(str(self.unlabeled_dir), [case_id])
        data = torch.from_numpy(np.ascontiguousarray(dataset.load_data(case_id), dtype=np.float32))
        return data, dataset.load_properties(case_id)

    def load_properties(self, case_id: str) -> dict[str, Any]:
        """nnU-Net's preprocessing record of the case (crop box, spacing, image header): what its export needs."""
        from nnfiltermatch.nnunet.unlabeled import UnlabeledDataset

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
    from nnfiltermatch.data.install import recover_interrupted_install
    from nnfiltermatch.data.layout import MANIFEST_NAME, preprocessed_root, unlabeled_folder
    from nnfiltermatch.nnunet.trained_model import load_predictor

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


# ----- scoring ----------------------------------------------------------------------------------------------------
@dataclass
class ShownSlice:
    """What a case's PNG shows, kept only for the cases that may end up in the top N."""

    index: int
    image: np.ndarray
    segmentation: np.ndarray
    uncertainty: np.ndarray


def logits_file(folder: Path, case_id: str) -> Path:
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
) -> tuple[dict[str, RankedCase], dict[str, ShownSlice]]:
    """Predict and score the given cases (``score``: the voxel map).

    What a shown case needs is kept only for the ``keep_slices`` cases of highest ``priority`` (default: the
    score; None: never shown): its PNG slice, and with ``logits_dir`` its logits for the export's pre-annotation
    (``<case>.npy`` there, deleted when the case drops out), so memory and disk stay bounded by N, not the pool.
    """
    from tqdm import tqdm

    rank_key = priority or (lambda row: row.score)
    results: dict[str, RankedCase] = {}
    slices: dict[str, ShownSlice] = {}
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
        slices[case_id] = ShownSlice(
            index, data[0, index].numpy().copy(), segmentation[index].numpy().copy(), umap[index].numpy().copy()
        )
        if logits_dir is not None:
            assert prediction.logits is not None
            np.save(logits_file(logits_dir, case_id), prediction.logits.cpu().numpy())
        if len(kept) > keep_slices:  # the last in ranking order (-priority, case) can no longer reach the top N
            drop = max(kept, key=lambda c: (-kept[c], c))
            del kept[drop], slices[drop]
            if logits_dir is not None:
                logits_file(logits_dir, drop).unlink(missing_ok=True)
    return results, slices
