"""``nnfiltermatch predict``: segment a folder of cases with a model folder, with progress and resume.

The checks that are cheap (model folder, checkpoints, inputs, output folder) run before any checkpoint is loaded;
the predictor is :func:`nnfiltermatch.nnunet.predictor.load_predictor`, its per-case observer drives the progress
lines (elapsed time and ETA), and its export writes each segmentation under a temporary name, so
``--continue_prediction`` can trust what it finds.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TextIO

from nnfiltermatch.data.predict_cases import (
    EXISTING,
    Existing,
    PredictionError,
    check_input_images,
    check_output_dir,
    collect_cases,
    listed_names,
    remove_partial_files,
    select_cases,
)
from nnfiltermatch.nnunet.trained_model import default_device, load_predictor
from nnfiltermatch.runs import checkpoint_files, read_model_folder


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
    preprocessing_workers: int | None = None,
    export_workers: int | None = None,
) -> list[Path]:
    """Segment the cases of ``input_dir`` into ``output_dir`` (CASE<ending>); returns the files written now.

    ``existing`` says what to do with outputs already in ``output_dir`` for these cases: ``refuse`` (the command's
    default: a ``PredictionError`` before any work), ``continue`` (keep complete ones, predict the rest) or
    ``overwrite`` (predict all; the default here, for callers that own the folder). Everything that can be checked
    cheaply (model folder, checkpoints, inputs, output folder) is checked before the checkpoints are loaded; input
    images are checked like training images (headers, truncation, NaN/inf). With ``progress``, one line per case
    with elapsed time and ETA goes to stderr, and nnU-Net's own per-case chatter on stdout is held back (printed to
    stderr only if the prediction fails). ``preprocessing_workers`` / ``export_workers`` (nnU-Net's -npp / -nps):
    by default 1 each on CPU (more only compete with the network for the cores), up to 3 on a GPU.
    """
    if existing not in EXISTING:
        raise PredictionError(f"existing={existing!r}: choose one of {', '.join(EXISTING)}")
    for flag, workers in (("-npp", preprocessing_workers), ("-nps", export_workers)):
        if workers is not None and workers < 1:
            raise PredictionError(f"{flag} {workers}: needs at least 1 worker process")
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
    default_workers = 1 if predictor.device.type == "cpu" else max(1, min(3, os.cpu_count() or 1))
    started = time.monotonic()
    try:
        with held_back():
            predictor.predict_from_files(
                [[str(p) for p in files] for files in todo.values()],
                [str(output_dir / case) for case in todo],
                save_probabilities=save_probabilities,
                overwrite=True,  # the cases were chosen above
                num_processes_preprocessing=preprocessing_workers or default_workers,
                num_processes_segmentation_export=export_workers or default_workers,
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
