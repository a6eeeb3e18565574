"""Inference with a trained model: nnU-Net's sliding-window predictor, built from our trainer without its lookup.

nnU-Net's ``initialize_from_trained_model_folder`` finds the trainer class by the name stored in the checkpoint
(ours are unknown to it, and its recursive search imports every trainer module) and unpickles checkpoints with
``weights_only=False``. Here the network is built by the trainer class itself (``build_network_architecture``, so a
trainer variant with its own architecture keeps it) and handed to ``nnUNetPredictor.manual_initialization``; all
preprocessing, Gaussian-weighted sliding windows, mirroring, fold ensembling and export stay nnU-Net's own.

What is trusted
---------------
* The model folder is trusted *configuration*: ``plans.json`` and ``dataset.json`` decide which network class is
  built (``network_class_name`` and the ``_kw_requires_import`` entries are imported by nnU-Net's
  ``get_network_from_plans``), how images are preprocessed and how outputs are written. Only use model folders you
  would also train from.
* Checkpoints are never unpickled with arbitrary code: ``torch.load(..., weights_only=True)`` with only data types
  allow-listed (see ``CHECKPOINT_SAFE_GLOBALS``): numpy scalars (``numpy._core.multiarray.scalar``), ``numpy.dtype``
  and its numeric/bool subclasses (``numpy.dtypes.Float32DType`` ...), and plain arrays
  (``numpy._core.multiarray._reconstruct``, ``numpy.ndarray``), each also under its numpy-1 name
  ``numpy.core.multiarray.*``. nnU-Net's logging dict holds numpy float32 scalars (our checkpoints need exactly
  ``scalar``, ``dtype`` and ``Float32DType``); the other numeric dtypes and arrays cover checkpoints written by
  other numpy/nnU-Net versions. None of these runs code: object arrays still unpickle their elements through the
  same restricted unpickler. ``torch.device`` (in ``init_args``) is allowed by torch itself. A checkpoint that needs
  anything else is refused with a ``PredictionError`` naming the offending globals.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

CHECKPOINTS: dict[str, str] = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
CHANNEL_DIGITS = 4
_LISTED = 8  # how many names an error message lists before "..."


class PredictionError(ValueError):
    """Prediction cannot start; the message names the path or value and how to fix it."""


# ----- safe checkpoint loading ------------------------------------------------------------------------------------
def _numpy_safe_globals() -> list[Any]:
    """numpy's data-only types, under both the numpy-2 (``numpy._core``) and numpy-1 (``numpy.core``) module names."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # type: ignore[attr-defined]
    other = "numpy.core.multiarray" if multiarray.__name__.startswith("numpy._core") else "numpy._core.multiarray"
    dtype_names = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
    dtype_names += ("float16", "float32", "float64", "complex64", "complex128")
    dtype_classes = {type(np.dtype(name)) for name in dtype_names} - {np.dtype}
    return [
        multiarray.scalar,
        (multiarray.scalar, f"{other}.scalar"),
        multiarray._reconstruct,
        (multiarray._reconstruct, f"{other}._reconstruct"),
        np.ndarray,
        np.dtype,
        *sorted(dtype_classes, key=lambda c: c.__name__),
    ]


CHECKPOINT_SAFE_GLOBALS: list[Any] = _numpy_safe_globals()


def load_checkpoint_safely(path: Path) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with numpy data types allowed; anything that could run code is refused."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        allowed = {_global_name(g) for g in CHECKPOINT_SAFE_GLOBALS}
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # only improves the message
            found = []
        offending = [name for name in found if name not in allowed]
        match = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", str(exc), re.S)
        reason = " ".join(match.group(1).split()) if match else ""
        detail = (
            f"it references {', '.join(offending)}"
            if offending
            else (reason or "it holds more than tensors and plain data")
        )
        raise PredictionError(
            f"{path}: refused to load the checkpoint: {detail}. nnfiltermatch loads checkpoints with "
            "weights_only=True and allows only tensors, plain Python data and numpy scalars/arrays, so a checkpoint "
            "cannot run code. If you trust this file, re-save it with only those types (e.g. its 'network_weights')."
        ) from exc
    except Exception as exc:  # corrupt or truncated files fail in many ways (RuntimeError, EOFError, KeyError ...)
        raise PredictionError(
            f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc}); retrain or copy it again"
        ) from exc
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise PredictionError(f"{path}: not an nnU-Net checkpoint (no 'network_weights' entry)")
    return checkpoint


def _global_name(entry: Any) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


