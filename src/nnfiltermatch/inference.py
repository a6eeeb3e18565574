"""Inference with a trained model: nnU-Net's sliding-window predictor, built from our trainer without its lookup.

nnU-Net's ``initialize_from_trained_model_folder`` finds the trainer class by the name stored in the checkpoint
(ours are unknown to it, and its recursive search imports every trainer module) and unpickles checkpoints with
``weights_only=False``. Here the network is built by the trainer class itself (``build_network_architecture``, so a
trainer variant with its own architecture keeps it) and handed to ``nnUNetPredictor.manual_initialization``; all
preprocessing, Gaussian-weighted sliding windows, mirroring, fold ensembling and export stay nnU-Net's own.

Two narrow hooks change what a prediction run looks like, not what it computes:

* nnU-Net's per-case file iterator is wrapped (``_internal_get_data_iterator_from_lists_of_filenames``, the one place
  that sees every case in turn) to report progress with elapsed time and ETA (``CaseProgress``).
* nnU-Net's export writes ``CASE<ending>`` straight to its final name, so a killed run can leave a truncated file that
  its own ``--continue_prediction`` (a bare ``isfile``) takes as done. Our plans manager hands the export workers a
  reader/writer whose ``write_seg`` writes ``.nnfm-partial-*`` and renames it (``os.replace``). nnU-Net writes
  ``.npz`` and ``.pkl`` before the segmentation, so an existing segmentation means a finished case.

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
* Loaded weights are verified (``verify_checkpoint_weights``): every floating-point tensor of ``network_weights`` and
  of the EMA teacher must be finite, and where the checkpoint stores a SHA-256 of them (``weights_digest``, written
  by our trainer at save) they must match it. Why: 4 KiB overwritten inside one tensor of a checkpoint loaded
  without a word, trained to NaN and predicted all-background masks, all with exit status 0. A checkpoint without a
  digest (nnU-Net's own) gets the finite check only.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import re
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

import numpy as np
import torch

from nnfiltermatch import distributed

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

CHECKPOINTS: dict[str, str] = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
CHANNEL_DIGITS = 4
_LISTED = 8  # how many names an error message lists before "..."
PARTIAL_PREFIX = ".nnfm-partial-"  # segmentations being written; hidden, so that no folder scan takes them as cases
PARTIAL_NAME = re.compile(rf"^{re.escape(PARTIAL_PREFIX)}[0-9a-f]{{8}}-(?P<target>.+)$")
Existing = Literal["refuse", "continue", "overwrite"]
EXISTING: tuple[str, ...] = ("refuse", "continue", "overwrite")


STATE_KEY = "nnfiltermatch_state"  # our trainer's state inside nnU-Net's checkpoint (its 'init_args' entry)
DIGEST_KEY = "weights_digest"  # in that state: {weight set: distributed.state_digest of it} at save


class PredictionError(ValueError):
    """Prediction cannot start; the message names the path or value and how to fix it."""


class CheckpointError(PredictionError):
    """A checkpoint file cannot be used (unreadable, unsafe, non-finite or altered weights); the message names it."""


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
        raise CheckpointError(
            f"{path}: refused to load the checkpoint: {detail}. nnfiltermatch loads checkpoints with "
            "weights_only=True and allows only tensors, plain Python data and numpy scalars/arrays, so a checkpoint "
            "cannot run code. If you trust this file, re-save it with only those types (e.g. its 'network_weights')."
        ) from exc
    except Exception as exc:  # corrupt or truncated files fail in many ways (RuntimeError, EOFError, KeyError ...)
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc}); retrain or copy it again"
        ) from exc
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise CheckpointError(f"{path}: not an nnU-Net checkpoint (no 'network_weights' entry)")
    verify_checkpoint_weights(checkpoint, path)
    return checkpoint


def checkpoint_weight_sets(checkpoint: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The weight sets a checkpoint holds: nnU-Net's ``network_weights`` and, when there is one, our EMA teacher."""
    state = (checkpoint.get("init_args") or {}).get(STATE_KEY) or {}
    sets: dict[str, Mapping[str, Any]] = {"network_weights": checkpoint["network_weights"]}
    if isinstance(state.get("teacher"), Mapping):
        sets["teacher"] = state["teacher"]
    return sets


