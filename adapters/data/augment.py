"""Batched image augmentations on tensors: :class:`BatchAugment` and its presets.

Per-sample PIL/torchvision transforms cost tens of microseconds per image and per op in Python;
on a 2-core machine that is slower than the model. Here every random parameter is drawn per
sample, but each op runs once on the whole ``(N, 3, H, W)`` batch. Semantics follow
``torchvision.transforms.v2`` (``RandomCrop(padding=...)``, ``RandomResizedCrop``,
``RandomHorizontalFlip``, ``RandomApply([ColorJitter], p)``, ``RandomGrayscale``,
``Normalize``); torchvision's batched functional ops are used where they take a batch
(``rgb_to_grayscale``, ``normalize``), per-sample factors are applied by hand.

Every random draw comes from a CPU ``torch.Generator``; the images may live on any device (the
engine's ``data.augment_on_device`` runs them on the GPU): the same generator state then gives
the same crops, flips and jitter factors on either device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as tvf

from ..devices import to_device, torch_threads

__all__ = [
    "BatchAugment",
    "PRESETS",
    "make_augment",
]

PRESETS = ("none", "crop_flip", "simclr")


@dataclass(frozen=True)
class BatchAugment:
    """Random augmentation of a whole batch, with per-sample random parameters.

    Follows torchvision's transforms (v2) for each op, and the SimCLR CIFAR recipe (Chen et al.,
    2020, appendix B.9: random resized crop, flip, colour jitter of strength 0.5 applied with
    p=0.8, grayscale with p=0.2, no blur) for the ``"simclr"`` preset. Ops run in this order:
    crop, flip, colour jitter (its four ops in a random order per sample, like ``ColorJitter``),
    grayscale, normalisation.

    Attributes:
        crop: ``"none"``, ``"pad"`` (``RandomCrop(size, padding)`` with zero fill, exact integer
            pixels) or ``"resized"`` (``RandomResizedCrop(size, scale, ratio)``, bilinear
            sampling without antialiasing, so meant for crops no larger than the output, as on
            CIFAR).
        size: Output side length; ``None`` keeps the input's (square output, ``H == W``
            needed for ``"resized"`` unless set).
        padding: Padding on every side for ``crop="pad"``.
        scale: Area fraction range for ``crop="resized"``.
        ratio: Aspect ratio range for ``crop="resized"``.
        hflip: Probability of a horizontal flip.
        jitter: ``(brightness, contrast, saturation, hue)`` strengths as in ``ColorJitter``
            (factors drawn from ``[1-b, 1+b]`` ..., hue shift from ``[-h, h]``), or ``None``.
        jitter_p: Probability of applying the colour jitter to a sample.
        grayscale_p: Probability of converting a sample to grey (kept 3 channels).
        mean: Per-channel mean for normalisation, or ``None`` for output in ``[0, 1]``.
        std: Per-channel std for normalisation (with ``mean``).
        num_threads: torch intra-op threads while augmenting (restored afterwards), see
            :func:`~adapters.devices.torch_threads`; ``None`` keeps torch's setting.

    Example:
        >>> aug = make_augment("simclr", size=32)
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
        >>> y = aug(x, g)  # float32 (8, 3, 32, 32) in [0, 1]
        >>> tuple(y.shape), y.dtype, bool(y.min() >= 0 and y.max() <= 1)
        ((8, 3, 32, 32), torch.float32, True)
    """

    crop: str = "none"
    size: int | None = None
    padding: int = 4
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.0
    jitter: tuple[float, float, float, float] | None = None
    jitter_p: float = 0.8
    grayscale_p: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = field(default=None)
    num_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.crop not in ("none", "pad", "resized"):
            raise ValueError(f"crop must be 'none', 'pad' or 'resized', got {self.crop!r}")
        if self.size is not None and self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")
        for name in ("hflip", "jitter_p", "grayscale_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        if self.jitter is not None:
            if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
                raise ValueError(
                    "jitter must be (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5,"
                    f" got {self.jitter}"
                )
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {self.num_threads}")

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Augment a batch.

        Args:
            images: ``(N, 3, H, W)`` uint8 in ``[0, 255]`` or floating point in ``[0, 1]``.
            generator: CPU ``torch.Generator`` for every random draw; the same generator state
                gives the same output. ``None`` uses torch's global RNG.

        Returns:
            ``(N, 3, S, S)`` float32 (``S = size``, or ``H`` and ``W`` unchanged for
            ``crop="none"`` without ``size``), in ``[0, 1]`` unless ``mean``/``std`` are set.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a (N, 3, H, W) batch, got shape {tuple(images.shape)}; "
                             "stack RGB images channels first (x.permute(0, 3, 1, 2) for "
                             "N x H x W x 3, x.expand(-1, 3, -1, -1) for grey)")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise TypeError(f"expected uint8 (0-255) or float (0-1) images, got {images.dtype}; "
                            "convert with x.to(torch.uint8) or x.float() / 255")
        with torch_threads(self.num_threads):
            return self._augment(images, generator)

    def _augment(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        n = images.shape[0]
        x = images
        flip = None
        if self.hflip > 0:
            flip = torch.rand(n, generator=generator) < self.hflip
        if self.crop == "pad":
            x = _pad_crop(x, self.size or x.shape[-1], self.padding, flip, generator)
            flip = None  # folded into the gather
        elif self.crop == "resized":
            x = _resized_crop(_to_float(x), self.size, self.scale, self.ratio, flip, generator)
            flip = None  # folded into the resampling matrices
        elif self.crop == "none" and self.size is not None and x.shape[-2:] != (self.size,) * 2:
            x = tvf.resize(_to_float(x), [self.size, self.size], antialias=True)
        if flip is not None:
            x = torch.where(to_device(flip[:, None, None, None], x.device), x.flip(-1), x)
        x = _to_float(x)
        if self.jitter is not None and self.jitter_p > 0:
            x = _color_jitter(x, self.jitter, self.jitter_p, generator)
        if self.grayscale_p > 0:
            gray = torch.rand(n, generator=generator) < self.grayscale_p
            x = torch.where(to_device(gray[:, None, None, None], x.device),
                            tvf.rgb_to_grayscale(x, 3), x)
        if self.mean is not None and self.std is not None:
            x = tvf.normalize(x, list(self.mean), list(self.std))
        return x


def make_augment(
    preset: str,
    size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **overrides: object,
) -> BatchAugment:
    """Build a :class:`BatchAugment` from a preset name.

    Presets:
        ``"none"``: to float in [0, 1] (resized to ``size`` if needed), optional normalisation.
        ``"crop_flip"``: ``RandomCrop(size, padding=4)`` + horizontal flip p=0.5.
        ``"simclr"``: ``RandomResizedCrop(size, scale=(0.08, 1))`` + flip p=0.5 + colour jitter
        (0.4, 0.4, 0.4, 0.1) with p=0.8 + grayscale p=0.2.

    Args:
        preset: One of :data:`PRESETS`.
        size: Output side length.
        mean: Normalisation mean per channel (give ``std`` too, or neither).
        std: Normalisation std per channel.
        **overrides: Any :class:`BatchAugment` field, e.g. ``scale=(0.2, 1.0)``.
    """
    base = {
        "none": BatchAugment(size=size),
        "crop_flip": BatchAugment(crop="pad", size=size, padding=4, hflip=0.5),
        "simclr": BatchAugment(
            crop="resized",
            size=size,
            scale=(0.08, 1.0),
            hflip=0.5,
            jitter=(0.4, 0.4, 0.4, 0.1),
            jitter_p=0.8,
            grayscale_p=0.2,
        ),
    }
    if preset not in base:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {PRESETS}")
    norm: dict[str, object] = {}
    if mean is not None or std is not None:
        norm = {
            "mean": None if mean is None else tuple(mean),
            "std": None if std is None else tuple(std),
        }
    return replace(base[preset], **norm, **overrides)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# ops


def _to_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)


def _pad_crop(
    x: torch.Tensor,
    size: int,
    padding: int,
    flip: torch.Tensor | None,
    g: torch.Generator | None,
) -> torch.Tensor:
    """Per-sample ``RandomCrop(size, padding)`` (zero fill) + optional flip as one gather.

    Exact integer pixels; keeps the dtype. ``flip``: ``(N,)`` bool or ``None``.
    """
    n, c, h, w = x.shape
    if padding:
        x = nnf.pad(x, (padding, padding, padding, padding))
    hp, wp = h + 2 * padding, w + 2 * padding
    if size > hp or size > wp:
        raise ValueError(f"crop size {size} is larger than the padded image {hp}x{wp}")
    top = torch.randint(0, hp - size + 1, (n,), generator=g)
    left = torch.randint(0, wp - size + 1, (n,), generator=g)
    ar = torch.arange(size)
    cols = left[:, None] + ar  # (N, S)
    if flip is not None:
        cols = torch.where(flip[:, None], left[:, None] + (size - 1) - ar, cols)
    rows = top[:, None] + ar
    flat = to_device((rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, size * size),
                     x.device)
    out = x.reshape(n, c, hp * wp).gather(2, flat.expand(n, c, size * size))
    return out.view(n, c, size, size)


def _resized_crop_boxes(
    n: int,
    h: int,
    w: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    g: torch.Generator | None,
    attempts: int = 10,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``RandomResizedCrop.get_params`` for ``n`` samples at once: (top, left, height, width)."""
    area = h * w
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, attempts, generator=g))
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * torch.rand(n, attempts, generator=g))
    cw = torch.sqrt(target * aspect).round()
    ch = torch.sqrt(target / aspect).round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = torch.argmax(ok.to(torch.int8), dim=1)  # first valid attempt (0 if none)
    any_ok = ok.any(dim=1)
    cw = cw.gather(1, first[:, None])[:, 0]
    ch = ch.gather(1, first[:, None])[:, 0]
    # torchvision's fallback: a central crop of the whole image clipped to the ratio range
    in_ratio = w / h
    if in_ratio < ratio[0]:
        fw, fh = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(h * ratio[1]), h
    else:
        fw, fh = w, h
    cw = torch.where(any_ok, cw, float(fw))
    ch = torch.where(any_ok, ch, float(fh))
    u = torch.rand(n, 2, generator=g)
    top = torch.where(any_ok, torch.floor(u[:, 0] * (h - ch + 1)), float((h - fh) // 2))
    left = torch.where(any_ok, torch.floor(u[:, 1] * (w - cw + 1)), float((w - fw) // 2))
    return top, left, ch, cw


def _resample_matrix(
    start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int
) -> torch.Tensor:
    """``(N, out_size, in_size)`` weights that resize ``[start, start + length)`` to
    ``out_size`` pixels along one axis: PIL-style triangle filter (bilinear, widened when
    shrinking, i.e. antialiased), normalised inside the box, like torchvision's
    ``resize(..., antialias=True)``."""
    scale = (length / out_size)[:, None, None]
    out_pos = torch.arange(out_size, dtype=torch.float32)[None, :, None] + 0.5
    centre = start[:, None, None] + out_pos * scale
    support = scale.clamp(min=1.0)
    pos = torch.arange(in_size, dtype=torch.float32)[None, None, :] + 0.5
    weights = (1.0 - (pos - centre).abs() / support).clamp_(min=0.0)
    inside = (pos > start[:, None, None]) & (pos < (start + length)[:, None, None])
    weights = weights * inside
    return weights / weights.sum(dim=-1, keepdim=True)


def _resized_crop(
    x: torch.Tensor,
    size: int | None,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    flip: torch.Tensor | None,
    g: torch.Generator | None,
) -> torch.Tensor:
    """Per-sample ``RandomResizedCrop`` (+ optional flip) as two batched matrix products.

    Matches ``torchvision.transforms.v2.functional.resized_crop(..., antialias=True)`` on float
    images to ~1e-6: the crop-and-resize is separable, ``out = Ry @ x @ Rx^T`` with per-sample
    ``Ry`` ``(N, S, H)``, ``Rx`` ``(N, S, W)``; a flip reverses the rows of ``Rx``.
    """
    n, _, h, w = x.shape
    if size is None:
        if h != w:
            raise ValueError(f"set size for a resized crop of non-square {h}x{w} images")
        size = h
    top, left, ch, cw = _resized_crop_boxes(n, h, w, scale, ratio, g)
    ry = _resample_matrix(top, ch, h, size)
    rx = _resample_matrix(left, cw, w, size)
    if flip is not None:
        rx = torch.where(flip[:, None, None], rx.flip(1), rx)
    ry, rx = to_device(ry, x.device), to_device(rx, x.device)
    out = torch.matmul(torch.matmul(ry[:, None], x), rx.transpose(1, 2)[:, None])
    return out.clamp_(0.0, 1.0)


def _gray_mean(x: torch.Tensor) -> torch.Tensor:
    return tvf.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of ``x`` ``(B, 3, H, W)`` in [0, 1] by ``shift`` ``(B, 1, 1, 1)`` turns.

    Same result as ``torchvision``'s ``adjust_hue`` (RGB -> HSV, ``h = (h + shift) % 1``,
    HSV -> RGB), without materialising S and V: ``V * S`` is ``max - min``, and the
    HSV -> RGB step is ``V - V * S * clamp(min(k, 4 - k), 0, 1)``, ``k = (n + 6 h) mod 6``.
    """
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    maxc = x.amax(dim=1, keepdim=True)
    delta = maxc - x.amin(dim=1, keepdim=True)
    inv = 1.0 / torch.where(delta > 0, delta, 1.0)
    h6 = torch.where(
        maxc == r, (g - b) * inv, torch.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0)
    )
    offsets = 5.0 - 2.0 * torch.arange(3, dtype=torch.float32, device=x.device)  # 5, 3, 1
    k = torch.remainder(offsets.view(1, 3, 1, 1) + h6 + 6.0 * shift, 6.0)
    return maxc - delta * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def _color_jitter(
    x: torch.Tensor,
    strength: tuple[float, float, float, float],
    p: float,
    g: torch.Generator | None,
) -> torch.Tensor:
    """``RandomApply([ColorJitter(*strength)], p)`` with per-sample factors and op order."""
    n = x.shape[0]
    b, c, s, hue = strength
    apply = torch.rand(n, generator=g) < p
    u = torch.rand(n, 4, generator=g)
    factors = (
        1 + b * (2 * u[:, 0] - 1),
        1 + c * (2 * u[:, 1] - 1),
        1 + s * (2 * u[:, 2] - 1),
        hue * (2 * u[:, 3] - 1),
    )
    order = torch.argsort(torch.rand(n, 4, generator=g), dim=1)  # per-sample op order
    active = (b > 0, c > 0, s > 0, hue > 0)
    x = x.clone()
    groups = []  # (op, the images it applies to at this position), in the order applied
    for pos in range(4):
        for op in range(4):
            if not active[op]:
                continue
            idx = torch.nonzero(apply & (order[:, pos] == op), as_tuple=True)[0]
            if idx.numel() > 0:
                groups.append((op, idx))
    if not groups:
        return x
    # every group's images and factors go to the device in one copy each, not two per group
    sizes = [int(idx.numel()) for _, idx in groups]
    idxs = to_device(torch.cat([idx for _, idx in groups]), x.device).split(sizes)
    fs = to_device(torch.cat([factors[op][idx] for op, idx in groups]), x.device).split(sizes)
    for (op, _), idx, f in zip(groups, idxs, fs):
        f = f.view(-1, 1, 1, 1)
        xi = x[idx]
        if op == 0:  # brightness: blend with black
            xi = (xi * f).clamp_(0.0, 1.0)
        elif op == 1:  # contrast: blend with the mean grey level
            xi = (f * xi + (1 - f) * _gray_mean(xi)).clamp_(0.0, 1.0)
        elif op == 2:  # saturation: blend with the grey image
            xi = (f * xi + (1 - f) * tvf.rgb_to_grayscale(xi)).clamp_(0.0, 1.0)
        else:  # hue: rotate in HSV
            xi = _adjust_hue(xi, f)
        x[idx] = xi
    return x