# ----- the model folder -------------------------------------------------------------------------------------------
def resolve_model_dir(dataset: str | int, configuration: str, mode: str, plans: str = "nnUNetPlans") -> Path:
    """The folder ``train`` writes for this dataset, configuration and mode (the parent of its fold_X folders)."""
    from nnfiltermatch.preparation import dataset_name_from_id
    from nnfiltermatch.trainer import TRAINERS
    from nnfiltermatch.training import output_folder_for

    if mode not in TRAINERS:
        raise PredictionError(f"--mode {mode!r}: choose one of {', '.join(TRAINERS)}")
    name = dataset_name_from_id(dataset)
    return output_folder_for(name, TRAINERS[mode].__name__, plans, configuration, 0).parent


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PredictionError(f"{path}: cannot read it as JSON ({exc})") from exc


def read_model_folder(model_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """plans.json and dataset.json of a trained model folder, with an error that says what a model folder is."""
    model_dir = Path(model_dir)
    if not (model_dir / "plans.json").is_file():
        hint = ""
        if model_dir.name.startswith("fold_") and (model_dir.parent / "plans.json").is_file():
            hint = f" This is a fold folder: give its parent {model_dir.parent} and select folds with -f."
        elif model_dir.parent.is_dir():
            siblings = sorted(p.name for p in model_dir.parent.iterdir() if (p / "plans.json").is_file())
            if siblings:
                hint = f" Model folders beside it: {', '.join(siblings)}."
        what = "does not exist" if not model_dir.exists() else "has no plans.json"
        raise PredictionError(
            f"{model_dir} {what}: not a trained model folder. Give the folder that holds plans.json, dataset.json "
            f"and fold_X/ (e.g. $nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>), or train "
            f"first.{hint}"
        )
    if not (model_dir / "dataset.json").is_file():
        raise PredictionError(f"{model_dir} has plans.json but no dataset.json: copy the whole model folder")
    return _read_json(model_dir / "plans.json"), _read_json(model_dir / "dataset.json")


def _normalise_fold(fold: str | int) -> str | int:
    if isinstance(fold, int) or str(fold) == "all":
        return fold if isinstance(fold, int) else "all"
    try:
        return int(fold)
    except ValueError:
        raise PredictionError(f"-f {fold!r}: give fold numbers (e.g. -f 0 1 2) or 'all'") from None


def _fold_folders(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.glob("fold_*") if p.is_dir())


def detect_folds(model_dir: Path, checkpoint: str = "final") -> list[str | int]:
    """Folds that have the checkpoint: the numbered ones (a cross-validation ensemble), else fold_all."""
    name = _checkpoint_name(checkpoint)
    numbered: list[str | int] = []
    for folder in _fold_folders(Path(model_dir)):
        suffix = folder.name.removeprefix("fold_")
        if suffix.isdigit() and (folder / name).is_file():
            numbered.append(int(suffix))
    if numbered:
        return sorted(numbered, key=int)
    if (Path(model_dir) / "fold_all" / name).is_file():
        return ["all"]
    raise PredictionError(
        f"{model_dir}: no fold_X/{name} found ({_describe_folds(Path(model_dir))}). Train a fold first, or pick "
        "another checkpoint with --checkpoint."
    )


def _describe_folds(model_dir: Path) -> str:
    parts = []
    for folder in _fold_folders(model_dir):
        files = sorted(p.name for p in folder.glob("checkpoint_*.pth"))
        parts.append(f"{folder.name}/: {', '.join(files) if files else 'no checkpoints'}")
    return "; ".join(parts) if parts else "no fold_X folders"


def _checkpoint_name(checkpoint: str) -> str:
    if checkpoint not in CHECKPOINTS:
        raise PredictionError(f"--checkpoint {checkpoint!r}: choose one of {', '.join(CHECKPOINTS)}")
    return CHECKPOINTS[checkpoint]


def checkpoint_files(
    model_dir: Path, folds: Sequence[str | int] | None, checkpoint: str = "final"
) -> list[tuple[str | int, Path]]:
    """(fold, checkpoint path) per fold, checked to exist; None means the folds found."""
    model_dir = Path(model_dir)
    name = _checkpoint_name(checkpoint)
    if isinstance(folds, (str, int)):
        folds = [folds]
    chosen = detect_folds(model_dir, checkpoint) if not folds else [_normalise_fold(f) for f in folds]
    chosen = list(dict.fromkeys(chosen))
    result = []
    for fold in chosen:
        path = model_dir / f"fold_{fold}" / name
        if not path.is_file():
            raise PredictionError(
                f"fold {fold}: {path} does not exist (found: {_describe_folds(model_dir)}). Pick existing folds "
                "with -f, or --checkpoint best|final."
            )
        result.append((fold, path))
    return result


# ----- the network and the predictor ------------------------------------------------------------------------------
def _trainer_class(trainer_name: str) -> type:
    """Our trainers and nnU-Net's base trainer by name; other names fall back to nnU-Net's default architecture."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnfiltermatch.trainer import TRAINERS

    known: dict[str, type] = {cls.__name__: cls for cls in TRAINERS.values()}
    known[nnUNetTrainer.__name__] = nnUNetTrainer
    if trainer_name not in known:
        warnings.warn(
            f"trainer {trainer_name!r} is not one of {', '.join(sorted(known))}: building nnU-Net's default "
            "architecture from plans.json (nnU-Net's trainer lookup is not used)",
            stacklevel=3,
        )
        return nnUNetTrainer
    return known[trainer_name]


def _torch_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise PredictionError(f"--device {device}: choose cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PredictionError("--device cuda: no CUDA device is visible to torch; use --device cpu")
    return dev


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_predictor(
    model_dir: Path,
    folds: list[str | int] | None,
    checkpoint: str = "final",
    device: str = "cpu",
    mirroring: bool = True,
    step_size: float = 0.5,
) -> nnUNetPredictor:
    """An initialised ``nnUNetPredictor`` for the given folds (ensembled when several), without nnU-Net's lookup."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model_dir = Path(model_dir)
    plans, dataset_json = read_model_folder(model_dir)
    files = checkpoint_files(model_dir, folds, checkpoint)
    torch_device = _torch_device(device)
    if not 0.0 < step_size <= 1.0:
        raise PredictionError(f"--step-size {step_size}: must be in (0, 1] (fraction of the patch size)")

    parameters: list[dict[str, torch.Tensor]] = []
    trainer_name = configuration = None
    mirror_axes: tuple[int, ...] | None = None
    for i, (fold, path) in enumerate(files):
        ckpt = load_checkpoint_safely(path)
        init_args = ckpt.get("init_args") or {}
        fold_configuration = init_args.get("configuration") or model_dir.name.split("__")[-1]
        if i == 0:
            trainer_name = str(ckpt.get("trainer_name") or model_dir.name.split("__")[0])
            configuration = fold_configuration
            axes = ckpt.get("inference_allowed_mirroring_axes")
            mirror_axes = tuple(int(a) for a in axes) if axes is not None else None
        elif fold_configuration != configuration:
            raise PredictionError(
                f"fold {fold}: {path} was trained with configuration {fold_configuration!r}, fold {files[0][0]} "
                f"with {configuration!r}; ensemble only folds of one model"
            )
        parameters.append(ckpt["network_weights"])
    assert trainer_name is not None and configuration is not None

    plans_manager = PlansManager(plans)
    if configuration not in plans.get("configurations", {}):
        raise PredictionError(
            f"{model_dir / 'plans.json'} has no configuration {configuration!r} (the checkpoint's): "
            "the plans do not belong to this model"
        )
    configuration_manager = plans_manager.get_configuration(configuration)
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = _trainer_class(trainer_name).build_network_architecture(
        plans_manager, configuration_manager, num_inputs, num_outputs, enable_deep_supervision=False
    )
    for (fold, path), weights in zip(files, parameters):
        try:
            network.load_state_dict(weights)  # checks every fold now, not halfway through a prediction
        except RuntimeError as exc:
            raise PredictionError(
                f"fold {fold}: the weights in {path} do not fit the network that {model_dir / 'plans.json'} "
                f"describes ({str(exc).splitlines()[0]}); use the plans.json written with this model"
            ) from exc
    network.load_state_dict(parameters[0])

    predictor = nnUNetPredictor(
        tile_step_size=step_size,
        use_gaussian=True,
        use_mirroring=mirroring,
        perform_everything_on_device=torch_device.type == "cuda",
        device=torch_device,
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.manual_initialization(
        network, plans_manager, configuration_manager, parameters, dataset_json, trainer_name, mirror_axes
    )
    return predictor


# ----- input and output folders -----------------------------------------------------------------------------------
def collect_cases(input_dir: Path, dataset_json: dict[str, Any]) -> dict[str, list[Path]]:
    """``{case: [channel files in order]}`` from CASE_XXXX<ending> files, checked against the model's channels."""
    input_dir = Path(input_dir)
    ending = dataset_json.get("file_ending", ".nii.gz")
    channels = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    n_channels = len(channels)
    if not input_dir.is_dir():
        what = "is a file" if input_dir.exists() else "does not exist"
        raise PredictionError(f"-i {input_dir} {what}: give a folder of CASE_0000{ending} images")
    files = sorted(p for p in input_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    images = [p for p in files if p.name.endswith(ending)]
    if not images:
        others = f" (it holds {_names(files)}, none ending in {ending})" if files else ""
        raise PredictionError(f"-i {input_dir} has no *{ending} images{others}: nothing to predict")
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{{CHANNEL_DIGITS}}}){re.escape(ending)}$")
    bad = [p for p in images if not pattern.match(p.name)]
    if bad:
        raise PredictionError(
            f"-i {input_dir}: {_names(bad)} do not follow nnU-Net's naming CASE_XXXX{ending} (XXXX: the 4-digit "
            f"channel, e.g. case_0000{ending}); rename them"
        )
    by_case: dict[str, dict[int, Path]] = {}
    for p in images:
        m = pattern.match(p.name)
        assert m is not None
        by_case.setdefault(m["case"], {})[int(m["channel"])] = p
    expected = set(range(n_channels))
    wrong = {case: sorted(found) for case, found in by_case.items() if set(found) != expected}
    if wrong:
        listed = "; ".join(
            f"{case}: {', '.join(f'{c:04d}' for c in found)}" for case, found in list(wrong.items())[:_LISTED]
        )
        raise PredictionError(
            f"-i {input_dir}: the model takes {n_channels} channel(s) {dict(channels)} (dataset.json channel_names), "
            f"so every case needs _0000 ... _{n_channels - 1:04d}{ending}; found {listed}"
        )
    return {case: [found[c] for c in range(n_channels)] for case, found in sorted(by_case.items())}


def check_input_images(input_dir: Path, cases: dict[str, list[Path]], dataset_json: dict[str, Any]) -> None:
    """The file checks prepare runs on training images, before any model is loaded: nnU-Net's reader zero-fills a
    truncated .nii.gz and turns NaN/inf into 0, so without them such an input is segmented without a word."""
    from nnfiltermatch.inventory import check_image_files

    files = [f for channel_files in cases.values() for f in channel_files]
    problems = check_image_files(files, Path(input_dir), dataset_json.get("file_ending", ".nii.gz"))
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:_LISTED])
        more = f"\n  ... and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
        raise PredictionError(
            f"-i {input_dir}: {len(problems)} image(s) cannot be used; nothing was predicted:\n{listed}{more}"
        )


