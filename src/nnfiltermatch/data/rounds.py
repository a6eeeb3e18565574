"""Annotation rounds: the model folder of each round, and ``rounds.json``, the record of every round.

A round is one labelling event: ``query --export`` picks cases with the last round's model, annotators correct
them, ``prepare --add-labels`` adds them (round K), and ``train --round K`` trains round K's model. Why a separate
folder per round: the model that chose the cases must stay as it was, or the record of why they were chosen (and
the curve of Dice against labelled cases) is lost. Why the round goes into the trainer part of the folder name
(``<Trainer>_roundK__<Plans>__<configuration>/fold_X``): nnU-Net's own tools build the same path from ``-tr``, so
``nnUNetv2_predict -tr nnFilterMatchTrainer_round2 ...`` finds it, while the checkpoint keeps the class's real name,
which is what predict builds the network from. Round 0 is the initial labelled set; its model is the plain folder,
so training without ``--round`` is round 0's folder, as before.

``rounds.json`` lives in the dataset's nnUNet_preprocessed folder (beside the manifest whose labelled list it
explains) and is always written whole, atomically, under its own lock.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from nnfiltermatch.data.layout import preprocessed_root
from nnfiltermatch.data.manifest import load_prepared
from nnfiltermatch.files import atomic_write_text
from nnfiltermatch.locks import LockError, run_lock

ROUNDS_NAME = "rounds.json"
ROUNDS_FORMAT = 1
ROUNDS_LOCK_NAME = ".nnfiltermatch_rounds.lock"
QUERY_SETTINGS_NAME = "query.json"  # written by query --export beside selection.csv
SELECTION_CSV = "selection.csv"
LOCK_WAIT_SECONDS = 60.0
_ROUND_SUFFIX = re.compile(r"^(?P<trainer>.+?)_round(?P<round>\d+)$")


class RoundError(ValueError):
    """A round cannot be recorded or trained as asked; the message says what to do instead."""


# ----- folder names -----------------------------------------------------------------------------------------------
def trainer_folder_name(trainer_name: str, round_number: int | None) -> str:
    """The trainer part of the model folder: round 0 (or no round) is nnU-Net's plain name, round K adds _roundK."""
    if round_number is None or round_number == 0:
        return trainer_name
    if round_number < 0:
        raise RoundError(f"--round {round_number}: give 0 or more")
    return f"{trainer_name}_round{round_number}"


def split_model_folder_name(name: str) -> tuple[str, str, str] | None:
    """``<Trainer>__<Plans>__<configuration>`` as (trainer, plans, configuration); None for other names."""
    parts = name.split("__")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 and all(parts) else None


def base_trainer_name(trainer_folder: str) -> str:
    """The trainer part of a model folder without its round: nnFilterMatchTrainer_ssl_round2 -> ..._ssl."""
    match = _ROUND_SUFFIX.match(trainer_folder)
    return match["trainer"] if match else trainer_folder


def round_of_model_dir(model_dir: Path) -> int | None:
    """The round a model folder belongs to by its name (0: no _roundK); None when it is not nnU-Net's layout."""
    parts = split_model_folder_name(Path(model_dir).name)
    if parts is None:
        return None
    match = _ROUND_SUFFIX.match(parts[0])
    return int(match["round"]) if match else 0


def model_dir_for_round(model_dir: Path, round_number: int | None) -> Path:
    """The same model (trainer, plans, configuration) in another round's folder, beside ``model_dir``."""
    model_dir = Path(model_dir)
    parts = split_model_folder_name(model_dir.name)
    if parts is None:
        raise RoundError(f"{model_dir}: not a <Trainer>__<Plans>__<configuration> folder, so it has no rounds")
    base = base_trainer_name(parts[0])
    return model_dir.with_name("__".join((trainer_folder_name(base, round_number), parts[1], parts[2])))


# ----- rounds.json ------------------------------------------------------------------------------------------------
def rounds_path(dataset_name: str) -> Path:
    return preprocessed_root(dataset_name) / ROUNDS_NAME


def load_rounds(dataset_name: str, path: Path | None = None) -> dict[str, Any] | None:
    """The dataset's record of rounds, or None before the first ``--add-labels`` / ``train --round``."""
    path = rounds_path(dataset_name) if path is None else Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RoundError(f"{path}: cannot read it as JSON ({exc}); restore it or move it away") from exc
    if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
        raise RoundError(f"{path}: not a rounds record (no 'rounds' list); restore it or move it away")
    return data


def _write(dataset_name: str, data: dict[str, Any]) -> Path:
    return atomic_write_text(rounds_path(dataset_name), json.dumps(data, indent=2) + "\n")


@contextmanager
def _rounds_lock(dataset_name: str, what: str) -> Iterator[None]:
    """Read-modify-write of rounds.json one process at a time. Waits (a train ending while labels are added must
    still record its model) instead of refusing, for up to ``LOCK_WAIT_SECONDS``."""
    lock = rounds_path(dataset_name).with_name(ROUNDS_LOCK_NAME)
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(run_lock(lock, what))
                break
            except LockError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield


