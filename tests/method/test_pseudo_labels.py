"""Tests for pseudo-labels (tau masking, DS scales, nnU-Net ignore-label loss), EMA and the ramp weight."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from nnfiltermatch.method.pseudo_labels import (
    ema_update,
    every_class_segmented,
    pseudo_labels_for_scales,
    pseudo_labels_from_logits,
    ramp_weight,
)

IGN = 3  # ignore label: one past the real classes 0..2, as nnU-Net numbers it


def _logits_from_probs(probs: torch.Tensor) -> torch.Tensor:
    return torch.log(probs)


def test_tau_masking_single_voxel() -> None:
    # voxel 0: max prob 0.6; voxel 1: max prob 0.9 (class 2)
    probs = torch.tensor([[0.6, 0.05], [0.3, 0.05], [0.1, 0.9]]).reshape(1, 3, 2, 1)
    logits = _logits_from_probs(probs)

    labels, conf = pseudo_labels_from_logits(logits, tau=0.7, ignore_index=IGN)
    assert labels.shape == (1, 1, 2, 1) and labels.dtype == torch.int64 and conf.dtype == torch.bool
    assert labels.flatten().tolist() == [IGN, 2]
    assert conf.flatten().tolist() == [False, True]

    labels, conf = pseudo_labels_from_logits(logits, tau=0.5, ignore_index=IGN)
    assert labels.flatten().tolist() == [0, 2]
    assert conf.all()


def test_tau_zero_keeps_everything_and_matches_argmax() -> None:
    logits = torch.randn(2, 4, 5, 6, 7)
    labels, conf = pseudo_labels_from_logits(logits, tau=0.0, ignore_index=99)
    assert conf.all()
    assert torch.equal(labels, logits.argmax(1, keepdim=True))


def test_no_grad_needed_and_no_graph_kept() -> None:
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels, conf = pseudo_labels_from_logits(logits, tau=0.5, ignore_index=IGN)
    assert not labels.requires_grad and not conf.requires_grad


def test_invalid_args() -> None:
    with pytest.raises(ValueError):
        pseudo_labels_from_logits(torch.randn(2, 3), tau=0.5, ignore_index=IGN)
    with pytest.raises(ValueError):
        pseudo_labels_from_logits(torch.randn(1, 3, 4, 4), tau=1.5, ignore_index=IGN)
    with pytest.raises(ValueError):
        pseudo_labels_for_scales([], tau=0.5, ignore_index=IGN)


def test_every_scale_handled_and_fraction_from_full_res() -> None:
    torch.manual_seed(0)
    shapes = [(40, 56, 40), (20, 28, 20), (10, 14, 10), (10, 7, 5)]
    logits = [torch.randn(2, 3, *s) * 3 for s in shapes]
    tau = 0.8
    labels, frac = pseudo_labels_for_scales(logits, tau=tau, ignore_index=IGN)
    assert len(labels) == len(shapes)
    for lg, lab in zip(logits, labels):
        assert lab.shape == (2, 1, *lg.shape[2:])
        p = torch.softmax(lg, 1)
        maxp, arg = p.max(1, keepdim=True)
        expected = torch.where(maxp >= tau, arg, IGN)
        assert torch.equal(lab, expected)
    full_p = torch.softmax(logits[0], 1).amax(1)
    assert frac == pytest.approx((full_p >= tau).float().mean().item())
    assert 0.0 < frac < 1.0
    _, frac0 = pseudo_labels_for_scales(logits, tau=0.0, ignore_index=IGN)
    assert frac0 == 1.0


@pytest.mark.parametrize("which", ["both", "ce", "dice"])
def test_nnunet_loss_honours_ignore_label(which: str) -> None:
    """DC_and_CE_loss with ignore_label: logits at ignored voxels do not matter, in the CE and in the Dice term."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    weight_ce = 0 if which == "dice" else 1
    weight_dice = 0 if which == "ce" else 1
    loss_fn = DC_and_CE_loss(
        {"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=weight_ce,
        weight_dice=weight_dice,
        ignore_label=IGN,
        dice_class=MemoryEfficientSoftDiceLoss,
    )
    g = torch.Generator().manual_seed(1)
    teacher_logits = torch.randn(2, 3, 12, 10, generator=g) * 2
    target, conf = pseudo_labels_from_logits(teacher_logits, tau=0.7, ignore_index=IGN)
    ignored = ~conf  # (B, 1, X, Y)
    assert ignored.any() and conf.any()

    student = torch.randn(2, 3, 12, 10, generator=g)
    base = loss_fn(student, target)

    perturb = torch.randn(student.shape, generator=g) * 5
    at_ignored = student + perturb * ignored  # broadcast over channels
    assert not torch.equal(at_ignored, student)
    assert torch.allclose(loss_fn(at_ignored, target), base, atol=1e-6)

    at_kept = student + perturb * conf
    assert not torch.allclose(loss_fn(at_kept, target), base, atol=1e-4)


def test_ema_update_numerics_and_buffers() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    student.train()
    student(torch.randn(8, 4))  # changes student running stats and num_batches_tracked
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    s0 = {k: v.clone() for k, v in student.state_dict().items()}

    ema_update(teacher, student, decay=0.9)
    t1 = teacher.state_dict()
    param_names = {n for n, _ in teacher.named_parameters()}
    buffer_names = {n for n, _ in teacher.named_buffers()}
    assert param_names and buffer_names
    for k in param_names:
        assert torch.allclose(t1[k], 0.9 * t0[k] + 0.1 * s0[k], atol=1e-7)
    for k in buffer_names:
        assert torch.equal(t1[k], s0[k])
    # student untouched
    for k, v in student.state_dict().items():
        assert torch.equal(v, s0[k])
    # decay 1 keeps the teacher's parameters, decay 0 copies the student's
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    ema_update(teacher, student, decay=1.0)
    for n, p in teacher.named_parameters():
        assert torch.equal(p, before[n])
    ema_update(teacher, student, decay=0.0)
    for n, p in teacher.named_parameters():
        assert torch.equal(p, dict(student.named_parameters())[n])
    assert all(not p.grad_fn for p in teacher.parameters())


def test_ema_update_rejects_mismatch_and_bad_decay() -> None:
    with pytest.raises(ValueError):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), decay=0.9)
    with pytest.raises(ValueError):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 2), decay=1.5)


def test_ramp_weight() -> None:
    # warm-up 5 epochs, ramp over 4, lambda 2
    values = [ramp_weight(e, 5, 4, 2.0) for e in range(12)]
    assert values[:5] == [0.0] * 5
    assert values[5:9] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert values[9:] == [2.0] * 3
    assert ramp_weight(0, 0, 0, 1.5) == 1.5
    assert ramp_weight(3, 3, -1, 0.7) == 0.7
    assert ramp_weight(2, 3, 0, 0.7) == 0.0
    assert math.isclose(ramp_weight(0, 0, 10, 1.0), 0.1)
    with pytest.raises(ValueError):
        ramp_weight(-1, 0, 1, 1.0)


def test_every_class_segmented_needs_each_class_at_the_floor() -> None:
    assert every_class_segmented([], 0.0) and every_class_segmented([[0.0]], 0.0)  # 0: never waits
    assert not every_class_segmented([], 0.5)  # no validation yet
    assert not every_class_segmented([[0.9, 0.9], [0.49, 0.9]], 0.5)  # the last validation counts
    assert every_class_segmented([[0.0, 0.1], [0.5, 0.9]], 0.5)
    assert not every_class_segmented([[float("nan"), 0.9]], 0.5)  # a class never seen in validation
