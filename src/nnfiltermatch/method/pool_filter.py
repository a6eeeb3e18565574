"""The filter round of the unlabelled pool as data: what a round decided, and the decision itself.

A round scores every case of the pool, drops the most confident fraction (``uncertainty.select_cases_to_drop``)
and is recorded in the run folder as ``filter_rounds/epoch_XXXX.json`` and in the checkpoint. ``FilterRound``
reads and writes that record; ``decide_round`` is the decision, pure, so it is tested without a trainer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from nnfiltermatch.method.uncertainty import reduce_case_score, select_cases_to_drop, voxel_entropy

__all__ = ["CaseScore", "FilterRound", "decide_round", "case_score"]


@dataclass(frozen=True)
class CaseScore:
    """One case of a round: its score (lower is more confident) and whether it stayed in the pool."""

    case: str
    score: float
    kept: bool

    def to_json(self) -> dict[str, Any]:
        return {"case": self.case, "score": self.score, "kept": self.kept}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CaseScore:
        return cls(case=str(data["case"]), score=float(data["score"]), kept=bool(data["kept"]))


@dataclass(frozen=True)
class FilterRound:
    """One filter round: when it ran, how it scored, and every case of the pool before it (sorted by id).

    ``score`` is the per-case reduction of the voxel entropy (``TrainConfig.score``); ``mirroring`` and
    ``tile_step`` are the sliding-window settings it scored with; ``world_size`` is set under DDP only.
    """

    epoch: int
    score: str
    mirroring: bool
    tile_step: float
    seconds: float
    cases: tuple[CaseScore, ...] = field(default_factory=tuple)
    world_size: int | None = None

    @property
    def pool_before(self) -> int:
        return len(self.cases)

    @property
    def pool_after(self) -> int:
        return sum(c.kept for c in self.cases)

    @property
    def dropped(self) -> list[str]:
        """The dropped cases, by id."""
        return [c.case for c in self.cases if not c.kept]

    def remaining(self, pool: Sequence[str]) -> list[str]:
        """``pool`` without the cases this round dropped, in the pool's own order."""
        dropped = set(self.dropped)
        return [case for case in pool if case not in dropped]

    def to_json(self) -> dict[str, Any]:
        """The record as the round file and the checkpoint hold it (keys in this order)."""
        record: dict[str, Any] = {
            "epoch": self.epoch,
            "score": self.score,
            "mirroring": self.mirroring,
            "tile_step": self.tile_step,
            "pool_before": self.pool_before,
            "pool_after": self.pool_after,
            "seconds": self.seconds,
            "cases": [c.to_json() for c in self.cases],
        }
        if self.world_size is not None:
            record["world_size"] = self.world_size
        return record

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FilterRound:
        """Read a record; keys it does not know are ignored, as ``TrainConfig.from_dict`` ignores them.

        ``pool_before`` and ``pool_after`` are not read: they follow from ``cases``.
        """
        try:
            return cls(
                epoch=int(data["epoch"]),
                score=str(data["score"]),
                mirroring=bool(data["mirroring"]),
                tile_step=float(data["tile_step"]),
                seconds=float(data["seconds"]),
                cases=tuple(CaseScore.from_json(c) for c in data["cases"]),
                world_size=int(data["world_size"]) if data.get("world_size") is not None else None,
            )
        except KeyError as exc:
            raise ValueError(f"not a filter round record: no {exc.args[0]!r} in it") from None


def decide_round(
    pool: Sequence[str],
    scores: Mapping[str, float],
    drop_fraction: float,
    *,
    epoch: int,
    score: str,
    mirroring: bool,
    tile_step: float,
    seconds: float,
) -> FilterRound:
    """The round that drops the ``drop_fraction`` most confident cases of ``pool`` by ``scores``.

    The count rule, the tie break (by case id) and the refusal of NaN scores are ``select_cases_to_drop``'s; the
    keyword arguments only describe the round. Every pool case needs a score; scores of other cases are ignored.
    """
    if len(set(pool)) != len(pool):
        raise ValueError("the pool lists a case twice")
    missing = [case for case in pool if case not in scores]
    if missing:
        raise ValueError(f"no score for {len(missing)} case(s) of the pool ({', '.join(sorted(missing)[:5])})")
    dropped = set(select_cases_to_drop({case: scores[case] for case in pool}, drop_fraction))
    return FilterRound(
        epoch=epoch,
        score=score,
        mirroring=mirroring,
        tile_step=tile_step,
        seconds=round(seconds, 3),
        cases=tuple(CaseScore(case, scores[case], case not in dropped) for case in sorted(pool)),
    )


def case_score(logits: Tensor, how: str, topk_fraction: float) -> float:
    """One case's filter score from its logits (C, *spatial): the voxel entropy of the softmax, reduced by ``how``."""
    probs = torch.softmax(logits.float(), dim=0)
    return reduce_case_score(voxel_entropy(probs, dim=0), how, topk_fraction)
