"""Tests for the strong view: shape-safe in-plane geometry, labels at every DS scale, intensity, cutout/cutmix."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from nnfiltermatch.method.views import (
    GeometricTransform,
    add_gaussian_noise,
    adjust_contrast,
    adjust_gamma,
    cutmix,
    cutout,
    gaussian_blur,
    in_plane_shapes,
    paste_boxes,
    sample_geometric_transform,
    strong_intensity,
)

IGN = 7


def _ds(label: torch.Tensor, scales: list[tuple[float, ...]]) -> list[torch.Tensor]:
    """Deep-supervision targets exactly as nnU-Net's DownsampleSegForDSTransform makes them (nearest-exact)."""
    out = []
    for s in scales:
        if all(v == 1 for v in s):
            out.append(label.clone())
            continue
        new_shape = [round(n * f) for n, f in zip(label.shape[2:], s)]
        out.append(F.interpolate(label.float(), new_shape, mode="nearest-exact").to(label.dtype))
    return out


def _f(image: torch.Tensor) -> torch.Tensor:
    """Label as a pointwise function of the image, so the label at any voxel can be recomputed from the image."""
    return (image[:, :1] > 0.3).long() + (image[:, :1] > 1.0).long()


# (spatial shape, DS scales); the last case pools in-plane non-uniformly, so a square patch has non-square scales
CASES = [
    ((56, 40), [(1, 1), (0.5, 0.5), (0.25, 0.25), (0.125, 0.125)]),
    ((40, 56, 40), [(1, 1, 1), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (0.125, 0.125, 0.125)]),
    ((20, 32, 32), [(1, 1, 1), (1, 0.5, 0.5), (0.5, 0.25, 0.25), (0.5, 0.125, 0.125)]),
    ((20, 32, 32), [(1, 1, 1), (1, 0.5, 1), (0.5, 0.25, 0.5), (0.5, 0.125, 0.25)]),
    ((48, 48), [(1, 1), (0.5, 0.5), (0.25, 0.25)]),
]


