"""Our trainer classes by mode, imported only when asked for."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nnfiltermatch.runs import TRAINER_NAMES

if TYPE_CHECKING:
    from nnfiltermatch.nnunet.trainer import nnFilterMatchTrainer


def trainer_class(mode: str) -> type[nnFilterMatchTrainer]:
    """The trainer class that runs ``mode`` (``runs.TRAINER_NAMES`` names it)."""
    # imported here: nnU-Net reads its environment at import, so only after configure_runtime has set it
    from nnfiltermatch.nnunet import trainer

    return getattr(trainer, TRAINER_NAMES[mode])
