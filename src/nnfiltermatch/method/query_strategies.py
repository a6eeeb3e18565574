"""Query strategies: how a query orders the unlabelled pool, and the words for why a case was picked.

Strategies (:data:`STRATEGIES`, name -> :class:`Strategy`; a new one is one entry). Uncertainty strategies rank by
a voxel map reduced per case by :func:`nnfiltermatch.method.uncertainty.reduce_case_score`:

* ``entropy``: Shannon entropy of the softmax (the filter's score; the strongest simple choice in the literature);
* ``margin``: ``1 - (p1 - p2)`` of the two most likely classes;
* ``tta-variance``: variance of the softmax over the test-time flips (every combination of the predictor's mirror
  axes, the identity included), averaged over classes. It costs one prediction per flip (8 for 3D).

The baselines an uncertainty ranking has to beat (nnActive, TMLR 2025: none of the query methods it tested beat
foreground-aware random selection reliably) order the cases by a seeded draw instead (:func:`random_draw`):

* ``random``: every case, in random order; needs no prediction;
* ``foreground-random``: only the cases whose predicted foreground exceeds ``min_foreground_ml``, in the same random
  order. nnActive's foreground-aware baseline samples patches around the *true* foreground, an oracle a real
  annotation round does not have; per case and from the model's prediction is the version a user can run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_SEED = 0
DEFAULT_MIN_FOREGROUND_ML = 0.1  # below this, a predicted "structure" is a few stray voxels, not something to draw
DISPLAY_MAP = "entropy"  # the voxel map shown (and predicted) for strategies that rank without one


# ----- the ranking ------------------------------------------------------------------------------------------------
@dataclass
class RankedCase:
    case: str
    score: float  # what the ranking sorts by, highest first: the case's uncertainty, or a strategy's random draw
    source: str  # "computed", "reused" (from a filter round) or "drawn" (a random strategy's draw)
    voxels: dict[int, int] | None = None  # foreground label -> predicted voxels (None: not predicted)
    voxel_ml: float | None = None
    rank: int = 0

    @property
    def foreground_ml(self) -> float | None:
        """Predicted foreground of all labels together in mL; None when the case was not predicted."""
        if self.voxels is None or self.voxel_ml is None:
            return None
        return sum(self.voxels.values()) * self.voxel_ml


# ----- strategies -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StrategyOptions:
    """Every setting a strategy may read, in one object: a new strategy needs an entry, not new plumbing."""

    seed: int = DEFAULT_SEED
    min_foreground_ml: float = DEFAULT_MIN_FOREGROUND_ML
    reduce: str = "mean"
    roi: bool = False


@dataclass(frozen=True)
class Strategy:
    """How a strategy orders the pool: what must be predicted first, each case's priority (highest first; None
    leaves the case out of the ranking) and the words for why a case was picked."""

    summary: str
    voxel_map: str | None  # the uncertainty map reduced per case (see uncertainty_map); None: ranks by a draw
    predicts: bool  # every case is predicted first (for its uncertainty or its predicted foreground)
    priority: Callable[[RankedCase, StrategyOptions], float | None]
    explain: Callable[[RankedCase, StrategyOptions], str]

    @property
    def shown_map(self) -> str:
        """The voxel map the PNGs show (and score_cases computes): a random strategy shows the entropy."""
        return self.voxel_map or DISPLAY_MAP


def random_draw(seed: int, case: str) -> float:
    """A uniform number in [0, 1) fixed by the seed and the case ID alone.

    Why a hash rather than a generator stepping through the pool: a case keeps its draw whatever else is in the
    pool, so a random ranking is reproducible across machines and Python versions, a ``--cases`` subset ranks as
    in the full pool, and foreground-random picks exactly random's order restricted to its eligible cases.
    """
    digest = hashlib.sha256(f"nnfiltermatch-query:{seed}:{case}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53)


def _by_uncertainty(row: RankedCase, options: StrategyOptions) -> float | None:
    return row.score


def _by_draw(row: RankedCase, options: StrategyOptions) -> float | None:
    return random_draw(options.seed, row.case)


def _by_draw_with_foreground(row: RankedCase, options: StrategyOptions) -> float | None:
    volume = row.foreground_ml
    if volume is None:
        raise ValueError(f"foreground-random needs the prediction of {row.case}; it was not predicted")
    return random_draw(options.seed, row.case) if volume > options.min_foreground_ml else None


def _explain_uncertainty(row: RankedCase, options: StrategyOptions) -> str:
    return f"per-case {options.reduce}{' in the ROI' if options.roi else ''} = {row.score:.4g} ({row.source})"


def _explain_draw(row: RankedCase, options: StrategyOptions) -> str:
    return f"random draw {row.score:.4f} (seed {options.seed})"


def _explain_draw_with_foreground(row: RankedCase, options: StrategyOptions) -> str:
    volume = row.foreground_ml
    return (
        f"predicted foreground {volume:.3g} mL > {options.min_foreground_ml:g} mL; random draw {row.score:.4f} "
        f"(seed {options.seed})"
    )


STRATEGIES: dict[str, Strategy] = {
    "entropy": Strategy(
        "Shannon entropy of the softmax, per case (the filter's score)",
        "entropy",
        True,
        _by_uncertainty,
        _explain_uncertainty,
    ),
    "margin": Strategy(
        "1 - (p1 - p2) of the two most likely classes", "margin", True, _by_uncertainty, _explain_uncertainty
    ),
    "tta-variance": Strategy(
        "variance of the softmax over the test-time flips (one prediction per flip)",
        "tta-variance",
        True,
        _by_uncertainty,
        _explain_uncertainty,
    ),
    "random": Strategy("every case in a seeded random order (no prediction)", None, False, _by_draw, _explain_draw),
    "foreground-random": Strategy(
        "the seeded random order, among cases whose predicted foreground exceeds --min-foreground-ml",
        None,
        True,
        _by_draw_with_foreground,
        _explain_draw_with_foreground,
    ),
}
SCORE_TYPES: tuple[str, ...] = tuple(name for name, s in STRATEGIES.items() if s.voxel_map is not None)