def weights_digests(sets: Mapping[str, Mapping[str, Any]]) -> dict[str, str | None]:
    """What the trainer stores at save: one SHA-256 per weight set (``distributed.state_digest``)."""
    return {name: distributed.state_digest(weights) for name, weights in sets.items()}


def non_finite_tensors(tensors: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors holding NaN or +-inf (integer buffers cannot)."""
    return [
        name
        for name, t in tensors.items()
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def listed(names: Sequence[str]) -> str:
    """At most ``_LISTED`` names, then how many more: error messages name the first offenders, not all 136."""
    return ", ".join(names[:_LISTED]) + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def verify_checkpoint_weights(checkpoint: Mapping[str, Any], path: Path) -> None:
    """Refuse weights that are not finite, or that differ from the digest stored with them at save.

    Why both: NaN/inf is what a damaged float usually becomes, and a model with it predicts only background; the
    digest also catches damage that left every value finite. A checkpoint without a digest (nnU-Net's own, or one
    written before digests) is accepted on the finite check alone.
    """
    sets = checkpoint_weight_sets(checkpoint)
    state = (checkpoint.get("init_args") or {}).get(STATE_KEY) or {}
    stored = state.get(DIGEST_KEY) if isinstance(state, Mapping) else None
    stored = stored if isinstance(stored, Mapping) else {}
    altered = [part for part, digest in stored.items() if digest != distributed.state_digest(sets.get(part))]
    problems = []
    for part, weights in sets.items():
        bad = non_finite_tensors(weights)
        if bad:
            problems.append(
                f"{len(bad)} of {len(weights)} tensors of its {part} hold NaN or infinite values ({listed(bad)})"
            )
    if not problems and not altered:
        return
    if altered:
        cause = (
            f"{' and '.join(altered)} differ from the SHA-256 checksum stored when it was written, so the file was "
            "damaged or altered after saving"
        )
        if not problems:
            cause += " (every value is finite: nothing else would have noticed)"
    elif stored:
        cause = "they match the checksum stored at save, so they were saved that way (a training that diverged)"
    else:
        cause = "the file stores no checksum (written by nnU-Net or an older nnfiltermatch)"
    hint = "Copy the file again from a good copy, use another checkpoint, or retrain"
    if altered and not problems:
        stale = f"init_args['{STATE_KEY}']['{DIGEST_KEY}']"
        hint += f"; if you changed the weights on purpose, delete {stale} before saving it"
    raise CheckpointError(
        f"{path}: unusable weights: {'; '.join(problems) + '; ' if problems else ''}{cause}. A model loaded from it "
        f"would train to NaN or predict nothing but background. {hint}."
    )


def usable_checkpoints_beside(path: Path, names: Sequence[str]) -> dict[str, int | None]:
    """Which of ``names`` beside ``path`` load and verify, with the epoch each was written at the end of.

    Only for error messages about ``path``: reads each file in full, so it is never on a normal path.
    """
    usable: dict[str, int | None] = {}
    for name in names:
        other = Path(path).with_name(name)
        if other.name == Path(path).name or not other.is_file():
            continue
        try:
            checkpoint = load_checkpoint_safely(other)
        except PredictionError:
            continue
        epoch = checkpoint.get("current_epoch")
        usable[name] = int(epoch) - 1 if isinstance(epoch, int) else None
    return usable


def describe_epoch(epoch: int | None) -> str:
    return f"written at the end of epoch {epoch}" if epoch is not None else "epoch unknown"


def _global_name(entry: Any) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


# ----- the model folder -------------------------------------------------------------------------------------------
def resolve_model_dir(dataset: str | int, configuration: str, mode: str, plans: str = "nnUNetPlans") -> Path:
    """The folder ``train`` writes for this dataset, configuration and mode (the parent of its fold_X folders)."""
    from nnfiltermatch.layout import dataset_name_from_id
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
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

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
        try:
            ckpt = load_checkpoint_safely(path)
        except CheckpointError as exc:
            others = usable_checkpoints_beside(path, list(CHECKPOINTS.values()))
            choices = [
                f"--checkpoint {key} ({path.parent.name}/{name}, {describe_epoch(others[name])})"
                for key, name in CHECKPOINTS.items()
                if name in others
            ]
            hint = f" Predict with {' or '.join(choices)} instead." if choices else ""
            raise CheckpointError(f"fold {fold}: {exc}{hint}") from exc
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

    plans_manager = atomic_plans_manager(plans)
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

    predictor = _predictor_class()(
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


# ----- the two hooks: per-case progress, segmentations written under a temporary name ---------------------------
@functools.cache
def _predictor_class() -> type[nnUNetPredictor]:
    """nnU-Net's predictor whose file iterator can be observed case by case (built lazily: importing nnU-Net reads
    its environment, which the commands set first)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class ObservedPredictor(nnUNetPredictor):
        """``case_observer`` wraps the iterator of preprocessed cases; everything else is nnU-Net's."""

        case_observer: Callable[[Iterator[dict[str, Any]]], Iterator[dict[str, Any]]] | None = None

        def _internal_get_data_iterator_from_lists_of_filenames(self, *args: Any, **kwargs: Any) -> Any:
            iterator = super()._internal_get_data_iterator_from_lists_of_filenames(*args, **kwargs)
            return iterator if self.case_observer is None else self.case_observer(iterator)

    return ObservedPredictor


