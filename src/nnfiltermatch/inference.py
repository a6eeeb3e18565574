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
* Checkpoints are loaded and verified by ``runs.load_checkpoint_safely`` (no code runs; weights finite and
  equal to the digest stored at save).
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import torch

from nnfiltermatch.predict_cases import (
    EXISTING,
    PARTIAL_PREFIX,
    Existing,
    PredictionError,
    check_input_images,
    check_output_dir,
    collect_cases,
    listed_names,
    remove_partial_files,
    select_cases,
)
from nnfiltermatch.runs import (
    CHECKPOINTS,
    TRAINER_NAMES,
    CheckpointError,
    checkpoint_files,
    describe_epoch,
    load_checkpoint_safely,
    read_model_folder,
    usable_checkpoints_beside,
)

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager


# ----- the network and the predictor ------------------------------------------------------------------------------
def _trainer_class(trainer_name: str) -> type:
    """Our trainers and nnU-Net's base trainer by name; other names fall back to nnU-Net's default architecture."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnfiltermatch.training import trainer_class

    known: dict[str, type] = {name: trainer_class(mode) for mode, name in TRAINER_NAMES.items()}
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
    check_output_dir(output_dir, input_dir)
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
    remove_partial_files(output_dir, {f"{case}{ending}" for case in todo})
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
        raise RuntimeError(f"nnU-Net's export did not write {listed_names(missing)}")
    seconds = time.monotonic() - started
    say(f"{len(written)} case(s) in {_clock(seconds)} ({seconds / len(written):.1f} s per case, export included)")
    return written