def _new_record(dataset_name: str) -> dict[str, Any]:
    return {"format": ROUNDS_FORMAT, "dataset": dataset_name, "rounds": []}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _round_entry(number: int, labelled: Sequence[str]) -> dict[str, Any]:
    return {
        "round": number,
        "labelled": len(labelled),
        "labelled_cases": sorted(labelled),
        "added": [],
        "query": None,
        "models": [],
    }


def _find(data: dict[str, Any], number: int) -> dict[str, Any] | None:
    return next((r for r in data["rounds"] if int(r["round"]) == number), None)


def _add_model(entry: dict[str, Any], model: dict[str, Any]) -> None:
    """One record per model folder and fold: a retrained fold replaces its earlier record."""
    same = [m for m in entry["models"] if m.get("folder") == model["folder"] and str(m.get("fold")) == model["fold"]]
    for old in same:
        entry["models"].remove(old)
    entry["models"].append(model)


def next_round(dataset_name: str, model_dir: Path | None = None) -> int:
    """The number the next ``--add-labels`` records: one after the last recorded round, else after the model's."""
    try:
        data = load_rounds(dataset_name)
    except (RoundError, RuntimeError):  # unreadable, or nnUNet_preprocessed not set (PreparationError)
        data = None
    if data and data["rounds"]:
        return max(int(r["round"]) for r in data["rounds"]) + 1
    model_round = round_of_model_dir(model_dir) if model_dir is not None else None
    return (model_round or 0) + 1


# ----- what chose the cases: the query export ---------------------------------------------------------------------
def read_query_export(labels_dir: Path, export_dir: Path | None = None) -> tuple[dict[str, Any] | None, Path | None]:
    """The settings of the ``query --export`` that chose the cases in ``labels_dir``, and its folder.

    ``export_dir`` None: the parent of ``labels_dir`` when it is an export (has selection.csv), which is the layout
    the export hands out (DIR/labelsTr); otherwise nothing is known. query.json holds the settings; an export
    without one (older versions) still gives the strategy and the picked cases from selection.csv.
    """
    explicit = export_dir is not None
    folder = Path(export_dir) if explicit else Path(labels_dir).resolve().parent
    settings_file, selection = folder / QUERY_SETTINGS_NAME, folder / SELECTION_CSV
    if not selection.is_file() and not settings_file.is_file():
        if explicit:
            raise RoundError(
                f"--query-export {folder}: not a query export (no {SELECTION_CSV} or {QUERY_SETTINGS_NAME} in it)"
            )
        return None, None
    settings: dict[str, Any] = {}
    if settings_file.is_file():
        try:
            settings = json.loads(settings_file.read_text())
        except (OSError, ValueError) as exc:
            raise RoundError(f"{settings_file}: cannot read it as JSON ({exc})") from exc
    if selection.is_file() and "cases" not in settings:
        with open(selection, newline="") as handle:
            rows = list(csv.DictReader(handle))
        settings["cases"] = [r["case"] for r in rows if r.get("case")]
        settings.setdefault("strategy", next((r.get("strategy") for r in rows if r.get("strategy")), None))
        settings.setdefault("n", len(rows))
    settings["export_dir"] = str(folder.resolve())
    return settings, folder


# ----- writers ----------------------------------------------------------------------------------------------------
def record_added_labels(
    dataset_name: str,
    labelled_before: Sequence[str],
    added: Sequence[str],
    labels_dir: Path,
    query: dict[str, Any] | None,
) -> tuple[dict[str, Any], list[str]]:
    """Record the labels just added as the next round; returns (its entry, notes for the user).

    The first record also writes round 0, the labelled set before, so the rounds start from where the
    dataset was. The query's model is recorded in its round when that round has no record of it (the round-0
    model is trained without --round, so this is where it is learnt).
    """
    notes: list[str] = []
    with _rounds_lock(dataset_name, f"prepare {dataset_name} --add-labels: rounds.json"):
        data = load_rounds(dataset_name) or _new_record(dataset_name)
        if not data["rounds"]:
            data["rounds"].append(_round_entry(0, labelled_before))
        last = max(data["rounds"], key=lambda r: int(r["round"]))
        if sorted(last["labelled_cases"]) != sorted(labelled_before):
            notes.append(
                f"rounds.json: round {last['round']} had {last['labelled']} labelled cases, the dataset had "
                f"{len(labelled_before)} before these (labels changed outside --add-labels); round "
                f"{int(last['round']) + 1} records the set as it is now"
            )
        number = int(last["round"]) + 1
        entry = _round_entry(number, [*labelled_before, *added])
        entry.update(added=sorted(added), added_at=_now(), labels_dir=str(Path(labels_dir).resolve()), query=query)
        if query is not None:
            picked = [str(c) for c in query.get("cases") or []]
            unpicked = sorted(set(added) - set(picked)) if picked else []
            if unpicked:
                notes.append(f"not picked by the query of {query.get('export_dir')}: {', '.join(unpicked)}")
            skipped = sorted(set(picked) - set(added))
            if skipped:
                entry["picked_not_labelled"] = skipped
            expected = query.get("next_round")
            if expected is not None and int(expected) != number:
                notes.append(f"the export expected these labels to be round {expected}; rounds.json records {number}")
            model_dir, model_round = query.get("model_dir"), query.get("model_round")
            if model_dir and model_round is not None:
                chooser = _find(data, int(model_round))
                if chooser is not None and not any(m.get("folder") == model_dir for m in chooser["models"]):
                    for fold in query.get("folds") or []:
                        _add_model(
                            chooser,
                            {
                                "folder": model_dir,
                                "fold": str(fold),
                                "mode": query.get("mode"),
                                "configuration": query.get("configuration"),
                                "recorded_by": f"query --export (the model that chose round {number})",
                                "recorded_at": _now(),
                            },
                        )
        data["rounds"].append(entry)
        _write(dataset_name, data)
    return entry, notes


