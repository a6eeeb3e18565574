"""The guards and records of a run folder: a --continue that cannot be the run it continues, a finished run that
can be reused, the labelled cases a run started with, the checkpoint a validation reads."""

from __future__ import annotations

import json
from pathlib import Path

from nnfiltermatch.config import CONFIG_FILENAME, TrainConfig, option_flag
from nnfiltermatch.data.manifest import PreparedDataset
from nnfiltermatch.errors import PreparationError
from nnfiltermatch.runs import CHECKPOINTS

# config.extra key: the labelled case IDs a run started with (the dataset's, as prepare left them)
LABELED_IDS_KEY = "labeled_ids"


def record_labelled_cases(config: TrainConfig, prepared: PreparedDataset) -> None:
    """Note in ``config`` the labelled cases this run trains on, so ``--continue`` can tell when they changed."""
    config.extra = {**config.extra, LABELED_IDS_KEY: sorted(prepared.labeled_ids)}


def finished_with(out: Path, config: TrainConfig) -> bool:
    """A finished run in ``out`` trained with exactly ``config`` and the same labelled cases (bookkeeping aside):
    with a deterministic configuration it is the model that training again would give, so it can be reused."""
    stored = out / CONFIG_FILENAME
    if not (out / "checkpoint_final.pth").is_file() or not stored.is_file():
        return False
    theirs_config = TrainConfig.from_dict(json.loads(stored.read_text()))
    theirs_cases, ours_cases = theirs_config.extra.get(LABELED_IDS_KEY), config.extra.get(LABELED_IDS_KEY)
    if theirs_cases is not None and ours_cases is not None and sorted(theirs_cases) != sorted(ours_cases):
        return False
    ignore = {"extra", "labeled_fraction"}
    theirs = {k: v for k, v in theirs_config.to_dict().items() if k not in ignore}
    ours = {k: v for k, v in config.to_dict().items() if k not in ignore}
    return theirs == ours


def _listed_cases(cases: list[str], limit: int = 5) -> str:
    more = f" and {len(cases) - limit} more" if len(cases) > limit else ""
    return ", ".join(cases[:limit]) + more


def check_continue(stored: TrainConfig, config: TrainConfig, explicit_options: frozenset[str], where: Path) -> None:
    """Refuse a ``--continue`` that cannot be the run it continues, naming each option with both values.

    ``stored``: the configuration in ``where`` (the run's); ``config``: this command's, with its labelled cases.
    Why each is refused rather than applied: ``--epochs`` set the learning-rate schedule (nnU-Net's polynomial decay
    to 0 at the last epoch), the warm-up, the ramp and the filter rounds of the epochs already trained, so no run
    of the new length trains them so; ``--seed`` drew every batch of them; a changed labelled set (``prepare`` with
    another list re-plans and replaces the model folder's plans.json; ``--add-labels`` moves cases) trained none of
    them. Any other option changes the method half-way.
    """
    options = []
    for name in sorted(explicit_options):
        theirs, ours = getattr(stored, name), getattr(config, name)
        if ours == theirs:
            continue
        why = {
            "epochs": ": the learning-rate schedule, warm-up, ramp and filter rounds of the epochs already trained "
            "follow from it",
            "seed": ": the epochs already trained drew their batches and views from it",
        }.get(name, "")
        options.append(f"{option_flag(name)} {ours} (stored {theirs}){why}")
    problems = list(options)
    before, now = stored.extra.get(LABELED_IDS_KEY), config.extra.get(LABELED_IDS_KEY)
    if before is not None and now is not None and sorted(before) != sorted(now):
        added, removed = sorted(set(now) - set(before)), sorted(set(before) - set(now))
        change = [f"added {_listed_cases(added)}"] if added else []
        change += [f"no longer labelled {_listed_cases(removed)}"] if removed else []
        problems.append(
            f"the labelled cases of the prepared dataset: {len(now)} now, {len(before)} when the run started "
            f"({'; '.join(change)}): the epochs already trained learnt from the old set"
        )
    if problems:
        leave = "Leave these options out (or give the stored values) to resume it. " if options else ""
        raise PreparationError(
            f"--continue resumes the run in {where.parent} as it would have gone on uninterrupted, with the "
            f"configuration stored in {where} and the labelled cases it started with; it cannot honour:\n  "
            + "\n  ".join(problems)
            + f"\n{leave}To train with other values or labelled cases, start a new run: --overwrite replaces this "
            "one; after `prepare --add-labels`, `train --round K` trains round K into its own folder."
        )


def require_unlabeled(prepared: PreparedDataset, config: TrainConfig, dataset_name: str) -> None:
    """Refuse a mode that trains on unlabelled images when the dataset was prepared without any."""
    if config.uses_unlabeled and not prepared.unlabeled_ids:
        raise PreparationError(
            f"mode {config.mode} needs unlabelled images but {dataset_name} was prepared without any: add images to "
            "imagesUnlabeled/ or prepare with a labelled list, or use --mode supervised"
        )


def validation_checkpoint_file(out: Path, checkpoint: str, option: str) -> Path:
    """The checkpoint a validation reads (``final``/``best``); refused, naming the file, when it is not there."""
    path = out / CHECKPOINTS[checkpoint]
    if path.is_file():
        return path
    found = sorted(p.name for p in out.glob("checkpoint_*.pth")) if out.is_dir() else []
    if not found:
        state = f"{out} holds no checkpoint: this fold is not trained (train it first, without {option})"
    elif checkpoint == "final":
        state = (
            f"the folder holds only {', '.join(found)}: the training did not finish (resume it with --continue), or "
            "validate with checkpoint_best.pth (--val --val_best)"
        )
    else:
        state = f"the folder holds {', '.join(found)}: no best checkpoint was saved; validate checkpoint_final (--val)"
    raise PreparationError(f"{option}: {path} does not exist; {state}")
