"""Strong-view augmentations for nnFilterMatch: in-plane geometry, intensity perturbations, cutout and cutmix.

Layouts follow nnU-Net: images (B, C, *spatial), label maps (B, 1, *spatial), deep-supervision (DS) targets a list of
label maps at decreasing resolution, full resolution first. With nnU-Net's axis order the in-plane axes are the LAST
TWO spatial axes (for 3D the first spatial axis is the slice axis; for 2D both axes are in-plane).

Every function is pure (inputs are never modified) and draws its randomness from an explicit generator so a run is
reproducible and the trainer can apply the same draw to an image and its labels.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GeometricTransform",
    "sample_geometric_transform",
    "in_plane_shapes",
    "add_gaussian_noise",
    "adjust_contrast",
    "adjust_gamma",
    "gaussian_blur",
    "strong_intensity",
    "cutout",
    "cutmix",
    "paste_boxes",
]

Rng = torch.Generator | random.Random | None


# ----------------------------------------------------------------------------------------------------------------------
# random helpers: one code path for torch.Generator (possibly on CUDA), random.Random and None (global torch RNG)
# ----------------------------------------------------------------------------------------------------------------------
def _gen_device(gen: torch.Generator | None) -> torch.device:
    return gen.device if gen is not None else torch.device("cpu")


def _randint(rng: Rng, n: int) -> int:
    """Uniform integer in [0, n)."""
    if isinstance(rng, random.Random):
        return rng.randrange(n)
    return int(torch.randint(0, n, (1,), generator=rng, device=_gen_device(rng)).item())


def _rand(rng: Rng) -> float:
    """Uniform float in [0, 1)."""
    if isinstance(rng, random.Random):
        return rng.random()
    return float(torch.rand((1,), generator=rng, device=_gen_device(rng)).item())


def _uniform(gen: torch.Generator | None, n: int, lo: float, hi: float, device: torch.device) -> Tensor:
    """n floats uniform in [lo, hi), float32 on ``device``."""
    u = torch.rand((n,), generator=gen, device=_gen_device(gen), dtype=torch.float32)
    return (lo + (hi - lo) * u).to(device)


def _check_range(name: str, r: tuple[float, float]) -> tuple[float, float]:
    lo, hi = float(r[0]), float(r[1])
    if hi < lo:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {r}")
    return lo, hi


def _per_sample(x: Tensor, values: Tensor) -> Tensor:
    """Reshape a (B,) tensor so it broadcasts against (B, C, *spatial)."""
    return values.to(dtype=x.dtype).reshape((x.shape[0],) + (1,) * (x.ndim - 1))


def _check_image(image: Tensor) -> None:
    if image.ndim < 3:
        raise ValueError(f"image must be (B, C, *spatial), got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise ValueError(f"image must be a floating-point tensor, got {image.dtype}")


# ----------------------------------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GeometricTransform:
    """In-plane rotation by ``k * 90`` degrees followed (if ``flip``) by a flip of the last axis.

    Why a separate object: the caller samples ONE transform per strong batch and applies it to the image and to the
    pseudo-label map of every deep-supervision scale, so images and targets stay aligned. It acts on the last two
    dimensions of any tensor, so it is layout agnostic ((B, C, X, Y), (B, 1, X, Y, Z), a bare (X, Y) map, ...).
    """

    k: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or not 0 <= self.k <= 3:
            raise ValueError(f"k must be an int in 0..3 (number of 90-degree rotations), got {self.k!r}")

    @property
    def is_identity(self) -> bool:
        return self.k == 0 and not self.flip

    @property
    def swaps_axes(self) -> bool:
        """True when the transform exchanges the two in-plane sizes (rotation by 90 or 270 degrees)."""
        return self.k % 2 == 1

    def apply(self, t: Tensor) -> Tensor:
        """Transform the last two dims of ``t``; raises ValueError rather than change the tensor's shape."""
        if t.ndim < 2:
            raise ValueError(f"tensor needs at least two dims (the in-plane axes), got shape {tuple(t.shape)}")
        if self.swaps_axes and t.shape[-2] != t.shape[-1]:
            raise ValueError(
                f"a {self.k * 90}-degree rotation would change the in-plane shape {tuple(t.shape[-2:])} of a tensor of "
                f"shape {tuple(t.shape)}; sample the transform with sample_geometric_transform() from the in-plane "
                "shapes of every tensor it will be applied to"
            )
        out = torch.rot90(t, self.k, dims=(-2, -1)) if self.k else t
        if self.flip:
            out = torch.flip(out, dims=(-1,))
        return out

    def apply_all(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Apply to each tensor of a list (e.g. every deep-supervision scale)."""
        return [self.apply(t) for t in tensors]

    @property
    def inverse(self) -> GeometricTransform:
        """The transform undoing this one (a flip composed with a rotation is a reflection, its own inverse)."""
        if self.flip:
            return self
        return GeometricTransform(k=(-self.k) % 4, flip=False)


def in_plane_shapes(tensors: Sequence[Tensor]) -> list[tuple[int, int]]:
    """The (last two) in-plane sizes of each tensor, the input that sample_geometric_transform() wants."""
    return [(int(t.shape[-2]), int(t.shape[-1])) for t in tensors]


def sample_geometric_transform(
    in_plane_shapes: Sequence[tuple[int, int]] | tuple[int, int],
    rng: Rng = None,
    allow_flip: bool = True,
) -> GeometricTransform:
    """Draw the strong view's in-plane rotation (and flip) so that NO tensor changes shape.

    The paper rotates by 90/180/270 degrees (k in {1, 2, 3}). A 90/270-degree rotation swaps the two in-plane sizes,
    which breaks concatenation with the labelled batch on non-square patches (e.g. Hippocampus 40x56x40). So k is
    drawn from {1, 2, 3} only when EVERY given in-plane shape is square, else k = 2 (180 degrees). All shapes must
    be passed (full resolution and every deep-supervision scale): a square patch can have non-square lower scales when
    the pooling differs between the two in-plane axes. ``allow_flip`` enables a flip of the last axis with
    probability 1/2 (the paper adds flips later in training); flips never change shapes.

    Args:
        in_plane_shapes: one (h, w) pair, or a sequence of them (see in_plane_shapes()).
        rng: torch.Generator, random.Random, or None (global torch RNG).
        allow_flip: whether a random flip may be added.
    """
    if len(in_plane_shapes) == 2 and not any(hasattr(v, "__len__") for v in in_plane_shapes):
        shapes = [(int(in_plane_shapes[0]), int(in_plane_shapes[1]))]  # type: ignore[arg-type]
    else:
        shapes = [tuple(int(v) for v in s) for s in in_plane_shapes]  # type: ignore[union-attr]
    if len(shapes) == 0:
        raise ValueError("in_plane_shapes must not be empty")
    for s in shapes:
        if len(s) != 2:
            raise ValueError(f"each in-plane shape must be a pair (h, w), got {s}")
    all_square = all(s[0] == s[1] for s in shapes)
    k = 1 + _randint(rng, 3) if all_square else 2
    flip = bool(allow_flip and _rand(rng) < 0.5)
    return GeometricTransform(k=k, flip=flip)


# ----------------------------------------------------------------------------------------------------------------------
# intensity perturbations (image only; labels untouched)
# ----------------------------------------------------------------------------------------------------------------------
def add_gaussian_noise(
    image: Tensor, gen: torch.Generator | None = None, std_range: tuple[float, float] = (0.0, 0.1)
) -> Tensor:
    """Add zero-mean Gaussian noise, one standard deviation per sample drawn from ``std_range``.

    The std is absolute, which suits nnU-Net's z-scored / normalised intensities (unit scale).
    """
    _check_image(image)
    lo, hi = _check_range("std_range", std_range)
    std = _per_sample(image, _uniform(gen, image.shape[0], lo, hi, image.device))
    noise = torch.randn(image.shape, generator=gen, device=_gen_device(gen), dtype=torch.float32)
    return image + noise.to(device=image.device, dtype=image.dtype) * std


def adjust_contrast(
    image: Tensor,
    gen: torch.Generator | None = None,
    factor_range: tuple[float, float] = (0.75, 1.25),
    preserve_range: bool = True,
) -> Tensor:
    """Scale deviations from each (sample, channel) mean by a per-sample factor, as nnU-Net's contrast transform.

    With ``preserve_range`` the result is clipped to the original per-(sample, channel) min/max so no new
    intensity extremes are invented.
    """
    _check_image(image)
    lo, hi = _check_range("factor_range", factor_range)
    dims = tuple(range(2, image.ndim))
    factor = _per_sample(image, _uniform(gen, image.shape[0], lo, hi, image.device))
    mean = image.mean(dim=dims, keepdim=True)
    out = (image - mean) * factor + mean
    if preserve_range:
        out = torch.clamp(out, min=image.amin(dim=dims, keepdim=True), max=image.amax(dim=dims, keepdim=True))
    return out


def adjust_gamma(
    image: Tensor,
    gen: torch.Generator | None = None,
    gamma_range: tuple[float, float] = (0.7, 1.5),
    eps: float = 1e-7,
) -> Tensor:
    """Gamma correction on the per-(sample, channel) min-max normalised image, then mapped back to its range.

    Why the normalisation: z-scored MRI/CT intensities are negative in places, where ``x ** gamma`` is undefined;
    in [0, 1] it is valid and the original min and max are preserved. When ``gamma_range`` straddles 1, gamma < 1
    and gamma > 1 are equally likely (as in nnU-Net), each uniform on its side.
    """
    _check_image(image)
    lo, hi = _check_range("gamma_range", gamma_range)
    if lo <= 0:
        raise ValueError(f"gamma must be > 0, got gamma_range={gamma_range}")
    b = image.shape[0]
    if lo < 1.0 < hi:
        below = _uniform(gen, b, lo, 1.0, image.device)
        above = _uniform(gen, b, 1.0, hi, image.device)
        choose_below = _uniform(gen, b, 0.0, 1.0, image.device) < 0.5
        gamma = torch.where(choose_below, below, above)
    else:
        gamma = _uniform(gen, b, lo, hi, image.device)
    gamma = _per_sample(image, gamma)
    dims = tuple(range(2, image.ndim))
    mn = image.amin(dim=dims, keepdim=True)
    span = image.amax(dim=dims, keepdim=True) - mn
    unit = ((image - mn) / span.clamp_min(eps)).clamp(0.0, 1.0)
    return unit.pow(gamma) * span + mn


def _gaussian_kernel_1d(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur_sample(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a (1, C, *spatial) tensor over every spatial axis, replicate padding."""
    n_sp = x.ndim - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n_sp]
    c = x.shape[1]
    k = _gaussian_kernel_1d(sigma, x.dtype, x.device)
    radius = (k.numel() - 1) // 2
    out = x
    for d in range(n_sp):
        shape = [1] * n_sp
        shape[d] = k.numel()
        weight = k.reshape([1, 1, *shape]).repeat(c, *([1] * (n_sp + 1)))
        pad = [0] * (2 * n_sp)  # F.pad lists the last axis first
        j = n_sp - 1 - d
        pad[2 * j] = radius
        pad[2 * j + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), weight, groups=c)
    return out


