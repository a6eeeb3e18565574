"""The semi-supervised step's pure parts: the strong view's draws, the joint batch and loss, the epoch's logs."""

from __future__ import annotations

import math

import torch

from nnfiltermatch.method.semi_supervised import (
    SemiSupervisedLoss,
    StrongViewOptions,
    epoch_summary,
    joint_batch,
    strong_view,
)
from nnfiltermatch.method.views import (
    cutmix,
    cutout,
    in_plane_shapes,
    paste_boxes,
    sample_geometric_transform,
    strong_intensity,
)

IGN = 7


def _step_inputs() -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    weak, labelled = torch.randn(2, 1, 4, 8, 8, generator=gen), torch.randn(2, 1, 4, 8, 8, generator=gen)
    pseudo = [torch.randint(0, 3, (2, 1, 4, 8, 8), generator=gen), torch.randint(0, 3, (2, 1, 2, 4, 4), generator=gen)]
    targets = [torch.randint(0, 3, (2, 1, 4, 8, 8), generator=gen), torch.randint(0, 3, (2, 1, 2, 4, 4), generator=gen)]
    return weak, pseudo, labelled, targets


def test_strong_view_draws_its_operations_in_order_from_one_generator() -> None:
    """Every operation on: the same draws as the operations called one after the other with the same generator."""
    weak, pseudo, labelled, targets = _step_inputs()
    options = StrongViewOptions(
        flip_from_epoch=1, strong_intensity=True, intensity_p=0.5, cutout_p=1.0, cutmix_p=1.0, copy_paste_p=1.0
    )
    strong, labels = strong_view(weak, pseudo, labelled, targets, torch.Generator().manual_seed(5), options, 1, IGN)

    gen = torch.Generator().manual_seed(5)
    transform = sample_geometric_transform(in_plane_shapes(pseudo), gen, True)
    expected, expected_labels = strong_intensity(transform.apply(weak), gen, p=0.5), transform.apply_all(pseudo)
    torch.rand((), generator=gen)  # cutout's draw against its probability (1: always applied)
    expected, expected_labels = cutout(expected, expected_labels, gen, IGN)
    torch.rand((), generator=gen)
    expected, expected_labels = cutmix(expected, expected_labels, gen)
    torch.rand((), generator=gen)
    expected, expected_labels = paste_boxes(expected, expected_labels, labelled, targets, gen, 2 / 3)
    assert torch.equal(strong, expected) and all(torch.equal(a, b) for a, b in zip(labels, expected_labels))
    assert all(torch.equal(a, b) for a, b in zip(pseudo, _step_inputs()[1]))  # inputs untouched


def test_strong_view_options_off_draw_nothing_and_flip_waits_for_its_epoch() -> None:
    weak, pseudo, labelled, targets = _step_inputs()
    off = StrongViewOptions(
        flip_from_epoch=3, strong_intensity=False, intensity_p=0.5, cutout_p=0.0, cutmix_p=0.0, copy_paste_p=0.0
    )
    gen = torch.Generator().manual_seed(9)
    strong, labels = strong_view(weak, pseudo, labelled, targets, gen, off, 2, IGN)
    replay = torch.Generator().manual_seed(9)
    transform = sample_geometric_transform(in_plane_shapes(pseudo), replay, False)
    assert not transform.flip and torch.equal(strong, transform.apply(weak))
    assert all(torch.equal(a, transform.apply(b)) for a, b in zip(labels, pseudo))
    assert torch.equal(gen.get_state(), replay.get_state())  # nothing else was drawn

    class Config:  # the training configuration has these attributes, and others
        flip_from_epoch, strong_intensity, intensity_p, cutout_p, cutmix_p, copy_paste_p, tau = 0, True, 0.3, 0, 0, 0, 1

    assert StrongViewOptions.of(Config()) == StrongViewOptions(0, True, 0.3, 0, 0, 0)


def test_unlabelled_loss_survives_fully_ignored_pseudo_labels() -> None:
    """Early after warm-up every voxel can fall below tau: the step must still give a differentiable loss."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    def dice_ce(weight_dice: float, ignore: int | None) -> DC_and_CE_loss:
        return DC_and_CE_loss(
            {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
            {},
            weight_ce=1,
            weight_dice=weight_dice,
            ignore_label=ignore,
            dice_class=MemoryEfficientSoftDiceLoss,
        )

    loss = SemiSupervisedLoss(dice_ce(1, None), dice_ce(0, 3))
    loss.n_labeled, loss.weight = 2, 1.0
    logits = torch.randn(4, 3, 8, 8, 8, requires_grad=True)
    target = torch.cat([torch.randint(0, 3, (2, 1, 8, 8, 8)), torch.full((2, 1, 8, 8, 8), 3)])
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value) and loss.last["unsup"] == 0.0
    assert logits.grad[2:].abs().sum() == 0 and logits.grad[:2].abs().sum() > 0


def test_joint_batch_keeps_the_target_layout_and_dtype() -> None:
    data, extra = torch.zeros(2, 1, 4, 4), torch.ones(3, 1, 4, 4)
    scales = [torch.zeros(2, 1, 4, 4, dtype=torch.int16), torch.zeros(2, 1, 2, 2, dtype=torch.int16)]
    pseudo = [torch.ones(3, 1, 4, 4, dtype=torch.int64), torch.ones(3, 1, 2, 2, dtype=torch.int64)]
    joint = joint_batch(data, scales, extra, pseudo)
    assert joint["data"].shape[0] == 5 and torch.equal(joint["data"][2:], extra)
    assert [t.shape[0] for t in joint["target"]] == [5, 5] and all(t.dtype == torch.int16 for t in joint["target"])
    single = joint_batch(data, scales[0], extra, pseudo[0])
    assert torch.is_tensor(single["target"]) and single["target"][2:].eq(1).all()


def test_epoch_summary_means_and_the_last_weight() -> None:
    steps = [
        {"sup": 1.0, "unsup": 0.0, "conf": float("nan"), "w": 0.0},
        {"sup": 3.0, "unsup": 2.0, "conf": 0.5, "w": 0.5},
    ]
    assert epoch_summary(steps) == {
        "sup_losses": 2.0,
        "unsup_losses": 1.0,
        "confident_fraction": 0.5,
        "unsup_weight": 0.5,
    }
    empty = epoch_summary([])
    assert math.isnan(empty["sup_losses"]) and math.isnan(empty["confident_fraction"])
    assert empty["unsup_losses"] == 0.0 and empty["unsup_weight"] == 0.0