class _AtomicSegWriter:
    """Mixin for an nnU-Net reader/writer: ``write_seg`` writes a hidden temporary file beside the target and renames
    it, so the target name only ever holds a complete segmentation (an interrupted run leaves the old file or none)."""

    def write_seg(self, seg: np.ndarray, output_fname: str, properties: dict[str, Any]) -> None:
        target = Path(output_fname)
        # the full name stays at the end: the writer picks the format by the ending (.nii.gz, .nrrd ...)
        temporary = target.with_name(f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}-{target.name}")
        try:
            super().write_seg(seg, str(temporary), properties)  # type: ignore[misc]
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)


@functools.cache
def _atomic_writer(base: type) -> type:
    """``base`` (nnU-Net's reader/writer class named in plans.json) with the atomic ``write_seg``; reads unchanged."""
    return type(f"Atomic{base.__name__}", (_AtomicSegWriter, base), {})


@functools.cache
def _atomic_plans_manager_class() -> type[PlansManager]:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    class AtomicPlansManager(PlansManager):
        """nnU-Net's plans manager whose reader/writer class writes segmentations atomically.

        nnU-Net's export workers get this object pickled (spawn) and ask it for the writer, so this is where the
        export can be changed without touching nnU-Net's code; ``__reduce__`` rebuilds it from the plans there.
        """

        @property
        def image_reader_writer_class(self) -> type:
            return _atomic_writer(super().image_reader_writer_class)

        def __reduce__(self) -> tuple[Any, ...]:
            return atomic_plans_manager, (self.plans,)

    return AtomicPlansManager