def gaussian_blur(
    image: Tensor, gen: torch.Generator | None = None, sigma_range: tuple[float, float] = (0.5, 1.0)
) -> Tensor:
    """Gaussian blur over all spatial axes (2D or 3D), one sigma (in voxels) per sample.

    Separable 1D convolutions keep it cheap on 3D patches; replicate padding avoids darkening the borders.
    """
    _check_image(image)
    if not 1 <= image.ndim - 2 <= 3:
        raise ValueError(f"gaussian_blur supports 1 to 3 spatial axes, got shape {tuple(image.shape)}")
    lo, hi = _check_range("sigma_range", sigma_range)
    sigmas = _uniform(gen, image.shape[0], lo, hi, torch.device("cpu")).tolist()
    work = image.float()
    outs = [_blur_sample(work[b : b + 1], s) if s > 0 else work[b : b + 1] for b, s in enumerate(sigmas)]
    return torch.cat(outs, dim=0).to(image.dtype)


def strong_intensity(
    image: Tensor,
    gen: torch.Generator | None = None,
    p: float = 0.5,
    noise_std_range: tuple[float, float] = (0.0, 0.1),
    contrast_range: tuple[float, float] = (0.75, 1.25),
    gamma_range: tuple[float, float] = (0.7, 1.5),
    blur_sigma_range: tuple[float, float] = (0.5, 1.0),
) -> Tensor:
    """The strong view's intensity perturbations: noise, blur, contrast and gamma, each with probability ``p``
    independently per sample (order as in nnU-Net's pipeline). Only the image is changed; labels are untouched.
    """
    _check_image(image)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    steps = [
        lambda x: add_gaussian_noise(x, gen, noise_std_range),
        lambda x: gaussian_blur(x, gen, blur_sigma_range),
        lambda x: adjust_contrast(x, gen, contrast_range),
        lambda x: adjust_gamma(x, gen, gamma_range),
    ]
    out = image
    for step in steps:
        chosen = torch.rand((image.shape[0],), generator=gen, device=_gen_device(gen)) < p
        idx = chosen.nonzero().flatten().to(image.device)
        if idx.numel() > 0:
            out = out.index_copy(0, idx, step(out.index_select(0, idx)))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# cutout / cutmix
