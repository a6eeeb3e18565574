"""The unlabelled stream's own random state (no nnU-Net needed: any iterator that draws random numbers)."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch

from nnfiltermatch.nnunet.unlabeled import OwnRandomStream


def _draws() -> Iterator[tuple[float, float, float]]:
    """Stands in for nnU-Net's loader, which samples and augments from all three global generators."""
    while True:
        yield random.random(), float(np.random.rand()), float(torch.rand(()))


def _global_draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_stream_draws_leave_the_process_random_numbers_alone() -> None:
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    expected = [_global_draws() for _ in range(3)]

    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    stream = OwnRandomStream(_draws(), seed=11)  # seeding it must not reseed the process either
    interleaved = []
    for _ in range(3):
        next(stream)
        interleaved.append(_global_draws())
    assert interleaved == expected


def test_stream_repeats_for_a_seed_whatever_the_process_draws() -> None:
    first = OwnRandomStream(_draws(), seed=11)
    a = [next(first) for _ in range(4)]
    torch.manual_seed(123), np.random.seed(9)
    second = OwnRandomStream(_draws(), seed=11)
    b = []
    for _ in range(4):
        _global_draws()
        b.append(next(second))
    assert a == b
    assert [next(OwnRandomStream(_draws(), seed=12)) for _ in range(1)] != a[:1]


def test_reseeded_stream_starts_again_as_a_fresh_one() -> None:
    """What the trainer does at each epoch start: a stream reseeded mid-way draws what a new one with that seed
    draws, so a resumed run's stream is the uninterrupted run's."""
    fresh = OwnRandomStream(_draws(), seed=21)
    expected = [next(fresh) for _ in range(3)]
    used = OwnRandomStream(_draws(), seed=11)
    for _ in range(5):
        next(used)
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    before = _global_draws()
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    used.reseed(21)
    assert _global_draws() == before  # reseeding leaves the process's generators alone
    assert [next(used) for _ in range(3)] == expected
