"""The run folder: where a training writes, what it leaves there, and how every command finds and reads it.

nnU-Net's results layout, with our additions::

    $nnUNet_results/<dataset>/<Trainer>__<Plans>__<configuration>/     the model folder
        plans.json  dataset.json  query_latest.json
        fold_<f>/  checkpoint_final.pth  checkpoint_latest.pth  checkpoint_best.pth
                   nnfiltermatch_config.json  filter_rounds/epoch_XXXX.json  pseudo_labels/ (mode selftrain)

Our trainer's state (pool, filter rounds, teacher, configuration) rides in each checkpoint's ``init_args`` entry
under ``STATE_KEY``, with a SHA-256 of the weights under ``DIGEST_KEY``. The trainer writes all of it; training,
prediction, the query and the report read it through this module, which imports none of them.

What is trusted in a checkpoint
-------------------------------
* Checkpoints are never unpickled with arbitrary code: ``torch.load(..., weights_only=True)`` with only data types
  allow-listed (see ``CHECKPOINT_SAFE_GLOBALS``): numpy scalars (``numpy._core.multiarray.scalar``), ``numpy.dtype``
  and its numeric/bool subclasses (``numpy.dtypes.Float32DType`` ...), and plain arrays
  (``numpy._core.multiarray._reconstruct``, ``numpy.ndarray``), each also under its numpy-1 name
  ``numpy.core.multiarray.*``. nnU-Net's logging dict holds numpy float32 scalars (our checkpoints need exactly
  ``scalar``, ``dtype`` and ``Float32DType``); the other numeric dtypes and arrays cover checkpoints written by
  other numpy/nnU-Net versions. None of these runs code: object arrays still unpickle their elements through the
  same restricted unpickler. ``torch.device`` (in ``init_args``) is allowed by torch itself. A checkpoint that needs
  anything else is refused with a ``CheckpointError`` naming the offending globals.
* Loaded weights are verified (``verify_checkpoint_weights``): every floating-point tensor of ``network_weights`` and
  of the EMA teacher must be finite, and where the checkpoint stores a SHA-256 of them (``weights_digest``, written
  by our trainer at save) they must match it. Why: 4 KiB overwritten inside one tensor of a checkpoint loaded
  without a word, trained to NaN and predicted all-background masks, all with exit status 0. A checkpoint without a
  digest (nnU-Net's own) gets the finite check only.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nnfiltermatch import distributed
from nnfiltermatch.data.layout import env_folder
from nnfiltermatch.data.rounds import trainer_folder_name
from nnfiltermatch.errors import listed
from nnfiltermatch.method.pool_filter import FilterRound

# the trainer class of each mode, by name: the name is also the <Trainer> part of the model folder
TRAINER_NAMES: dict[str, str] = {
    "filtermatch": "nnFilterMatchTrainer",
    "ssl": "nnFilterMatchTrainer_ssl",
    "supervised": "nnFilterMatchTrainer_supervised",
    "selftrain": "nnFilterMatchTrainer_selftrain",
}
# what --checkpoint chooses from (checkpoint_latest.pth is only a point to resume from)
CHECKPOINTS: dict[str, str] = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
# the order in which `train --continue` looks for a checkpoint to resume from; the report reads the same one
RESUME_ORDER = (CHECKPOINTS["final"], "checkpoint_latest.pth", CHECKPOINTS["best"])
STATE_KEY = "nnfiltermatch_state"  # our trainer's state inside nnU-Net's checkpoint (its 'init_args' entry)
DIGEST_KEY = "weights_digest"  # in that state: {weight set: distributed.state_digest of it} at save
FILTER_DIRNAME = "filter_rounds"  # in the fold folder: one epoch_XXXX.json per filter round
PSEUDO_LABEL_DIRNAME = "pseudo_labels"  # in the fold folder of mode selftrain: its fixed pseudo-labels
# in the model folder: where the latest query's ranking went and how it was made (the report shows it)
LATEST_QUERY = "query_latest.json"


class RunFolderError(ValueError):
    """A model folder, fold or checkpoint cannot be used; the message names the path or value and how to fix it."""


class CheckpointError(RunFolderError):
    """A checkpoint file cannot be used (unreadable, unsafe, non-finite or altered weights); the message names it."""


# ----- folders ----------------------------------------------------------------------------------------------------
def parse_fold(fold: str) -> int | str:
    if fold == "all":
        return "all"
    try:
        return int(fold)
    except ValueError as exc:
        raise RunFolderError(f"-f {fold!r}: give a fold number (0-4) or 'all'") from exc


def output_folder_for(
    dataset_name: str,
    trainer_name: str,
    plans_name: str,
    configuration: str,
    fold: int | str,
    round_number: int | None = None,
) -> Path:
    """nnU-Net's results layout: <results>/<dataset>/<Trainer>__<Plans>__<config>/fold_<f>.

    Annotation round K > 0 (``--round K``) names the trainer part ``<Trainer>_roundK``: nnU-Net's own tools find it
    with ``-tr <Trainer>_roundK``; round 0 and no round are the plain folder.
    """
    trainer = trainer_folder_name(trainer_name, round_number)
    return env_folder("nnUNet_results") / dataset_name / f"{trainer}__{plans_name}__{configuration}" / f"fold_{fold}"


def resolve_model_dir(dataset: str | int, configuration: str, mode: str, plans: str = "nnUNetPlans") -> Path:
    """The folder ``train`` writes for this dataset, configuration and mode (the parent of its fold_X folders)."""
    from nnfiltermatch.data.layout import dataset_name_from_id

    if mode not in TRAINER_NAMES:
        raise RunFolderError(f"--mode {mode!r}: choose one of {', '.join(TRAINER_NAMES)}")
    name = dataset_name_from_id(dataset)
    return output_folder_for(name, TRAINER_NAMES[mode], plans, configuration, 0).parent


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunFolderError(f"{path}: cannot read it as JSON ({exc})") from exc


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
        raise RunFolderError(
            f"{model_dir} {what}: not a trained model folder. Give the folder that holds plans.json, dataset.json "
            f"and fold_X/ (e.g. $nnUNet_results/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>), or train "
            f"first.{hint}"
        )
    if not (model_dir / "dataset.json").is_file():
        raise RunFolderError(f"{model_dir} has plans.json but no dataset.json: copy the whole model folder")
    return _read_json(model_dir / "plans.json"), _read_json(model_dir / "dataset.json")


def _normalise_fold(fold: str | int) -> str | int:
    if isinstance(fold, int) or str(fold) == "all":
        return fold if isinstance(fold, int) else "all"
    try:
        return int(fold)
    except ValueError:
        raise RunFolderError(f"-f {fold!r}: give fold numbers (e.g. -f 0 1 2) or 'all'") from None


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
    raise RunFolderError(
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
        raise RunFolderError(f"--checkpoint {checkpoint!r}: choose one of {', '.join(CHECKPOINTS)}")
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
            raise RunFolderError(
                f"fold {fold}: {path} does not exist (found: {_describe_folds(model_dir)}). Pick existing folds "
                "with -f, or --checkpoint best|final."
            )
        result.append((fold, path))
    return result


def current_checkpoint(folder: Path) -> Path | None:
    """The checkpoint of the run's latest state in ``folder``, if any: the first of ``RESUME_ORDER`` there, the one
    ``train --continue`` resumes from and the report reads."""
    return next((folder / n for n in RESUME_ORDER if (folder / n).is_file()), None)


def resolve_fold_dir(model_dir: Path, fold: str | int | None = None) -> Path:
    """A fold folder (``fold_X`` with a checkpoint) from either that folder or the model folder above it."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RunFolderError(f"{model_dir} does not exist: give a trained model folder or one of its fold_X folders")
    if current_checkpoint(model_dir) is not None and fold is None:
        return model_dir
    folds = sorted(p for p in model_dir.glob("fold_*") if p.is_dir() and current_checkpoint(p) is not None)
    if fold is not None:
        wanted = model_dir / f"fold_{fold}"
        if wanted in folds:
            return wanted
        raise RunFolderError(
            f"{wanted} has no checkpoint (found: {', '.join(p.name for p in folds) or 'no trained fold'})"
        )
    if len(folds) == 1:
        return folds[0]
    if not folds:
        raise RunFolderError(
            f"{model_dir}: no checkpoint_final/latest/best.pth in it or in fold_X/ below it: not a trained model "
            "folder (give $nnUNet_results/DatasetXXX/<Trainer>__<Plans>__<configuration>, or train first)"
        )
    raise RunFolderError(f"{model_dir} holds {', '.join(p.name for p in folds)}: choose one with -f")


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