# ----------------------------------------------------------------------------------------------------------------------
def _check_ratio(ratio: tuple[float, float] | float) -> tuple[float, float]:
    lo, hi = (float(ratio), float(ratio)) if isinstance(ratio, (int, float)) else (float(ratio[0]), float(ratio[1]))
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"ratio must be a fraction in (0, 1] or a range 0 < low <= high <= 1, got {ratio}")
    return lo, hi


def _sample_box(spatial: Sequence[int], rng: Rng, ratio: tuple[float, float]) -> list[tuple[int, int]]:
    """A box [start, stop) per spatial axis; one fraction (from ``ratio``) per box, each axis size = fraction*extent."""
    frac = ratio[0] + (ratio[1] - ratio[0]) * _rand(rng)
    box = []
    for n in spatial:
        size = min(n, max(1, round(frac * n)))
        start = _randint(rng, n - size + 1)
        box.append((start, start + size))
    return box


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


def _box_at_scale(box: Sequence[tuple[int, int]], full: Sequence[int], scale: Sequence[int]) -> tuple[slice, ...]:
    """Map a full-resolution box to a lower-resolution grid by proportional (voxel-centre) coordinates.

    Voxel j of an axis of size m is in the box iff the full-resolution voxel it samples under nearest-exact
    resampling, floor((j + 0.5) * n / m), lies in [start, stop) -- the rule of nnU-Net's DownsampleSegForDSTransform
    (``interpolate(mode='nearest-exact')``) -- so the scale's labels equal the downsampled full-resolution labels.
    In integers: j >= (2*start*m - n) / (2n) and j < (2*stop*m - n) / (2n).
    """
    slices = []
    for (start, stop), n, m in zip(box, full, scale):
        lo = min(max(_ceil_div(2 * start * m - n, 2 * n), 0), m)
        hi = min(max(_ceil_div(2 * stop * m - n, 2 * n), 0), m)
        slices.append(slice(lo, max(lo, hi)))
    return tuple(slices)