def atomic_plans_manager(plans: dict[str, Any]) -> PlansManager:
    """A ``PlansManager`` for ``plans`` whose exports write each segmentation under a temporary name and rename it."""
    return _atomic_plans_manager_class()(plans)


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class CaseProgress:
    """Progress of a prediction, case by case, with elapsed time and ETA, on stderr.

    A tqdm bar on a terminal; otherwise (a log file, a pipe, CI) one line per case, since a redrawn bar would fill a
    log with carriage returns. The ETA is the mean time per case after the first, which alone also pays for starting
    nnU-Net's worker processes.
    """

    def __init__(self, total: int, stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.done = 0
        self.started = clock()
        self._last = self.started
        self._first_done: float | None = None
        self._bar: Any = None
        isatty = getattr(self.stream, "isatty", None)
        if callable(isatty) and isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # plain lines then
                pass
            else:
                self._bar = tqdm(total=total, desc="predict", unit="case", file=self.stream, dynamic_ncols=True)

    def case_done(self, case: str) -> None:
        now = self.clock()
        took, self._last = now - self._last, now
        self.done += 1
        if self._first_done is None:
            self._first_done = now
        if self._bar is not None:
            self._bar.set_postfix_str(case, refresh=False)
            self._bar.update(1)
            return
        per_case = (now - self._first_done) / (self.done - 1) if self.done > 1 else took
        eta = per_case * (self.total - self.done)
        self.note(
            f"{self.done}/{self.total} {case} predicted in {took:.1f} s; elapsed {_clock(now - self.started)}, "
            f"ETA {_clock(eta)}"
        )

    def note(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(f"predict: {message}", file=self.stream)
        else:
            print(f"predict: {message}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


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
    from nnfiltermatch.image_checks import check_image_files

    files = [f for channel_files in cases.values() for f in channel_files]
    problems = check_image_files(files, Path(input_dir), dataset_json.get("file_ending", ".nii.gz"))
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:_LISTED])
        more = f"\n  ... and {len(problems) - _LISTED} more" if len(problems) > _LISTED else ""
        raise PredictionError(
            f"-i {input_dir}: {len(problems)} image(s) cannot be used; nothing was predicted:\n{listed}{more}"
        )


def _names(paths: Sequence[Path]) -> str:
    return listed([p.name for p in paths])


def _check_output_dir(output_dir: Path, input_dir: Path) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise PredictionError(f"-o {output_dir} is a file: give a folder (it is created if missing)")
    if output_dir.resolve() == Path(input_dir).resolve():
        raise PredictionError(f"-o {output_dir} is the input folder: write predictions to another folder")


def case_outputs(output_dir: Path, case: str, ending: str, save_probabilities: bool) -> list[Path]:
    """The files nnU-Net's export writes for a case, in its order: ``.npz`` and ``.pkl`` (if asked), then the
    segmentation, which is renamed into place last."""
    probabilities = [output_dir / f"{case}.npz", output_dir / f"{case}.pkl"] if save_probabilities else []
    return [*probabilities, output_dir / f"{case}{ending}"]


def _complete_output_problem(files: list[Path], output_dir: Path, ending: str) -> str | None:
    """Why a case's existing outputs are not a finished prediction (a file missing, or a segmentation that cannot
    be read: written by nnU-Net itself or an older version, which wrote in place); None when complete."""
    from nnfiltermatch.image_checks import check_image_files

    missing = [p.name for p in files if not p.is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    segmentation = files[-1]
    if _gzip_broken(segmentation) or check_image_files([segmentation], output_dir, ending):
        return f"{segmentation.name} is unreadable or truncated"
    return None


def _gzip_broken(path: Path) -> bool:
    """A .gz that does not decompress to its end-of-stream marker. The header checks miss a file cut off within its
    first few hundred bytes, and readers zero-fill a truncated one; segmentations are small enough to read whole."""
    import gzip
    import zlib

    if not path.name.endswith(".gz"):
        return False
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (OSError, EOFError, zlib.error):
        return True
    return False


def select_cases(
    cases: dict[str, list[Path]],
    output_dir: Path,
    ending: str,
    save_probabilities: bool,
    existing: Existing,
) -> tuple[dict[str, list[Path]], list[str], list[str]]:
    """(cases to predict, cases kept, notes on incomplete outputs predicted again), or a refusal for ``refuse``.

    Checked before any image is read or model loaded: a run into a folder of earlier predictions should not spend an
    hour before it says so, nor replace them without being asked.
    """
    outputs = {case: case_outputs(output_dir, case, ending, save_probabilities) for case in cases}
    if existing == "overwrite" or not output_dir.is_dir():
        return dict(cases), [], []
    if existing == "refuse":
        there = [p for files in outputs.values() for p in files if p.exists()]
        if there:
            n_cases = sum(any(p.exists() for p in files) for files in outputs.values())
            raise PredictionError(
                f"-o {output_dir} already holds the outputs of {n_cases} of the {len(cases)} case(s) to predict "
                f"({_names(there)}); nothing was predicted. Pass --continue_prediction to keep the complete ones and "
                "predict only the rest, or --overwrite to predict every case again and replace them"
            )
        return dict(cases), [], []
    todo: dict[str, list[Path]] = {}
    kept: list[str] = []
    notes: list[str] = []
    for case, files in cases.items():
        if not any(p.exists() for p in outputs[case]):
            todo[case] = files
        elif problem := _complete_output_problem(outputs[case], output_dir, ending):
            todo[case] = files
            notes.append(f"{case}: {problem}, predicting it again")
        else:
            kept.append(case)
    return todo, kept, notes


def _remove_partial_files(output_dir: Path, names: set[str]) -> None:
    """Remove the temporary segmentations a killed run left for these output names (only ours: PARTIAL_NAME)."""
    if output_dir.is_dir():
        for p in output_dir.glob(f"{PARTIAL_PREFIX}*"):
            match = PARTIAL_NAME.match(p.name)
            if match and match["target"] in names:
                p.unlink(missing_ok=True)


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
    existing: Existing = "overwrite",
    progress: bool = True,
) -> list[Path]:
    """Segment the cases of ``input_dir`` into ``output_dir`` (CASE<ending>); returns the files written now.

    ``existing`` says what to do with outputs already in ``output_dir`` for these cases: ``refuse`` (the command's
    default: a ``PredictionError`` before any work), ``continue`` (keep complete ones, predict the rest) or
    ``overwrite`` (predict all; the default here, for callers that own the folder). Everything that can be checked
    cheaply (model folder, checkpoints, inputs, output folder) is checked before the checkpoints are loaded; input
    images are checked like training images (headers, truncation, NaN/inf). With ``progress``, one line per case
    with elapsed time and ETA goes to stderr, and nnU-Net's own per-case chatter on stdout is held back (printed to
    stderr only if the prediction fails). On CPU, 1 preprocessing and 1 export worker.
    """
    if existing not in EXISTING:
        raise PredictionError(f"existing={existing!r}: choose one of {', '.join(EXISTING)}")
    input_dir, output_dir, model_dir = Path(input_dir), Path(output_dir), Path(model_dir)
    _, dataset_json = read_model_folder(model_dir)
    checkpoint_files(model_dir, folds, checkpoint)
    ending = dataset_json.get("file_ending", ".nii.gz")
    cases = collect_cases(input_dir, dataset_json)
    _check_output_dir(output_dir, input_dir)
    todo, kept, notes = select_cases(cases, output_dir, ending, save_probabilities, existing)

    def say(message: str) -> None:
        if progress:
            print(f"predict: {message}", file=sys.stderr, flush=True)

    for note in notes:
        say(note)
    if kept:
        say(f"{len(kept)} of {len(cases)} case(s) already complete in {output_dir}, kept; {len(todo)} to predict")
    if not todo:
        return []
    check_input_images(input_dir, todo, dataset_json)
    device = device or default_device()
    chatter = io.StringIO()  # nnU-Net's print()s, held back while progress is shown

    def held_back() -> contextlib.AbstractContextManager[Any]:
        return contextlib.redirect_stdout(chatter) if progress else contextlib.nullcontext()

    try:
        with held_back():
            predictor = load_predictor(model_dir, folds, checkpoint, device, mirroring, step_size)
    except BaseException:
        sys.stderr.write(chatter.getvalue())
        raise
    previous = predictor.configuration_manager.previous_stage_name
    if previous is not None:
        raise PredictionError(
            f"{model_dir} is a cascade stage (needs the predictions of {previous!r}): not supported by nnfiltermatch "
            "predict; use a full-resolution or 2d configuration"
        )

    output_dir.mkdir(parents=True, exist_ok=True)
    _remove_partial_files(output_dir, {f"{case}{ending}" for case in todo})
    bar = CaseProgress(len(todo)) if progress else None

    def observe(iterator: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in iterator:
            case = Path(item["ofile"]).name
            if save_probabilities:
                # .npz/.pkl are written in place before the segmentation: without the old segmentation, a run killed
                # in between leaves this case incomplete instead of pairing old and new files
                (output_dir / f"{case}{ending}").unlink(missing_ok=True)
            yield item
            if bar is not None:
                bar.case_done(case)
        if bar is not None:
            bar.note(f"all {len(todo)} case(s) predicted; waiting for nnU-Net's export to write the last ones")

    predictor.case_observer = observe  # type: ignore[attr-defined]
    workers = 1 if predictor.device.type == "cpu" else max(1, min(3, os.cpu_count() or 1))
    started = time.monotonic()
    try:
        with held_back():
            predictor.predict_from_files(
                [[str(p) for p in files] for files in todo.values()],
                [str(output_dir / case) for case in todo],
                save_probabilities=save_probabilities,
                overwrite=True,  # the cases were chosen above
                num_processes_preprocessing=workers,
                num_processes_segmentation_export=workers,
            )
    except BaseException:
        sys.stderr.write(chatter.getvalue())
        raise
    finally:
        if bar is not None:
            bar.close()
    written = [output_dir / f"{case}{ending}" for case in todo]
    missing = [p for p in written if not p.is_file()]
    if missing:
        raise RuntimeError(f"nnU-Net's export did not write {_names(missing)}")
    seconds = time.monotonic() - started
    say(f"{len(written)} case(s) in {_clock(seconds)} ({seconds / len(written):.1f} s per case, export included)")
    return written
