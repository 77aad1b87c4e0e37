"""ResNet-18 for 32x32 images, with a width multiplier (the backbone of lightly's CIFAR-10
benchmarks and of the SimCLR/BYOL/SwAV examples)."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Backbone, round_width

__all__ = ["BasicBlock", "ResNet18CIFAR"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut.

    The basic block of He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
    CVPR 2016, as torchvision's ``models/resnet.py`` ``BasicBlock`` (projection shortcut when
    the shape changes). Shapes: ``(N, in_channels, h, w) -> (N, out_channels, h', w')`` with
    ``h' = ceil(h / stride)``.

    Args:
        in_channels: Channels in.
        out_channels: Channels out.
        stride: Stride of ``conv1`` and of the shortcut.

    Attributes:
        conv1, bn1, conv2, bn2: The residual branch.
        shortcut: ``nn.Identity`` or a strided 1x1 conv + BN when the shape changes.
        stride, out_channels: As given.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride
        self.out_channels = out_channels
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))

    def out_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(C, H, W)`` of the output for an input of ``shape`` ``(C_in, H, W)``."""
        _, h, w = shape
        return (self.out_channels, (h - 1) // self.stride + 1, (w - 1) // self.stride + 1)


class ResNet18CIFAR(Backbone):
    """ResNet-18 adapted to 32x32 inputs: 3x3 stride-1 stem and no max-pool.

    The CIFAR variant used by lightly's CIFAR-10 benchmarks (``benchmarks/cifar10_benchmark.py``
    in lightly-ai/lightly: torchvision's resnet18 with ``conv1`` replaced by a 3x3 stride-1 conv
    and ``maxpool`` removed) and by SimCLR's CIFAR experiments (Chen et al., 2020, appendix B.9).
    ``width`` scales every stage's channels (64, 128, 256, 512) so the network fits a CPU:
    width 1.0 is the standard 11.2 M-parameter model, width 0.25 has 0.70 M.

    Probe points: ``layer1`` .. ``layer4`` (conv maps) and ``pool`` (global average, the
    representation ``forward`` returns). ``recon_aux.attach(..., layer=None)`` taps
    ``layer4.1.conv2`` (the last residual branch conv, before its BN, the skip and the ReLU),
    4x4 for a 32x32 input.

    Attributes:
        width: Channel multiplier.
        widths: Channels of layer1..layer4.
        out_dim: ``widths[-1]``.

    Example:
        >>> import torch
        >>> model = ResNet18CIFAR(width=0.25)
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 128])
    """

    input_size = 32
    _fixed_input_size = False
    _min_input_size = 8

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.width = float(width)
        self.widths = tuple(round_width(c, width) for c in (64, 128, 256, 512))
        c0 = self.widths[0]
        self.conv1 = nn.Sequential(
            nn.Conv2d(3, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(inplace=True)
        )
        cin = c0
        for i, c in enumerate(self.widths, start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, c, stride), BasicBlock(c, c)))
            cin = c
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self._stage_names = ("conv1", "layer1", "layer2", "layer3", "layer4", "pool")
        self.probe_points = ("layer1", "layer2", "layer3", "layer4", "pool")
        self.out_dim = self.widths[-1]
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        return f"width={self.width}, widths={self.widths}"
