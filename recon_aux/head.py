"""The generator: decode an encoder's last conv feature map back into the input image."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReconstructionHead"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r} is not one of 'batch', 'group', 'none'.")


class ReconstructionHead(nn.Module):
    """Upsampling decoder: feature map ``N x C x h x w`` -> image ``N x 3 x H x W``.

    The paper's "simple generator" (Hizioglu, 2020, section 3.2 and Figure 1) takes the output of
    the encoder's last convolutional layer and reconstructs the input image. The thesis gives no
    architecture; here it is a 1x1 stem, then x2 upsampling stages (upsample, 3x3 conv, norm,
    ReLU) whose width halves at each stage down to ``min_width``, and a final 3x3 conv whose
    output is a sub-pixel convolution (``PixelShuffle(out_scale)``, Shi et al., 2016) for the
    last ``log2(out_scale)`` doublings: ``ceil(log2(H / h))`` doublings in all, and no conv at
    full resolution, where small-channel convolutions are slowest on CPUs. When the doublings do
    not land exactly on the requested size (e.g. h=3 for H=32), a bilinear resize closes the gap.
    The
    output passes through a sigmoid scaled to ``output_range`` and, when given, the pipeline's
    ``mean``/``std`` normalisation, so the reconstruction is in the images' own encoding.

    Default width (``width=None``): a quarter of the feature map's channels, clamped to [16, 512],
    so the head's cost scales with the encoder's (on AlexNet-CIFAR width 1.0 the default head
    adds ~3% to a training step on a 2-core CPU; half the channels added ~15%: see
    ``benchmarks/overhead.py``). Parameter counts of the default head (BatchNorm):

    ==========================================  ================  ======  =========
    encoder (tapped layer, 32x32 / 224x224 in)  feature map       stages  params
    ==========================================  ================  ======  =========
    AlexNet-CIFAR width 1.0 (conv5)             256 x 4 x 4       3       0.04 M
    resnet18, 32x32 input (layer4.1.conv2)      512 x 1 x 1       5       0.17 M
    resnet18, 224x224 input (layer4.1.conv2)    512 x 7 x 7       5       0.17 M
    ==========================================  ================  ======  =========

    (The table is checked by ``tests/test_head.py``.)

    Attributes:
        in_channels, in_size: Feature map the head was built for (later calls may differ in
            spatial size; convolutions do not care and the output is resized to ``out_size``).
        out_size: Default output size (H, W).
        stages: Number of x2 doublings in all (conv stages plus the sub-pixel output).
        out_scale: Upsampling factor of the sub-pixel output conv.
        channels: Width after the stem and after each conv stage.

    Example:
        >>> head = ReconstructionHead(256, (4, 4), (32, 32))
        >>> head(torch.randn(8, 256, 4, 4)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(
        self,
        in_channels: int,
        in_size: Sequence[int],
        out_size: Sequence[int],
        out_channels: int = 3,
        width: int | None = None,
        min_width: int = 16,
        norm: str = "batch",
        upsample: str = "nearest",
        out_scale: int = 2,
        output_range: Sequence[float] = (0.0, 1.0),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        h, w = (int(v) for v in in_size)
        H, W = (int(v) for v in out_size)
        if min(in_channels, h, w, H, W) < 1:
            raise ValueError(f"bad head geometry: in_channels={in_channels}, in_size={(h, w)}, "
                             f"out_size={(H, W)}; all must be >= 1.")
        if upsample not in ("nearest", "bilinear"):
            raise ValueError(f"upsample={upsample!r} is not one of 'nearest', 'bilinear'.")
        self.in_channels, self.in_size, self.out_size = in_channels, (h, w), (H, W)
        if out_scale not in (1, 2, 4):
            raise ValueError(f"out_scale={out_scale} must be 1, 2 or 4.")
        self.upsample = upsample
        self.stages = max(0, math.ceil(math.log2(max(H / h, W / w))))
        # The last log2(out_scale) doublings are a sub-pixel convolution (PixelShuffle): no conv
        # runs at full resolution, where small-channel convs are slowest.
        self.out_scale = min(out_scale, 2 ** self.stages)
        conv_stages = self.stages - int(math.log2(self.out_scale))
        c0 = width if width is not None else min(max(in_channels // 4, 16), 512)
        self.channels = [c0] + [max(c0 >> (i + 1), min_width) for i in range(conv_stages)]

        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c0, 1, bias=norm == "none"), _norm(norm, c0), nn.ReLU(True)
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=norm == "none"), _norm(norm, cout),
                nn.ReLU(True),
            )
            for cin, cout in zip(self.channels[:-1], self.channels[1:])
        )
        self.out = nn.Sequential(
            nn.Conv2d(self.channels[-1], out_channels * self.out_scale ** 2, 3, padding=1),
            nn.PixelShuffle(self.out_scale),
        )
        lo, hi = (float(v) for v in output_range)
        self.output_range = (lo, hi)
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither.")
        if mean is not None:
            m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
            s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        else:
            m, s = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
        self.register_buffer("mean", m, persistent=False)
        self.register_buffer("std", s, persistent=False)

    def forward(self, features: Tensor, out_size: Sequence[int] | None = None) -> Tensor:
        """Reconstruct ``N x 3 x H x W`` images from ``N x C x h x w`` features.

        ``out_size`` defaults to the size the head was built for (multi-crop loops pass each
        crop's own size).
        """
        if features.dim() != 4 or features.shape[1] != self.in_channels:
            raise ValueError(f"ReconstructionHead expects N x {self.in_channels} x h x w features, "
                             f"got shape {tuple(features.shape)}.")
        size = tuple(int(v) for v in (out_size or self.out_size))
        x = self.stem(features)
        for block in self.blocks:
            align = False if self.upsample == "bilinear" else None
            x = block(F.interpolate(x, scale_factor=2.0, mode=self.upsample, align_corners=align))
        x = self.out(x)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        lo, hi = self.output_range
        y = lo + (hi - lo) * torch.sigmoid(x)
        return (y - self.mean) / self.std

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}x{self.in_size[0]}x{self.in_size[1]}, "
                f"out={self.out_size}, stages={self.stages}, out_scale={self.out_scale}, "
                f"channels={self.channels}")