def _block_image(spatial: tuple[int, ...], scales: list[tuple[float, ...]], g: torch.Generator) -> torch.Tensor:
    """A random image constant on blocks of the coarsest DS grid, so every DS scale samples it without ambiguity."""
    block = [round(1 / min(s[d] for s in scales)) for d in range(len(spatial))]
    coarse = torch.randn(2, 2, *(n // b for n, b in zip(spatial, block)), generator=g)
    for d, b in enumerate(block):
        coarse = coarse.repeat_interleave(b, dim=2 + d)
    assert tuple(coarse.shape[2:]) == spatial
    return coarse


@pytest.mark.parametrize("spatial, scales", CASES)
def test_geometric_transform_label_consistency(spatial: tuple[int, ...], scales: list[tuple[float, ...]]) -> None:
    g = torch.Generator().manual_seed(0)
    noise_image = torch.randn(2, 2, *spatial, generator=g)
    block_image = _block_image(spatial, scales, g)
    shapes = in_plane_shapes([noise_image, *_ds(_f(noise_image), scales)])
    all_square = all(h == w for h, w in shapes)
    seen_k = set()
    for trial in range(24):
        rng = torch.Generator().manual_seed(trial) if trial % 2 else random.Random(trial)
        t = sample_geometric_transform(shapes, rng, allow_flip=True)
        seen_k.add(t.k)
        if not all_square:
            assert t.k == 2
        # full resolution, any image: the label of every voxel of T(image) is T(label)
        t_noise = t.apply(noise_image)
        assert t_noise.shape == noise_image.shape
        assert torch.equal(_f(t_noise), t.apply(_f(noise_image)))
        # every DS scale (block-constant image, see _block_image): recomputing the labels of T(image) and downsampling
        # them as nnU-Net does gives exactly the transformed DS labels, so T acts on the right axes at every scale
        labels = _ds(_f(block_image), scales)
        t_img = t.apply(block_image)
        t_labels = t.apply_all(labels)
        assert t_img.shape == block_image.shape
        for lab, t_lab, expected in zip(labels, t_labels, _ds(_f(t_img), scales)):
            assert t_lab.shape == lab.shape
            assert torch.equal(t_lab, expected)
            assert torch.equal(t.inverse.apply(t_lab), lab)
        assert torch.equal(t.inverse.apply(t_img), block_image)
        assert torch.equal(t.inverse.apply(t_noise), noise_image)
    assert seen_k == ({1, 2, 3} if all_square else {2})


def test_nearest_exact_downsampling_is_not_flip_equivariant() -> None:
    """Why the DS check above uses block-constant images: nnU-Net's nearest-exact x2 downsampling keeps voxel 2j+1,
    its mirror image keeps 2j, so downsample(flip(label)) != flip(downsample(label)) in general. The trainer must
    therefore transform each scale's own pseudo-label map (as GeometricTransform.apply_all does), not re-derive it."""
    label = torch.arange(8).reshape(1, 1, 8)
    down = F.interpolate(label.float(), [4], mode="nearest-exact").long()
    assert down.flatten().tolist() == [1, 3, 5, 7]
    flipped_down = F.interpolate(label.flip(-1).float(), [4], mode="nearest-exact").long()
    assert not torch.equal(flipped_down, down.flip(-1))


def test_square_full_res_with_non_square_scale_forbids_90() -> None:
    shapes = [(32, 32), (16, 32), (8, 16)]
    for seed in range(20):
        assert sample_geometric_transform(shapes, torch.Generator().manual_seed(seed)).k == 2
    # a single (h, w) pair is accepted too
    assert {sample_geometric_transform((32, 32), random.Random(s)).k for s in range(30)} == {1, 2, 3}
    assert {sample_geometric_transform((56, 40), random.Random(s)).k for s in range(30)} == {2}


def test_flip_only_when_allowed() -> None:
    flips = {sample_geometric_transform([(8, 8)], random.Random(s), allow_flip=False).flip for s in range(30)}
    assert flips == {False}
    flips = {sample_geometric_transform([(8, 6)], random.Random(s), allow_flip=True).flip for s in range(30)}
    assert flips == {False, True}


def test_apply_refuses_shape_change_and_inverse_all() -> None:
    x = torch.arange(2 * 3 * 4 * 6).reshape(2, 3, 4, 6)
    with pytest.raises(ValueError, match="change the in-plane shape"):
        GeometricTransform(k=1).apply(x)
    with pytest.raises(ValueError):
        GeometricTransform(k=4)
    sq = torch.randn(1, 1, 3, 5, 5)
    for k in range(4):
        for flip in (False, True):
            t = GeometricTransform(k=k, flip=flip)
            assert torch.equal(t.inverse.apply(t.apply(sq)), sq)
            assert torch.equal(t.apply(t.inverse.apply(sq)), sq)
    # rotation acts on the last two axes only: slices along the first spatial axis stay slices
    t = GeometricTransform(k=1)
    assert torch.equal(t.apply(sq)[0, 0, 1], torch.rot90(sq[0, 0, 1], 1))
    assert GeometricTransform().is_identity and torch.equal(GeometricTransform().apply(sq), sq)


def test_intensity_functions_shapes_and_properties() -> None:
    g = torch.Generator().manual_seed(0)
    img3 = torch.randn(3, 2, 6, 10, 8, generator=g)
    img2 = torch.randn(3, 1, 12, 9, generator=g)
    for img in (img2, img3):
        ref = img.clone()
        for fn in (add_gaussian_noise, adjust_contrast, adjust_gamma, gaussian_blur):
            out = fn(img, torch.Generator().manual_seed(1))
            assert out.shape == img.shape and out.dtype == img.dtype and torch.isfinite(out).all()
            assert not torch.equal(out, img)
            # deterministic given the generator seed
            assert torch.equal(out, fn(img, torch.Generator().manual_seed(1)))
        assert torch.equal(img, ref)  # pure
        dims = tuple(range(2, img.ndim))
        # gamma and contrast keep the per-(sample, channel) range of z-scored intensities (with negatives)
        for fn in (adjust_gamma, adjust_contrast):
            out = fn(img, torch.Generator().manual_seed(2))
            assert out.amin(dim=dims).ge(img.amin(dim=dims) - 1e-5).all()
            assert out.amax(dim=dims).le(img.amax(dim=dims) + 1e-5).all()
        g_out = adjust_gamma(img, torch.Generator().manual_seed(2))  # gamma keeps min and max exactly
        assert torch.allclose(g_out.amin(dim=dims), img.amin(dim=dims), atol=1e-5)
        assert torch.allclose(g_out.amax(dim=dims), img.amax(dim=dims), atol=1e-5)
        # blur preserves a constant image and lowers the variance of noise
        const = torch.full_like(img, 2.5)
        assert torch.allclose(gaussian_blur(const, g), const, atol=1e-5)
        assert gaussian_blur(img, g).var() < img.var()


def test_strong_intensity_probability() -> None:
    img = torch.randn(4, 1, 8, 8)
    assert torch.equal(strong_intensity(img, torch.Generator().manual_seed(0), p=0.0), img)
    out = strong_intensity(img, torch.Generator().manual_seed(0), p=1.0)
    assert out.shape == img.shape and not torch.equal(out, img)
    assert (out - img).flatten(1).abs().amax(1).gt(0).all()  # every sample perturbed at p=1


def _scales_3d() -> tuple[tuple[int, ...], list[tuple[float, ...]]]:
    return (20, 32, 32), [(1, 1, 1), (1, 0.5, 0.5), (0.5, 0.25, 0.25), (0.5, 0.125, 0.125)]


@pytest.mark.parametrize("spatial, scales", [CASES[0], CASES[1], _scales_3d()])
def test_cutout_labels_follow_image(spatial: tuple[int, ...], scales: list[tuple[float, ...]]) -> None:
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 2, *spatial, generator=g) + 0.5  # strictly positive: zeros mark the cut box
    labels = _ds(_f(image), scales)
    out_img, out_labels = cutout(image, labels, torch.Generator().manual_seed(4), ignore_index=IGN, ratio=(0.25, 0.5))
    assert torch.equal(labels[0], _ds(_f(image), scales)[0])  # inputs untouched
    box = (out_img == 0).all(dim=1, keepdim=True)
    assert box.any(dim=tuple(range(1, box.ndim))).all()  # a box in every sample
    assert torch.equal(out_img, torch.where(box, torch.zeros_like(image), image))
    for lab, out_lab, box_s in zip(labels, out_labels, _ds(box.long(), scales)):
        assert out_lab.shape == lab.shape
        assert torch.equal(out_lab, torch.where(box_s.bool(), IGN, lab))


@pytest.mark.parametrize("spatial, scales", [CASES[0], CASES[1], _scales_3d()])
def test_cutmix_labels_follow_image(spatial: tuple[int, ...], scales: list[tuple[float, ...]]) -> None:
    g = torch.Generator().manual_seed(5)
    image = torch.randn(4, 2, *spatial, generator=g)
    labels = _ds(_f(image), scales)
    for rng in (torch.Generator().manual_seed(6), random.Random(6)):
        out_img, out_labels = cutmix(image, labels, rng, ratio=(0.25, 0.5))
        assert out_img.shape == image.shape
        changed = (out_img != image).flatten(1).any(1)
        assert changed.all()  # every sample received a box from another sample
        for out_lab, expected in zip(out_labels, _ds(_f(out_img), scales)):
            assert torch.equal(out_lab, expected)


def test_cutmix_carries_ignore_labels_and_single_sample_noop() -> None:
    image = torch.stack([torch.zeros(1, 16, 16), torch.ones(1, 16, 16)])
    labels = [torch.stack([torch.zeros(1, 16, 16), torch.full((1, 16, 16), IGN)]).long()]
    out_img, out_labels = cutmix(image, labels, torch.Generator().manual_seed(0), ratio=0.5)
    pasted = out_img[0, 0] == 1
    assert pasted.sum() == 64  # an 8x8 box
    assert torch.equal(out_labels[0][0, 0] == IGN, pasted)
    one_img, one_lab = cutmix(image[:1], [labels[0][:1]], torch.Generator().manual_seed(0))
    assert torch.equal(one_img, image[:1]) and torch.equal(one_lab[0], labels[0][:1])
    with pytest.raises(ValueError):
        cutmix(image, labels, ratio=0.0)
    with pytest.raises(ValueError):
        cutout(image, [labels[0][:1]])


@pytest.mark.parametrize("spatial, scales", [CASES[0], _scales_3d()])
def test_paste_boxes_brings_the_source_labels_with_the_box(
    spatial: tuple[int, ...], scales: list[tuple[float, ...]]
) -> None:
    """Labelled-into-unlabelled copy-paste: inside the box, image and labels are the labelled sample's (all scales)."""
    g = torch.Generator().manual_seed(8)
    unlabelled = torch.randn(3, 1, *spatial, generator=g)
    labelled = torch.randn(3, 1, *spatial, generator=g) + 2.0  # distinguishable values
    pseudo = _ds(_f(unlabelled), scales)
    truth = _ds(_f(labelled), scales)
    out_img, out_labels = paste_boxes(unlabelled, pseudo, labelled, truth, torch.Generator().manual_seed(9), 2 / 3)
    from_labelled = out_img != unlabelled
    for b in range(3):
        assert torch.equal(out_img[b][from_labelled[b]], labelled[b][from_labelled[b]])  # sample b's own source
        assert 0.2 < from_labelled[b].float().mean() < 0.5  # a (2/3)^d box
    for out_lab, expected in zip(out_labels, _ds(_f(out_img), scales)):
        assert torch.equal(out_lab, expected)
    assert torch.equal(unlabelled, unlabelled.clone()) and all(torch.equal(a, b) for a, b in zip(pseudo, pseudo))
    with pytest.raises(ValueError, match="does not match"):
        paste_boxes(unlabelled, pseudo, labelled[:, :, :4], truth)


def test_paste_boxes_chooses_the_source_sample() -> None:
    target = torch.zeros(2, 1, 8, 8)
    source = torch.stack([torch.full((1, 8, 8), 1.0), torch.full((1, 8, 8), 2.0)])
    labels = [torch.zeros(2, 1, 8, 8, dtype=torch.long)]
    source_labels = [torch.stack([torch.full((1, 8, 8), 1), torch.full((1, 8, 8), 2)])]
    out, out_labels = paste_boxes(target, labels, source, source_labels, torch.Generator().manual_seed(0), 0.5, [1, 1])
    assert set(out.unique().tolist()) == {0.0, 2.0} and set(out_labels[0].unique().tolist()) == {0, 2}
