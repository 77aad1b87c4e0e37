"""AET's projective transformations (adapters/ops/projective.py) against the original's per-image
code path (``maple-research-lab/AET`` ``cifar/projective/dataset.py``): PIL's
``Image.transform(PERSPECTIVE, BILINEAR, fillcolor=128)`` for the warp, and its corner
construction + least-squares ``find_coeffs`` re-derived in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from adapters.ops.projective import (
    COEFF_MEAN,
    COEFF_STD,
    apply_homography,
    denormalize_coeffs,
    normalize_coeffs,
    sample_projective,
    solve_homography,
    warp_perspective,
)

CORNERS = [(0.0, 0.0), (32.0, 0.0), (32.0, 32.0), (0.0, 32.0)]


def _original_coeffs(scale: float, rotation: int, shift: list[int]) -> np.ndarray:
    """The original's corner construction and ``find_coeffs`` normal equations, per image."""
    width = height = 32
    center = (width * 0.5 + 0.5, height * 0.5 + 0.5)
    pts = [((cx - center[0]) * scale + center[0], (cy - center[1]) * scale + center[1])
           for cx, cy in CORNERS]
    pts = [pts[(i + rotation) % 4] for i in range(4)]
    pts = [(pts[i][0] + shift[2 * i], pts[i][1] + shift[2 * i + 1]) for i in range(4)]
    rows, rhs = [], []
    for (x, y), (big_x, big_y) in zip(pts, CORNERS):
        rows.append([x, y, 1, 0, 0, 0, -big_x * x, -big_x * y])
        rows.append([0, 0, 0, x, y, 1, -big_y * x, -big_y * y])
        rhs += [big_x, big_y]
    a, b = np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64)
    return np.linalg.inv(a.T @ a) @ a.T @ b


# -- the sampler -------------------------------------------------------------------------------


def test_sampler_ranges_match_the_original():
    g = torch.Generator().manual_seed(0)
    s = sample_projective(20000, 32, 32, g)
    assert s.coeffs.shape == (20000, 8) and s.coeffs.dtype == torch.float64
    # Integer corner shifts in [-4, 4], each value drawn (random.randint(-4, 4) per coordinate).
    assert s.shift.dtype == torch.int64
    assert torch.equal(s.shift.unique(), torch.arange(-4, 5))
    counts = torch.bincount((s.shift + 4).flatten(), minlength=9).double() / s.shift.numel()
    assert (counts - 1 / 9).abs().max() < 0.01
    # Scale ~ U(0.8, 1.2).
    assert 0.8 <= s.scale.min() < 0.801 and 1.199 < s.scale.max() <= 1.2
    assert abs(s.scale.mean().item() - 1.0) < 0.005
    assert abs(s.scale.var().item() - 0.4**2 / 12) < 0.001
    # Corner rotation by a multiple of 90 degrees: 4 equally likely values, no other angle.
    assert torch.equal(s.rotation.unique(), torch.arange(4))
    assert (torch.bincount(s.rotation).double() / 20000 - 0.25).abs().max() < 0.015


def test_sampler_coefficients_equal_the_originals_construction():
    g = torch.Generator().manual_seed(1)
    s = sample_projective(200, 32, 32, g)
    for i in range(200):
        ref = _original_coeffs(float(s.scale[i]), int(s.rotation[i]), s.shift[i].tolist())
        np.testing.assert_allclose(s.coeffs[i].numpy(), ref, rtol=1e-7, atol=1e-9)
    # The homography sends each point to its corner: input corner i lands at point i.
    corners = torch.tensor(CORNERS, dtype=torch.float64).expand(200, 4, 2)
    torch.testing.assert_close(apply_homography(s.coeffs, s.points), corners)
    torch.testing.assert_close(solve_homography(s.points, corners), s.coeffs)


def test_sampler_settings_and_errors():
    g = torch.Generator().manual_seed(2)
    s = sample_projective(500, 32, 32, g, shift=0, scale=(1.0, 1.0))
    # No shift, no scale: only the four quarter turns remain; coefficients are 0/1/32 exactly
    # up to the original's half-pixel rotation centre, which scale=1 cancels.
    assert torch.equal(s.shift, torch.zeros_like(s.shift))
    assert s.coeffs[:, 6:].abs().max() < 1e-12  # affine: no perspective terms
    identity = s.rotation == 0
    torch.testing.assert_close(
        s.coeffs[identity], torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0], dtype=torch.float64)
        .expand(int(identity.sum()), 8))
    s2 = sample_projective(100, 32, 32, g, shift=2)
    assert s2.shift.abs().max() == 2
    with pytest.raises(ValueError, match="shift must be an int"):
        sample_projective(4, 32, 32, g, shift=4.5)
    with pytest.raises(ValueError, match="scale must be"):
        sample_projective(4, 32, 32, g, scale=(1.2, 0.8))


