"""The cases of a prediction run: the input folder's images by case and channel, and the output folder.

Everything here is checked before a model is loaded: the nnU-Net naming and channel count, the images themselves
(as prepare checks training images), and which cases an output folder already holds (refused, kept when complete,
or predicted again). Segmentations are written under a hidden ``.nnfm-partial-*`` name and renamed
(:mod:`nnfiltermatch.nnunet.predictor`), so a killed run leaves only those to remove.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from nnfiltermatch.errors import LISTED, listed

CHANNEL_DIGITS = 4
PARTIAL_PREFIX = ".nnfm-partial-"  # segmentations being written; hidden, so that no folder scan takes them as cases
PARTIAL_NAME = re.compile(rf"^{re.escape(PARTIAL_PREFIX)}[0-9a-f]{{8}}-(?P<target>.+)$")
Existing = Literal["refuse", "continue", "overwrite"]
EXISTING: tuple[str, ...] = ("refuse", "continue", "overwrite")


class PredictionError(ValueError):
    """Prediction cannot start; the message names the path or value and how to fix it."""


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
        others = f" (it holds {listed_names(files)}, none ending in {ending})" if files else ""
        raise PredictionError(f"-i {input_dir} has no *{ending} images{others}: nothing to predict")
    pattern = re.compile(rf"^(?P<case>.+)_(?P<channel>\d{{{CHANNEL_DIGITS}}}){re.escape(ending)}$")
    bad = [p for p in images if not pattern.match(p.name)]
    if bad:
        raise PredictionError(
            f"-i {input_dir}: {listed_names(bad)} do not follow nnU-Net's naming CASE_XXXX{ending} (XXXX: the 4-digit "
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
            f"{case}: {', '.join(f'{c:04d}' for c in found)}" for case, found in list(wrong.items())[:LISTED]
        )
        raise PredictionError(
            f"-i {input_dir}: the model takes {n_channels} channel(s) {dict(channels)} (dataset.json channel_names), "
            f"so every case needs _0000 ... _{n_channels - 1:04d}{ending}; found {listed}"
        )
    return {case: [found[c] for c in range(n_channels)] for case, found in sorted(by_case.items())}


def check_input_images(input_dir: Path, cases: dict[str, list[Path]], dataset_json: dict[str, Any]) -> None:
    """The file checks prepare runs on training images, before any model is loaded: nnU-Net's reader zero-fills a
    truncated .nii.gz and turns NaN/inf into 0, so without them such an input is segmented without a word."""
    from nnfiltermatch.data.image_checks import check_image_files

    files = [f for channel_files in cases.values() for f in channel_files]
    problems = check_image_files(files, Path(input_dir), dataset_json.get("file_ending", ".nii.gz"))
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems[:LISTED])
        more = f"\n  ... and {len(problems) - LISTED} more" if len(problems) > LISTED else ""
        raise PredictionError(
            f"-i {input_dir}: {len(problems)} image(s) cannot be used; nothing was predicted:\n{listed}{more}"
        )


def listed_names(paths: Sequence[Path]) -> str:
    return listed([p.name for p in paths])


def check_output_dir(output_dir: Path, input_dir: Path) -> None:
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
    from nnfiltermatch.data.image_checks import check_image_files

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
                f"({listed_names(there)}); nothing was predicted. Pass --continue_prediction to keep the complete "
                "ones and predict only the rest, or --overwrite to predict every case again and replace them"
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


def remove_partial_files(output_dir: Path, names: set[str]) -> None:
    """Remove the temporary segmentations a killed run left for these output names (only ours: PARTIAL_NAME)."""
    if output_dir.is_dir():
        for p in output_dir.glob(f"{PARTIAL_PREFIX}*"):
            match = PARTIAL_NAME.match(p.name)
            if match and match["target"] in names:
                p.unlink(missing_ok=True)
