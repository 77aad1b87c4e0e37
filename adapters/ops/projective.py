"""Random projective transformations of AET-project, sampled and applied to whole batches.

Follows ``maple-research-lab/AET`` (commit 042be336; files as of 96ef428),
``cifar/projective/dataset.py`` (``CIFAR10.__getitem__`` and ``find_coeffs``) and
``cifar/projective/main.py`` (the dataset's arguments): Zhang, Qi, Wang and Luo, "AET vs. AED:
Unsupervised Representation Learning by Auto-Encoding Transformations rather than Data",
CVPR 2019, section 4.1 (CIFAR-10).

The original, per image (PIL, Python ``random``):

1. the four corners ``(0, 0), (W, 0), (W, H), (0, H)`` are scaled by ``s ~ U(0.8, 1.2)`` about
   the point ``(W/2 + 0.5, H/2 + 0.5)`` (that half-pixel offset is the original's);
2. the list of corners is rotated by ``r ~ {0, 1, 2, 3}`` positions (the image turns by a
   multiple of 90 degrees; no other angle is drawn);
3. each of the 8 corner coordinates gets an independent *integer* shift ``~ {-4, ..., 4}``;
4. the 8 coefficients ``(a, b, c, d, e, f, g, h)`` of the homography that maps these points back
   onto the image corners are solved for (``find_coeffs``); they are PIL's ``PERSPECTIVE`` data,
   the map from output to input coordinates
   ``x_in = (a x + b y + c) / (g x + h y + 1)``, ``y_in = (d x + e y + f) / (g x + h y + 1)``,
   so input corner ``i`` lands at point ``i``;
5. the transformed image is ``img.transform((W, H), PERSPECTIVE, coeffs, BILINEAR,
   fillcolor=(128, 128, 128))``;
6. the regression target is the coefficient vector normalised channel-wise as
   ``Normalize(mean=(0, 0, 16, 0, 0, 16, 0, 0), std=(1, 1, 20, 1, 1, 20, 0.015, 0.015))``:
   :data:`COEFF_MEAN`, :data:`COEFF_STD`.

Here the same distribution is drawn with a ``torch.Generator`` for a whole batch at once, the
8 x 8 systems are solved batched in float64 (``torch.linalg.solve``; the original's normal
equations ``(A^T A)^-1 A^T b`` have the same solution for these square, well-posed systems), and
the warp is one :func:`torch.nn.functional.grid_sample` that reproduces Pillow's sampling rule
(pixel centres at ``+0.5``; an output pixel whose source point falls outside ``[0, W) x [0, H)``
takes the fill colour, one inside is bilinearly interpolated with edge pixels replicated).
:func:`warp_perspective` agrees with ``PIL.Image.transform`` to within uint8 rounding except for
the odd pixel whose source point lies within float error of the image border
(``tests/adapters/ops/test_projective.py``). Cost per 128 x 3 x 32 x 32 batch on this 2-core
CPU, one thread:
sampling + warp 6-7 ms; ``torchvision.transforms.v2.functional.perspective`` looped per image
(it takes one homography per call) 38 ms, and it blends the fill into border pixels (up to 0.56
off PIL on 4% of the values); the original's PIL ``transform`` looped per uint8 image 9-12 ms
for the warp alone. A NIN-4 training step on that batch takes about 5 s.

Deviations: images are float tensors in ``[0, 1]`` (no uint8 rounding after the warp); the fill
colour is given in those units (``128 / 255``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from adapters.devices import torch_threads

__all__ = [
    "COEFF_MEAN",
    "COEFF_STD",
    "ProjectiveSample",
    "sample_projective",
    "solve_homography",
    "apply_homography",
    "warp_perspective",
    "normalize_coeffs",
    "denormalize_coeffs",
]

#: Channel means of the 8 coefficients in the original's ``matrix_transform`` (``main.py``).
COEFF_MEAN = (0.0, 0.0, 16.0, 0.0, 0.0, 16.0, 0.0, 0.0)
#: Channel stds of the 8 coefficients in the original's ``matrix_transform`` (``main.py``).
COEFF_STD = (1.0, 1.0, 20.0, 1.0, 1.0, 20.0, 0.015, 0.015)

INTERPOLATIONS = ("bilinear", "nearest")


@dataclass(frozen=True)
class ProjectiveSample:
    """A batch of random projective transformations.

    Attributes:
        coeffs: ``(N, 8)`` float64, PIL ``PERSPECTIVE`` data (output -> input coordinates).
        points: ``(N, 4, 2)`` float64, where the input corners ``(0, 0), (W, 0), (W, H), (0, H)``
            land in the output image (``x, y`` in pixels, pixel centres at ``+0.5``).
        scale: ``(N,)`` float64 scale factors.
        rotation: ``(N,)`` int64 corner rotations in ``{0, 1, 2, 3}`` (quarter turns).
        shift: ``(N, 8)`` int64 corner shifts (x0, y0, x1, y1, ...), in pixels.
    """

    coeffs: Tensor
    points: Tensor
    scale: Tensor
    rotation: Tensor
    shift: Tensor


def _corners(height: int, width: int) -> Tensor:
    return torch.tensor(
        [[0.0, 0.0], [width, 0.0], [width, height], [0.0, height]], dtype=torch.float64
    )


def sample_projective(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    *,
    shift: int = 4,
    scale: tuple[float, float] = (0.8, 1.2),
) -> ProjectiveSample:
    """Draws ``n`` projective transformations as AET's ``CIFAR10.__getitem__`` does.

    Args:
        n: Number of transformations.
        height: Image height (CIFAR: 32).
        width: Image width (CIFAR: 32).
        generator: Source of randomness (CPU); None uses torch's global generator.
        shift: Largest corner shift in pixels (integers in ``[-shift, shift]``; AET ``--shift 4``).
        scale: ``(low, high)`` of the uniform scale factor (AET ``--shrink 0.8 --enlarge 1.2``).

    Returns:
        A :class:`ProjectiveSample` (all tensors on the CPU).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> s = sample_projective(4, 32, 32, g)
        >>> s.coeffs.shape, s.points.shape
        (torch.Size([4, 8]), torch.Size([4, 4, 2]))
    """
    if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
        raise ValueError(f"shift must be an int >= 0 (pixels; AET uses 4), got {shift!r}")
    lo, hi = (float(v) for v in scale)
    if not 0 < lo <= hi:
        raise ValueError(f"scale must be (low, high) with 0 < low <= high (AET: (0.8, 1.2)), "
                         f"got {scale!r}")
    if n < 0 or height < 1 or width < 1:
        raise ValueError(f"need n >= 0 and a positive size, got n={n}, {height}x{width}")
    # Drawn in this order from one generator: shifts, scales, rotations.
    shifts = torch.randint(-shift, shift + 1, (n, 8), generator=generator)
    scales = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    rotation = torch.randint(0, 4, (n,), generator=generator)
    corners = _corners(height, width)
    center = torch.tensor([width * 0.5 + 0.5, height * 0.5 + 0.5], dtype=torch.float64)
    scaled = (corners[None] - center) * scales[:, None, None] + center  # (n, 4, 2)
    order = (torch.arange(4)[None, :] + rotation[:, None]) % 4
    rotated = torch.gather(scaled, 1, order[:, :, None].expand(n, 4, 2))
    points = rotated + shifts.view(n, 4, 2).to(torch.float64)
    coeffs = solve_homography(points, corners.expand(n, 4, 2))
    return ProjectiveSample(coeffs, points, scales, rotation, shifts)


def solve_homography(src: Tensor, dst: Tensor) -> Tensor:
    """Coefficients ``(a, ..., h)`` of the homographies that map ``src`` onto ``dst``.

    Batched version of AET's ``find_coeffs(pa=src, pb=dst)``: four point pairs per sample give
    eight linear equations ``[x, y, 1, 0, 0, 0, -X x, -X y] . c = X`` (and the same for ``Y``).

    Args:
        src: ``(N, 4, 2)`` points ``(x, y)``.
        dst: ``(N, 4, 2)`` points ``(X, Y)``.

    Returns:
        ``(N, 8)`` float64 coefficients.
    """
    if src.shape != dst.shape or src.dim() != 3 or src.shape[1:] != (4, 2):
        raise ValueError(f"src and dst must both be (N, 4, 2), got {tuple(src.shape)} and "
                         f"{tuple(dst.shape)}")
    src, dst = src.to(torch.float64), dst.to(torch.float64)
    x, y = src[..., 0], src[..., 1]
    big_x, big_y = dst[..., 0], dst[..., 1]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rows_x = torch.stack([x, y, one, zero, zero, zero, -big_x * x, -big_x * y], dim=-1)
    rows_y = torch.stack([zero, zero, zero, x, y, one, -big_y * x, -big_y * y], dim=-1)
    a = torch.stack([rows_x, rows_y], dim=2).reshape(src.shape[0], 8, 8)
    b = torch.stack([big_x, big_y], dim=2).reshape(src.shape[0], 8)
    return torch.linalg.solve(a, b)


def apply_homography(coeffs: Tensor, points: Tensor) -> Tensor:
    """Maps ``points`` ``(N, ..., 2)`` through the homographies ``coeffs`` ``(N, 8)``."""
    c = coeffs.view(coeffs.shape[0], *([1] * (points.dim() - 2)), 8)
    x, y = points[..., 0], points[..., 1]
    den = c[..., 6] * x + c[..., 7] * y + 1
    return torch.stack(
        [(c[..., 0] * x + c[..., 1] * y + c[..., 2]) / den,
         (c[..., 3] * x + c[..., 4] * y + c[..., 5]) / den],
        dim=-1,
    )


def warp_perspective(
    images: Tensor,
    coeffs: Tensor,
    fill: float | tuple[float, ...] = 128 / 255,
    interpolation: str = "bilinear",
    num_threads: int | None = 1,
) -> Tensor:
    """Warps a batch, each image with its own homography, like PIL's ``Image.transform``.

    ``out[n, :, y, x]`` samples ``images[n]`` at ``H_n(x + 0.5, y + 0.5)`` (input pixel centres
    at ``+0.5`` too), where ``H_n`` is given by ``coeffs[n]`` in PIL's ``PERSPECTIVE``
    convention (output -> input). Output pixels whose source point is outside
    ``[0, W) x [0, H)`` get ``fill``; others are interpolated with edge pixels replicated.

    Args:
        images: ``(N, C, H, W)`` float images.
        coeffs: ``(N, 8)`` coefficients (any float dtype; the grid is computed in float64).
        fill: Fill value, one per channel or a scalar, in the units of ``images`` (AET: 128
            of 255).
        interpolation: ``"bilinear"`` (AET) or ``"nearest"``.
        num_threads: torch intra-op threads for the warp of CPU tensors (restored afterwards;
            None keeps torch's setting). The warp is a handful of small ops: on a busy 2-core
            machine one thread took 65 ms per 128 x 3 x 32 x 32 batch, two threads 440 ms.

    Returns:
        ``(N, C, H, W)`` tensor of ``images``' dtype and device.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float (N, C, H, W) tensor, got "
                         f"{images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    if coeffs.shape != (n, 8):
        raise ValueError(f"coeffs must be ({n}, 8) for {n} images, got {tuple(coeffs.shape)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    fill_t = torch.as_tensor(fill, dtype=images.dtype, device=images.device).flatten()
    if fill_t.numel() not in (1, c):
        raise ValueError(f"fill must be a scalar or {c} values, got {fill!r}")
    device = images.device
    threads = torch_threads(num_threads if device.type == "cpu" else None)
    with threads:
        return _warp(images, coeffs.to(device=device, dtype=torch.float64), fill_t, interpolation)


def _warp(images: Tensor, coeffs: Tensor, fill: Tensor, interpolation: str) -> Tensor:
    n, _, h, w = images.shape
    device = images.device
    ys = torch.arange(h, dtype=torch.float64, device=device) + 0.5
    xs = torch.arange(w, dtype=torch.float64, device=device) + 0.5
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    src = apply_homography(coeffs, torch.stack([grid_x, grid_y], dim=-1).expand(n, h, w, 2))
    sx, sy = src[..., 0], src[..., 1]
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    grid = torch.stack([sx * (2.0 / w) - 1.0, sy * (2.0 / h) - 1.0], dim=-1).to(images.dtype)
    out = F.grid_sample(images, grid, mode=interpolation, padding_mode="border",
                        align_corners=False)
    return torch.where(inside[:, None], out, fill.view(1, -1, 1, 1))


def _stats(like: Tensor) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(COEFF_MEAN, dtype=like.dtype, device=like.device)
    std = torch.tensor(COEFF_STD, dtype=like.dtype, device=like.device)
    return mean, std


def normalize_coeffs(coeffs: Tensor) -> Tensor:
    """``(coeffs - COEFF_MEAN) / COEFF_STD`` over the last dim (8): AET's regression target."""
    if coeffs.shape[-1] != 8:
        raise ValueError(f"coeffs must end in 8 values, got shape {tuple(coeffs.shape)}")
    mean, std = _stats(coeffs)
    return (coeffs - mean) / std


def denormalize_coeffs(targets: Tensor) -> Tensor:
    """Inverse of :func:`normalize_coeffs`: ``targets * COEFF_STD + COEFF_MEAN``."""
    if targets.shape[-1] != 8:
        raise ValueError(f"targets must end in 8 values, got shape {tuple(targets.shape)}")
    mean, std = _stats(targets)
    return targets * std + mean
