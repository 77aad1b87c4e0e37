"""The generator: decode an encoder's last conv feature map back into the input image."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ReconstructionHead", "cudnn_conv_tf32", "nhwc_by_default"]


@torch.compiler.assume_constant_result  # read at trace time: a compiled graph keeps its format
def cudnn_conv_tf32() -> bool:
    """Whether cuDNN convolutions may use TF32: the new per-backend setting (torch >= 2.9) where
    one is set, read leaf first ("none" defers to the level above), else the legacy flag."""
    cudnn = torch.backends.cudnn
    levels = [getattr(getattr(cudnn, "conv", None), "fp32_precision", None),
              getattr(cudnn, "fp32_precision", None),
              getattr(torch.backends, "fp32_precision", None)]
    if levels[0] is None:
        return bool(cudnn.allow_tf32)
    return next((level == "tf32" for level in levels if level not in (None, "none")), False)


def nhwc_by_default(on_cuda: bool, autocast: bool) -> bool:
    """The head's default format (``channels_last=None``): channels-last for CUDA inputs whose
    convolutions run in reduced precision anyway (autocast, or cuDNN's TF32), else NCHW."""
    return on_cuda and (autocast or cudnn_conv_tf32())


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

    Default width (``width=None``): a quarter of the feature map's channels, clamped to
    [``min_width``, ``max_width``] = [16, 128], so the head's cost scales with the encoder's (on
    AlexNet-CIFAR width 1.0 the default head adds ~3% to a training step on a 2-core CPU; half
    the channels added ~15%: see ``benchmarks/studies/overhead.py``). The width halves while the
    side doubles, so every stage costs the same and the first width sets the cost: the cap keeps
    a 2048-channel ResNet-50 map at 224 px to +2.6% of the step's FLOPs (+25% with the former cap
    of 512; ``benchmarks/results/flops.md``). Parameter counts of the default head (BatchNorm):

    ==========================================  ================  ======  =========
    encoder (tapped layer, 32x32 / 224x224 in)  feature map       stages  params
    ==========================================  ================  ======  =========
    AlexNet-CIFAR width 1.0 (conv5)             256 x 4 x 4       3       0.04 M
    resnet18, 32x32 input (layer4.1.conv2)      512 x 1 x 1       5       0.17 M
    resnet18, 224x224 input (layer4.1.conv2)    512 x 7 x 7       5       0.17 M
    ==========================================  ================  ======  =========

    (The table is checked by ``tests/recon_aux/test_head.py``.)

    Multi-level input (``in_channels`` a sequence, e.g. ``layer=["layer3", "layer4"]``), after
    RePre (Wang et al., IJCAI 2022), which fuses several encoder levels in a light conv decoder:
    each level gets its own 1x1 lateral stem (conv, norm, ReLU) to the head's width; the laterals
    are resized (``upsample`` mode) to the finest level's size and summed, and decoding continues
    from there as above. ``in_size`` is then the finest level's size.

    Args:
        in_channels: Channels of the tapped feature map, or one count per level (multi-level).
        in_size: ``(h, w)`` of the feature map (the finest level's, multi-level).
        out_size: ``(H, W)`` of the reconstruction by default.
        out_channels: Channels of the reconstruction (3 for RGB).
        width: Channels after the stem; ``None``: a quarter of the widest input, clamped to
            ``[min_width, max_width]``.
        min_width: The default width's lower clamp, and the floor of every later stage's
            (halving) width.
        max_width: The default width's upper clamp.
        norm: ``"batch"``, ``"group"`` (GroupNorm, ``gcd(C, 8)`` groups) or ``"none"``, after
            every conv but the last.
        upsample: ``"nearest"`` or ``"bilinear"``, for each x2 stage and any final resize.
        out_scale: 1, 2 or 4: the doublings (``log2``) done by the sub-pixel output conv; at
            most the doublings the geometry needs (2, the default, is 1 when there are none).
        output_range: ``(lo, hi)`` the sigmoid output is scaled to, before ``mean``/``std``.
        mean: The pipeline's per-channel mean, applied last (give ``std`` too, or neither).
        std: The pipeline's per-channel std.

    Attributes:
        in_channels, in_size: Feature map the head was built for (later calls may differ in
            spatial size; convolutions do not care and the output is resized to ``out_size``);
            ``in_channels`` is a tuple for a multi-level head.
        levels: Number of fused feature maps (1 for the single-level head).
        multi_level: True when built with a sequence of channel counts (forward takes a list).
        out_size: Default output size (H, W).
        stages: Number of x2 doublings in all (conv stages plus the sub-pixel output).
        out_scale: Upsampling factor of the sub-pixel output conv.
        channels: Width after the stem and after each conv stage.
        upsample: The upsampling mode, ``"nearest"`` or ``"bilinear"``.
        output_range: ``(lo, hi)`` of the output before the normalisation.
        channels_last: Memory format of the decoding: True runs it in channels-last (NHWC),
            False in NCHW, None (default) channels-last for CUDA inputs whose convolutions run
            in reduced precision anyway (autocast, or cuDNN's TF32, torch's default) and NCHW
            otherwise. The same function either way; only the kernels, and so the rounding,
            differ (CPU runs stay bit for bit).

    Example:
        >>> head = ReconstructionHead(256, (4, 4), (32, 32))
        >>> head(torch.randn(8, 256, 4, 4)).shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(
        self,
        in_channels: int | Sequence[int],
        in_size: Sequence[int],
        out_size: Sequence[int],
        out_channels: int = 3,
        width: int | None = None,
        min_width: int = 16,
        max_width: int = 128,
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
        multi = not isinstance(in_channels, int)
        level_channels = [int(c) for c in in_channels] if multi else [int(in_channels)]
        if multi and not level_channels:
            raise ValueError("in_channels is an empty sequence; give one channel count per level.")
        in_channels = tuple(level_channels) if multi else level_channels[0]
        if min(*level_channels, h, w, H, W) < 1:
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
        # runs at full resolution, where small-channel convs are slowest. The default 2 becomes
        # 1 when there is nothing to double (a map at the image's size); a larger scale than
        # the doublings needed is refused, not lowered.
        if out_scale > max(2 ** self.stages, 2):
            raise ValueError(
                f"out_scale={out_scale} (head_out_scale) needs {int(math.log2(out_scale))} "
                f"doublings from the {h}x{w} map to the {H}x{W} image, which takes "
                f"{self.stages}; use head_out_scale={2 ** self.stages}.")
        self.out_scale = min(out_scale, 2 ** self.stages)
        conv_stages = self.stages - int(math.log2(self.out_scale))
        c0 = (width if width is not None
              else min(max(max(level_channels) // 4, min_width), max_width))
        self.channels = [c0] + [max(c0 >> (i + 1), min_width) for i in range(conv_stages)]
        self.levels = len(level_channels)
        self.multi_level = multi

        def stem(cin: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, c0, 1, bias=norm == "none"), _norm(norm, c0), nn.ReLU(True))

        if multi:
            self.laterals = nn.ModuleList(stem(c) for c in level_channels)
        else:
            self.stem = stem(in_channels)
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
        self.channels_last: bool | None = None

    def forward(self, features: Tensor | Sequence[Tensor],
                out_size: Sequence[int] | None = None) -> Tensor:
        """Reconstruct ``N x 3 x H x W`` images from ``N x C x h x w`` features.

        ``features`` is a sequence of maps, one per level, for a multi-level head. ``out_size``
        defaults to the size the head was built for (multi-crop loops pass each crop's own size).
        """
        size = tuple(int(v) for v in (out_size or self.out_size))
        align = False if self.upsample == "bilinear" else None
        x = self._fuse(features) if self.multi_level else self._single(features)
        for block in self.blocks:
            x = block(F.interpolate(x, scale_factor=2.0, mode=self.upsample, align_corners=align))
        x = self.out(x)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        lo, hi = self.output_range
        y = lo + (hi - lo) * torch.sigmoid(x)
        return (y - self.mean) / self.std

    def _single(self, features: Tensor) -> Tensor:
        if not torch.is_tensor(features) or features.dim() != 4 \
                or features.shape[1] != self.in_channels:
            got = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
            raise ValueError(f"ReconstructionHead expects N x {self.in_channels} x h x w features, "
                             f"got {got}.")
        return self.stem(self._memory_format(features))

    def _memory_format(self, features: Tensor) -> Tensor:
        # On CUDA, BatchNorm over NCHW maps of 16-32 channels at 100+ px is slow, and cuDNN
        # transposes every bf16 conv to NHWC and back: on an H200 (alexnet 224 px, batch 256,
        # bf16) NHWC decoding took +L2 from 4.98x to 2.58x a base step, +L2+LPIPS-alex from 5.91x
        # to 3.49x (benchmarks/results/gpu-check/head-memory-format.txt).
        # Strict float32 stays NCHW: with TF32 off, cuDNN's NHWC backward of this head still
        # rounds almost like TF32 (largest input-gradient error against float64, for gradients
        # up to 0.9: NHWC 7e-3, NCHW 6e-7; with TF32 on, 2e-2 in both; H200, torch 2.11), so
        # the fast format is the default only where convolutions are reduced-precision anyway.
        nhwc = self.channels_last
        if nhwc is None:
            nhwc = nhwc_by_default(features.is_cuda, torch.is_autocast_enabled())
        return features.contiguous(memory_format=torch.channels_last) if nhwc else features

    def _fuse(self, features: Sequence[Tensor]) -> Tensor:
        shapes = [tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
                  for f in (features if isinstance(features, (list, tuple)) else [features])]
        if (not isinstance(features, (list, tuple)) or len(features) != self.levels
                or any(not torch.is_tensor(f) or f.dim() != 4 or f.shape[1] != c
                       for f, c in zip(features, self.in_channels))):
            raise ValueError(f"this multi-level ReconstructionHead expects {self.levels} feature "
                             f"maps with channels {list(self.in_channels)} (N x C x h x w each), "
                             f"got {shapes}.")
        size = max((tuple(f.shape[-2:]) for f in features), key=lambda hw: hw[0] * hw[1])
        align = False if self.upsample == "bilinear" else None
        x = 0
        for f, lateral in zip(features, self.laterals):
            y = lateral(self._memory_format(f))
            if tuple(y.shape[-2:]) != size:
                y = F.interpolate(y, size=size, mode=self.upsample, align_corners=align)
            x = x + y
        return x

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}x{self.in_size[0]}x{self.in_size[1]}, "
                f"out={self.out_size}, stages={self.stages}, out_scale={self.out_scale}, "
                f"channels={self.channels}")