def _check_labels(image: Tensor, labels_list: Sequence[Tensor]) -> None:
    for i, lab in enumerate(labels_list):
        if lab.ndim != image.ndim or lab.shape[0] != image.shape[0]:
            raise ValueError(
                f"labels_list[{i}] must be (B, 1, *spatial) matching image {tuple(image.shape)}, got {tuple(lab.shape)}"
            )


def cutout(
    image: Tensor,
    labels_list: Sequence[Tensor],
    gen: Rng = None,
    ignore_index: int = -1,
    ratio: tuple[float, float] | float = (0.25, 0.5),
    fill: float = 0.0,
) -> tuple[Tensor, list[Tensor]]:
    """Blank a random box in each sample's image and mark the same region ``ignore_index`` at every label scale.

    Why ignore instead of keeping the labels: the image content is gone there, so the old pseudo-labels are no longer
    predictable from the input. The box (a fraction in ``ratio`` of every spatial extent, all channels) is drawn at
    full resolution and mapped to each scale as in _box_at_scale(). Returns new tensors (image, labels per scale).
    """
    _check_image(image)
    _check_labels(image, labels_list)
    rat = _check_ratio(ratio)
    full = tuple(image.shape[2:])
    out_img = image.clone()
    out_labels = [lab.clone() for lab in labels_list]
    for b in range(image.shape[0]):
        box = _sample_box(full, gen, rat)
        out_img[(b, slice(None), *(slice(s, e) for s, e in box))] = fill
        for lab in out_labels:
            lab[(b, slice(None), *_box_at_scale(box, full, lab.shape[2:]))] = ignore_index
    return out_img, out_labels