# -- the warp ----------------------------------------------------------------------------------


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth-ish uint8 test images: blurred noise, (n, 3, 32, 32)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = 0.7 * x + 0.3 * torch.rand(n, 3, 32, 32, generator=g)
    return (x * 255).round().to(torch.uint8)


@pytest.mark.parametrize("interpolation,pil_mode,tolerance,max_bad",
                         [("bilinear", Image.BILINEAR, 1.0, 1e-3),
                          ("nearest", Image.NEAREST, 0.0, 5e-3)])
def test_warp_matches_pil_transform(interpolation, pil_mode, tolerance, max_bad):
    images = _images(32)
    s = sample_projective(32, 32, 32, torch.Generator().manual_seed(3))
    out = warp_perspective(images.float() / 255, s.coeffs, 128 / 255, interpolation) * 255
    bad, total = 0, 0
    for i in range(32):
        pil = Image.fromarray(images[i].permute(1, 2, 0).numpy()).transform(
            (32, 32), Image.PERSPECTIVE, tuple(s.coeffs[i].tolist()), pil_mode,
            fillcolor=(128, 128, 128))
        ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()
        diff = (out[i] - ref).abs()
        bad += int((diff > tolerance + 1e-3).sum())  # PIL rounds to uint8: 1 level for bilinear
        total += diff.numel()
    # Besides uint8 rounding, only pixels whose source point sits on a sampling boundary (float
    # ties between PIL's double arithmetic and ours) may differ.
    assert bad / total <= max_bad


def test_warp_of_a_ramp_follows_the_homography():
    # Bilinear interpolation of a linear ramp is exact, so the warped ramp must equal the
    # source coordinate H(x + 0.5, y + 0.5) (minus the half-pixel centre) wherever it is inside.
    ramp_x = (torch.arange(32, dtype=torch.float64) + 0.5).expand(32, 32)
    ramp = torch.stack([ramp_x, ramp_x.t(), torch.ones(32, 32, dtype=torch.float64)])[None]
    s = sample_projective(16, 32, 32, torch.Generator().manual_seed(4))
    out = warp_perspective(ramp.expand(16, 3, 32, 32), s.coeffs, fill=-1.0)
    centres = torch.stack(torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="xy"),
                          -1).double() + 0.5
    src = apply_homography(s.coeffs, centres.expand(16, 32, 32, 2))
    inside = ((src >= 0) & (src < 32)).all(-1)
    interior = ((src >= 0.5) & (src <= 31.5)).all(-1)  # no edge clamping
    torch.testing.assert_close(out[:, 0][interior], src[..., 0][interior])
    torch.testing.assert_close(out[:, 1][interior], src[..., 1][interior])
    # Outside the source: exactly the fill; inside: never the fill.
    assert torch.equal(out[:, 2] == -1.0, ~inside)
    assert 0.05 < (~inside).double().mean() < 0.5  # the warps do uncover borders


def test_warp_identity_and_errors():
    x = torch.rand(3, 3, 32, 32)
    identity = torch.tensor([[1.0, 0, 0, 0, 1, 0, 0, 0]]).expand(3, 8)
    assert torch.equal(warp_perspective(x, identity), x)
    with pytest.raises(ValueError, match=r"coeffs must be \(3, 8\)"):
        warp_perspective(x, identity[:2])
    with pytest.raises(ValueError, match="interpolation"):
        warp_perspective(x, identity, interpolation="bicubic")
    with pytest.raises(ValueError, match="float"):
        warp_perspective(x.to(torch.uint8), identity)


# -- targets -----------------------------------------------------------------------------------


def test_coefficient_normalisation_round_trip():
    s = sample_projective(5000, 32, 32, torch.Generator().manual_seed(6))
    t = normalize_coeffs(s.coeffs)
    torch.testing.assert_close(denormalize_coeffs(t), s.coeffs)
    torch.testing.assert_close(
        t, (s.coeffs - torch.tensor(COEFF_MEAN, dtype=torch.float64))
        / torch.tensor(COEFF_STD, dtype=torch.float64))
    # The original's constants make the targets roughly zero-mean, order-one values.
    assert t.mean(0).abs().max() < 0.1
    assert ((t.std(0) > 0.3) & (t.std(0) < 1.0)).all()
    # Identity: a = e = 1, c = f = (0 - 16) / 20.
    ident = normalize_coeffs(torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0]))
    torch.testing.assert_close(ident, torch.tensor([1.0, 0, -0.8, 0, 1, -0.8, 0, 0]))
    with pytest.raises(ValueError, match="8 values"):
        normalize_coeffs(torch.zeros(3, 6))