def check_round_for_training(dataset_name: str, round_number: int, labelled: Sequence[str]) -> str | None:
    """Refuse a ``train --round K`` whose labelled set is not round K's; returns a note, or None.

    Why: a round's model is the point of the curve "Dice at this many labelled cases"; trained before the round's
    labels were added, or after the next round's, it would sit at the wrong point.
    """
    data = load_rounds(dataset_name)
    if data is None or not data["rounds"]:
        if round_number == 0:
            return None
        raise RoundError(
            f"--round {round_number}: {rounds_path(dataset_name)} records no rounds yet. Round 0 is the labelled set "
            "you started from (train it with --round 0 or without --round); each `nnfiltermatch prepare "
            "--add-labels` records the next round, then train it with --round <that round>"
        )
    numbers = sorted(int(r["round"]) for r in data["rounds"])
    entry = _find(data, round_number)
    if entry is None:
        raise RoundError(
            f"--round {round_number}: rounds.json records rounds {', '.join(map(str, numbers))}. Add the labels of "
            f"round {numbers[-1] + 1} first (`nnfiltermatch prepare -d {dataset_name} --add-labels DIR`), or train "
            f"round {numbers[-1]}"
        )
    ours, now = set(entry["labelled_cases"]), set(labelled)
    if ours != now:
        later = [n for n in numbers if n > round_number]
        start = (
            f"--round {round_number}: round {round_number} had {len(ours)} labelled cases, the dataset has "
            f"{len(now)} now"
        )
        if later:
            raise RoundError(
                f"{start} (round(s) {', '.join(map(str, later))} added labels since); a model of round "
                f"{round_number} must train on that round's cases. Train the current round, --round {numbers[-1]}"
            )
        raise RoundError(
            f"{start}: the labelled set changed outside `prepare --add-labels` (a prepare with another labelled "
            f"list?). Add new labels with --add-labels, which records them as round {numbers[-1] + 1}, or prepare "
            f"again with round {round_number}'s cases (listed in {rounds_path(dataset_name)})"
        )
    return None


def record_trained_model(
    dataset_name: str,
    round_number: int,
    fold_dir: Path,
    *,
    mode: str,
    configuration: str,
    labelled: int,
    supervised_stage: Path | None = None,
) -> Path:
    """After ``train --round K`` finished: round K's record names the model (round 0's is created if needed)."""
    with _rounds_lock(dataset_name, f"train --round {round_number}: rounds.json"):
        data = load_rounds(dataset_name) or _new_record(dataset_name)
        entry = _find(data, round_number)
        if entry is None:
            if round_number != 0 or data["rounds"]:
                raise RoundError(f"rounds.json has no round {round_number} any more: {fold_dir} is not recorded")
            entry = _round_entry(0, load_prepared(dataset_name).labeled_ids)
            data["rounds"].append(entry)
        model = {
            "folder": str(Path(fold_dir).parent),
            "fold": Path(fold_dir).name.removeprefix("fold_"),
            "mode": mode,
            "configuration": configuration,
            "trained_on_labelled": labelled,
            "finished": _now(),
            "recorded_by": f"train --round {round_number}",
        }
        if supervised_stage is not None:
            model["supervised_stage"] = str(supervised_stage)
        _add_model(entry, model)
        data["rounds"].sort(key=lambda r: int(r["round"]))
        return _write(dataset_name, data)


def rounds_file_for_model(model_dir: Path) -> Path | None:
    """rounds.json of the dataset a model folder belongs to, if nnUNet_preprocessed is set and it exists."""
    model_dir = Path(model_dir)
    dataset_name = model_dir.parent.name
    plans = model_dir / "plans.json"
    if plans.is_file():
        try:
            dataset_name = str(json.loads(plans.read_text()).get("dataset_name") or dataset_name)
        except (OSError, ValueError):
            pass
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        return None
    path = Path(root) / dataset_name / ROUNDS_NAME
    return path if path.is_file() else None