def _names(paths: Sequence[Path]) -> str:
    names = [p.name for p in paths[:_LISTED]]
    return ", ".join(names) + (f" and {len(paths) - _LISTED} more" if len(paths) > _LISTED else "")


def _check_output_dir(output_dir: Path, input_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise PredictionError(f"-o {output_dir} is a file: give a folder (it is created if missing)")
    if output_dir.resolve() == Path(input_dir).resolve():
        raise PredictionError(f"-o {output_dir} is the input folder: write predictions to another folder")


def predict_folder(
    input_dir: Path,
    output_dir: Path,
    model_dir: Path,
    folds: list[str | int] | None = None,
    checkpoint: str = "final",
    device: str | None = None,
    mirroring: bool = True,
    step_size: float = 0.5,
    save_probabilities: bool = False,
) -> list[Path]:
    """Segment every case of ``input_dir`` into ``output_dir`` (CASE<ending>); returns the written files.

    Everything that can be checked cheaply (model folder, checkpoints, inputs, output folder) is checked before
    the checkpoints are loaded; input images are checked like training images (headers, truncation, NaN/inf).
    On CPU, 1 preprocessing and 1 export worker.
    """
    input_dir, output_dir, model_dir = Path(input_dir), Path(output_dir), Path(model_dir)
    _, dataset_json = read_model_folder(model_dir)
    checkpoint_files(model_dir, folds, checkpoint)
    cases = collect_cases(input_dir, dataset_json)
    _check_output_dir(output_dir, input_dir)
    check_input_images(input_dir, cases, dataset_json)
    device = device or default_device()
    predictor = load_predictor(model_dir, folds, checkpoint, device, mirroring, step_size)
    previous = predictor.configuration_manager.previous_stage_name
    if previous is not None:
        raise PredictionError(
            f"{model_dir} is a cascade stage (needs the predictions of {previous!r}): not supported by nnfiltermatch "
            "predict; use a full-resolution or 2d configuration"
        )

    output_dir.mkdir(parents=True, exist_ok=True)
    workers = 1 if predictor.device.type == "cpu" else max(1, min(3, os.cpu_count() or 1))
    predictor.predict_from_files(
        [[str(p) for p in files] for files in cases.values()],
        [str(output_dir / case) for case in cases],
        save_probabilities=save_probabilities,
        overwrite=True,
        num_processes_preprocessing=workers,
        num_processes_segmentation_export=workers,
    )
    ending = dataset_json.get("file_ending", ".nii.gz")
    written = [output_dir / f"{case}{ending}" for case in cases]
    missing = [p for p in written if not p.is_file()]
    if missing:
        raise RuntimeError(f"nnU-Net's export did not write {_names(missing)}")
    return written
