"""Non-finite training: weights that went NaN never reach a checkpoint, nor leave one.

A run whose loss stays non-finite stops with a message naming the last good checkpoint and how to resume from it;
a save refuses non-finite weights; a checkpoint whose optimizer state is not finite is refused on loading, with the
usable checkpoints beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nnfiltermatch.errors import PreparationError, listed
from nnfiltermatch.runs import CheckpointError, describe_epoch, non_finite_tensors, usable_checkpoints_beside

# Why 5, not 1: under CUDA mixed precision nnU-Net's GradScaler skips a step whose fp16 values overflowed and lowers
# its scale, so a lone non-finite loss can pass harmlessly; five in a row means the weights themselves are gone.
# (Without a scaler, on CPU, the first one already spoils them; the save guard keeps them off disk meanwhile.)
MAX_NON_FINITE_STEPS = 5


class NonFiniteTrainingError(PreparationError):
    """The training diverged (non-finite loss or weights); the message names the epoch and the last good checkpoint."""


@dataclass
class DivergenceWatch:
    """A run's streak of non-finite losses and the checkpoints it wrote: what the stop message names.

    ``resume_order`` is the order in which ``train --continue`` looks for a checkpoint in the fold folder.
    """

    resume_order: Sequence[str]
    streak: int = 0  # consecutive training steps with a non-finite loss
    since: int | None = None  # the epoch of the first of them
    good: dict[str, int] = field(default_factory=dict)  # file name -> epoch it ends, for the checkpoints this run wrote

    def observe_loss(self, loss: float, epoch: int, folder: Path, lr: float, log: Callable[[str], Any]) -> None:
        """Count consecutive non-finite losses; raise ``NonFiniteTrainingError`` at ``MAX_NON_FINITE_STEPS``."""
        if math.isfinite(loss):
            self.streak = 0
            self.since = None
            return
        self.streak += 1
        if self.since is None:
            self.since = epoch
            log(
                f"warning: training loss {loss} at epoch {epoch}; the run stops after "
                f"{MAX_NON_FINITE_STEPS} non-finite steps in a row"
            )
        if self.streak >= MAX_NON_FINITE_STEPS:
            raise NonFiniteTrainingError(
                self.stop_message(
                    f"the training loss has been non-finite ({loss}) for {self.streak} consecutive steps, "
                    f"since epoch {self.since}",
                    epoch,
                    folder,
                    lr,
                )
            )

    def refuse_non_finite(
        self, sets: Mapping[str, Mapping[str, torch.Tensor]], filename: str, epoch: int, folder: Path, lr: float
    ) -> None:
        """Raise ``NonFiniteTrainingError`` before ``filename`` is written with any non-finite weight in ``sets``."""
        bad = {part: names for part, weights in sets.items() if (names := non_finite_tensors(weights))}
        if bad:
            found = " and ".join(f"{len(n)} of {len(sets[p])} tensors of the {p} ({listed(n)})" for p, n in bad.items())
            after = f", after the training loss became non-finite at epoch {self.since}"
            raise NonFiniteTrainingError(
                self.stop_message(
                    f"the weights hold NaN or infinite values in {found}"
                    f"{after if self.since is not None else ''}; {filename} was not written",
                    epoch,
                    folder,
                    lr,
                )
            )

    def stop_message(self, reason: str, epoch: int, folder: Path, lr: float) -> str:
        """The stop message: what went non-finite, the last good checkpoint, and how to resume from it."""
        good = {name: written for name, written in self.good.items() if (folder / name).is_file()}
        text = f"training stopped at epoch {epoch}: {reason}."
        cure = f"a lower --lr (now {lr}) or a look at the training data is the usual cure"
        if not good:
            return f"{text} No checkpoint was written before: start again with --overwrite ({cure})."
        last = max(good, key=lambda name: (good[name], name == "checkpoint_latest.pth"))
        text += f" The last good checkpoint is {folder / last} ({describe_epoch(good[last])}); nothing later was saved."
        resume = next((name for name in self.resume_order if (folder / name).is_file()), last)
        if resume == last:
            text += " `--continue` resumes from it"
        else:
            text += (
                f" `--continue` resumes from {resume} ({describe_epoch(good.get(resume))}); to resume from {last}, "
                f"copy it over {resume} first"
            )
        return f"{text}; if the loss turns non-finite again, {cure}."


def verify_optimizer_state(checkpoint: Mapping[str, Any], path: Path) -> None:
    """Momentum buffers are about half the file and not in the digest: a NaN there spoils the first step."""
    entries = (checkpoint.get("optimizer_state") or {}).get("state") or {}
    tensors = {f"{index}.{key}": value for index, entry in entries.items() for key, value in entry.items()}
    bad = non_finite_tensors(tensors)
    if bad:
        raise CheckpointError(
            f"{path}: unusable optimizer state: {len(bad)} of {len(tensors)} tensors of its optimizer_state hold "
            f"NaN or infinite values ({listed(bad)}); resuming would turn every weight NaN at the first step."
        )


def resume_alternatives(path: Path, resume_order: Sequence[str]) -> str:
    """Which other checkpoints in the fold folder are usable, and the commands that resume from one."""
    others = usable_checkpoints_beside(path, resume_order)
    if not others:
        return f"No other usable checkpoint in {path.parent}: start again with --overwrite."
    listing = ", ".join(f"{name} ({describe_epoch(epoch)})" for name, epoch in others.items())
    pick = max(others, key=lambda name: others[name] if others[name] is not None else -1)
    return (
        f"Usable checkpoints beside it: {listing}. To resume from {pick}: in {path.parent} run "
        f"`mv {path.name} {path.name}.bad && cp {pick} {path.name}`, then train again with --continue."
    )