def trainer_state(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """Our trainer's state in a checkpoint (pool, filter rounds, teacher, configuration); {} in nnU-Net's own."""
    return (checkpoint.get("init_args") or {}).get(STATE_KEY) or {}


def checkpoint_weight_sets(checkpoint: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The weight sets a checkpoint holds: nnU-Net's ``network_weights`` and, when there is one, our EMA teacher."""
    state = trainer_state(checkpoint)
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


def verify_checkpoint_weights(checkpoint: Mapping[str, Any], path: Path) -> None:
    """Refuse weights that are not finite, or that differ from the digest stored with them at save.

    Why both: NaN/inf is what a damaged float usually becomes, and a model with it predicts only background; the
    digest also catches damage that left every value finite. A checkpoint without a digest (nnU-Net's own, or one
    written before digests) is accepted on the finite check alone.
    """
    sets = checkpoint_weight_sets(checkpoint)
    state = trainer_state(checkpoint)
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
        except CheckpointError:
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


# ----- filter rounds ----------------------------------------------------------------------------------------------
def collect_filter_rounds(fold_dir: Path, checkpoint: Mapping[str, Any]) -> list[FilterRound]:
    """The rounds the checkpoint carries, plus ``filter_rounds/epoch_XXXX.json`` files of later rounds, by epoch.

    A round at the start of epoch ``e`` runs after the checkpoint saved at the end of epoch ``e - 1``, so that
    checkpoint does not hold it: only the file does. Rounds in the checkpoint win over files of the same epoch. A
    damaged file is skipped; a checkpoint round that is no record raises ``ValueError``, as the trainer's resume does.
    """
    in_checkpoint = (FilterRound.from_json(r) for r in trainer_state(checkpoint).get("filter_rounds") or [])
    rounds = {r.epoch: r for r in in_checkpoint}
    folder = Path(fold_dir) / FILTER_DIRNAME
    if folder.is_dir():
        for path in sorted(folder.glob("epoch_*.json")):
            try:
                record = FilterRound.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # a damaged record is simply not read
            rounds.setdefault(record.epoch, record)
    return [rounds[e] for e in sorted(rounds)]
