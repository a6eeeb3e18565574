"""Every random stream of a training epoch, seeded at its start from (seed, epoch, rank) alone.

Why: what an epoch draws then depends on the seed, the epoch and the state a checkpoint holds (weights, optimiser,
teacher, pool, logs), never on what the process drew before it: nnU-Net's first batches in ``get_dataloaders``, or
the epochs a resumed run did not run. So ``--continue`` from any checkpoint replays the epochs after it as the
uninterrupted run drew them. The streams: Python's, NumPy's and torch's global generators (nnU-Net's labelled and
validation loaders and their augmentation, in this process), the unlabelled stream's own state, and the strong-view
generator; per rank, so DDP ranks draw different data. nnU-Net's worker processes (``nnUNet_n_proc_DA`` > 0) seed
themselves from the operating system: nothing repeats them, resumed or not.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from nnfiltermatch.nnunet.unlabeled import OwnRandomStream

# the random streams of a training epoch, each seeded at the start of every epoch (seed_epoch)
RANDOM_STREAMS = ("augmentation", "unlabelled", "views")


def epoch_seed(seed: int, epoch: int, rank: int, stream: str) -> int:
    """The seed of one random stream in one epoch on one DDP rank: 32 bits mixed by NumPy's ``SeedSequence``, so
    no two (seed, epoch, rank, stream) share a sequence, as sums like seed + epoch would."""
    return int(np.random.SeedSequence([seed, epoch, rank, RANDOM_STREAMS.index(stream)]).generate_state(1)[0])


def seed_epoch(seed: int, epoch: int, rank: int, unlabelled_loader: Any, views: torch.Generator) -> None:
    """Seed every stream of ``epoch``: the global generators, ``unlabelled_loader`` where it draws from its own
    state (a single-process ``OwnRandomStream``), and the strong-view generator ``views``."""
    augmentation = epoch_seed(seed, epoch, rank, "augmentation")
    random.seed(augmentation)
    np.random.seed(augmentation)
    torch.manual_seed(augmentation)
    if isinstance(unlabelled_loader, OwnRandomStream):
        unlabelled_loader.reseed(epoch_seed(seed, epoch, rank, "unlabelled"))
    views.manual_seed(epoch_seed(seed, epoch, rank, "views"))