def paste_boxes(
    image: Tensor,
    labels_list: Sequence[Tensor],
    source_image: Tensor,
    source_labels: Sequence[Tensor],
    gen: Rng = None,
    ratio: tuple[float, float] | float = (0.25, 0.5),
    sources: Sequence[int] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Paste a random box of ``source_image[sources[i]]`` into sample i, with its labels at every scale.

    The one operation behind cutmix (sources from the same batch) and labelled-to-unlabelled copy-paste (BCP: a
    labelled box with its true labels inside a pseudo-labelled image, so every mixed patch carries real labels).
    ``sources`` defaults to sample i of the source batch. Boxes are drawn at full resolution and mapped to each scale
    as in _box_at_scale(); the labels (including ``ignore_index`` voxels) travel with the image. Returns new tensors.
    """
    _check_image(image)
    _check_labels(image, labels_list)
    _check_labels(source_image, source_labels)
    if source_image.shape[1:] != image.shape[1:] or len(source_labels) != len(labels_list):
        raise ValueError(
            f"source {tuple(source_image.shape)} with {len(source_labels)} label scales does not match image "
            f"{tuple(image.shape)} with {len(labels_list)}"
        )
    rat = _check_ratio(ratio)
    full = tuple(image.shape[2:])
    sources = list(range(image.shape[0])) if sources is None else list(sources)
    out_img = image.clone()
    out_labels = [lab.clone() for lab in labels_list]
    for b, src in enumerate(sources):
        box = _sample_box(full, gen, rat)
        region = (slice(None), *(slice(s, e) for s, e in box))
        out_img[(b, *region)] = source_image[(src, *region)]
        for lab, src_lab, out in zip(labels_list, source_labels, out_labels):
            if src_lab.shape[2:] != lab.shape[2:]:
                raise ValueError(f"label scales differ: {tuple(src_lab.shape)} vs {tuple(lab.shape)}")
            sl = (slice(None), *_box_at_scale(box, full, lab.shape[2:]))
            out[(b, *sl)] = src_lab[(src, *sl)].to(out.dtype)
    return out_img, out_labels


def cutmix(
    image: Tensor,
    labels_list: Sequence[Tensor],
    gen: Rng = None,
    ratio: tuple[float, float] | float = (0.25, 0.5),
) -> tuple[Tensor, list[Tensor]]:
    """Paste a random box from another sample of the batch into each sample, image and labels at every scale alike.

    The source of sample i is a random derangement of the batch (never the sample itself when B >= 2; with B == 1 the
    call is a no-op copy); see paste_boxes(). Returns new tensors.
    """
    _check_image(image)
    _check_labels(image, labels_list)
    rat = _check_ratio(ratio)
    bsz = image.shape[0]
    if bsz < 2:
        return image.clone(), [lab.clone() for lab in labels_list]
    # random permutation p, then p[i] takes from p[i+1]: a derangement (no sample pastes onto itself)
    if isinstance(gen, random.Random):
        order = list(range(bsz))
        gen.shuffle(order)
    else:
        order = torch.randperm(bsz, generator=gen, device=_gen_device(gen)).tolist()
    source = [0] * bsz
    for i in range(bsz):
        source[order[i]] = order[(i + 1) % bsz]
    return paste_boxes(image, labels_list, image, labels_list, gen, rat, source)
