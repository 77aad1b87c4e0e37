"""AlexNet backbones of DeepCluster and SeLa: ImageNet size (224) and a CIFAR size (32)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import Backbone, round_width

__all__ = ["AlexNet", "AlexNetCIFAR", "SobelFilter"]

# (out_channels, kernel_size, stride, padding) of conv1..conv5.
_IMAGENET_CONVS = ((96, 11, 4, 2), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1))
_CIFAR_CONVS = ((96, 5, 2, 2), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1))
_FC_DIM = 4096
_DROPOUT = 0.5


class SobelFilter(nn.Sequential):
    """Fixed RGB -> (grayscale) -> Sobel gradients layer of DeepCluster, as two frozen convs.

    Follows ``facebookresearch/deepcluster`` ``models/alexnet.py`` (commit 1b56bec): a 1x1 conv
    averaging the three channels, then a 3x3 conv with the horizontal and vertical Sobel kernels.
    Its parameters have ``requires_grad=False``; they stay parameters (not buffers) so that the
    state dict has the same entries as DeepCluster's.

    Shapes: ``(N, 3, H, W) -> (N, 2, H, W)``.
    """

    def __init__(self) -> None:
        grayscale = nn.Conv2d(3, 1, kernel_size=1)
        sobel = nn.Conv2d(1, 2, kernel_size=3, padding=1)
        super().__init__(grayscale, sobel)
        with torch.no_grad():
            grayscale.weight.fill_(1.0 / 3.0)
            grayscale.bias.zero_()
            sobel.weight[0, 0] = torch.tensor(
                [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]
            )
            sobel.weight[1, 0] = torch.tensor(
                [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]
            )
            sobel.bias.zero_()
        for p in self.parameters():
            p.requires_grad_(False)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int, stride: int, pad: int):
    # Conv keeps its bias, as in DeepCluster/SeLa (bias=True even though BN follows).
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=kernel, stride=stride, padding=pad),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _fc(in_features: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Dropout(_DROPOUT), nn.Linear(in_features, out_features), nn.ReLU(inplace=True)
    )


class _AlexNetBase(Backbone):
    """conv1-pool1-conv2-pool2-conv3-conv4-conv5-pool5 [-fc6-fc7], each conv with BN + ReLU."""

    def __init__(
        self,
        convs: tuple[tuple[int, int, int, int], ...],
        pool_padding: int,
        input_size: int,
        fc_dim: int,
        sobel: bool,
        with_fc: bool,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.sobel_input = bool(sobel)
        self.with_fc = bool(with_fc)
        self.conv_channels = tuple(c[0] for c in convs)
        self.fc_dim = int(fc_dim) if with_fc else 0

        stages: list[str] = []
        if sobel:
            self.sobel = SobelFilter()
            stages.append("sobel")
        in_channels = 2 if sobel else 3
        for i, (out_channels, kernel, stride, pad) in enumerate(convs, start=1):
            setattr(self, f"conv{i}", _conv_bn_relu(in_channels, out_channels, kernel, stride, pad))
            stages.append(f"conv{i}")
            if i in (1, 2, 5):
                setattr(self, f"pool{i}", nn.MaxPool2d(3, stride=2, padding=pool_padding))
                stages.append(f"pool{i}")
            in_channels = out_channels
        self.flatten = nn.Flatten()
        stages.append("flatten")
        self._stage_names = tuple(stages)
        self.probe_points = ("conv1", "conv2", "conv3", "conv4", "conv5")
        pool5_dim = math.prod(self._stage_shape("pool5", input_size))
        if with_fc:
            self.fc6 = _fc(pool5_dim, self.fc_dim)
            self.fc7 = _fc(self.fc_dim, self.fc_dim)
            self._stage_names += ("fc6", "fc7")
            self.probe_points += ("fc6", "fc7")
            self.out_dim = self.fc_dim
        else:
            self.out_dim = pool5_dim
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        # DeepCluster / SeLa ``_initialize_weights``: He-normal with fan-out for convs, N(0, 0.01)
        # for linears, zero biases, BN weight 1 / bias 0. The frozen Sobel layer is left as is.
        for name in self._stage_names:
            if name == "sobel":
                continue
            for m in getattr(self, name).modules():
                if isinstance(m, nn.Conv2d):
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                    nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, 0.0, 0.01)
                    nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, sobel={self.sobel_input}, with_fc={self.with_fc}, "
            f"out_dim={self.out_dim}"
        )


class AlexNet(_AlexNetBase):
    """AlexNet with BatchNorm for 224x224 input, as used by DeepCluster and SeLa on ImageNet.

    - DeepCluster: Caron et al., "Deep Clustering for Unsupervised Learning of Visual Features",
      ECCV 2018; code ``facebookresearch/deepcluster`` ``models/alexnet.py`` (commit 1b56bec,
      ``CFG['2012']``). DeepCluster trains it on Sobel-filtered input: ``sobel=True``.
    - SeLa: Asano et al., "Self-labelling via simultaneous clustering and representation
      learning", ICLR 2020; code ``yukimasano/self-label`` ``models/alexnet.py`` (commit 7700246,
      ``CFG['big']``), RGB input: ``sobel=False`` (the default). SeLa's CIFAR script ``cifar.py``
      also uses this network, on CIFAR images upscaled to 224 (see :class:`AlexNetCIFAR`).

    Layers (kernel/stride/pad as the originals): conv1 96 11/4/2 - maxpool 3/2 - conv2 256 5/1/2 -
    maxpool 3/2 - conv3 384 3/1/1 - conv4 384 3/1/1 - conv5 256 3/1/1 - maxpool 3/2 - flatten
    (9216) - dropout 0.5 - fc6 4096 - ReLU - dropout 0.5 - fc7 4096 - ReLU. Every conv is followed
    by its own ``BatchNorm2d`` and ``ReLU`` modules, so conv5 (a plain ``nn.Conv2d``) is the last
    conv run in ``forward``. Weight init as the originals: convs ``N(0, 2 / (k*k*out_channels))``,
    linears ``N(0, 0.01)``, zero biases, BN weight 1 / bias 0.

    Deviations: no classifier / pseudo-label head (``top_layer``); the adapters add their own on
    top of ``out_dim`` features. The originals' conv and fc modules live in ``features`` /
    ``classifier`` Sequentials; here each probe point is its own submodule (``conv1.0`` is the
    conv of conv1, ``fc6.1`` the linear of fc6), so state dicts need a key mapping to load theirs.

    Note: DeepCluster's ``main.py`` clusters the fc7 output *before* its ReLU (it drops the last
    ReLU while computing features); read it with a forward hook on ``model.fc7[1]`` (the Linear).
    SeLa's CIFAR kNN uses the post-ReLU fc7, i.e. ``forward``.

    Probe points (activations after ReLU, before pooling, as in SeLa's linear probes) and shapes
    for a 224 input: conv1 (96, 55, 55), conv2 (256, 27, 27), conv3 (384, 13, 13),
    conv4 (384, 13, 13), conv5 (256, 13, 13), fc6 (4096,), fc7 (4096,).

    Parameters: 58,284,096 (RGB); 58,272,504 with ``sobel=True`` (of which 24 frozen);
    3,749,952 with ``with_fc=False``.

    Attributes:
        probe_points: ``("conv1", ..., "conv5", "fc6", "fc7")``; without fc only the convs.
        out_dim: 4096 (fc7), or 9216 (flattened pool5 = 256 x 6 x 6) with ``with_fc=False``.
        input_size: 224; other sizes raise a ``ValueError``.
        sobel_input: Whether the frozen :class:`SobelFilter` runs first.
        last_conv: The conv of conv5.

    Args:
        sobel: Prepend DeepCluster's frozen grayscale + Sobel layer (conv1 then has 2 inputs).
        with_fc: Build fc6/fc7. If False, ``forward`` returns the flattened pool5 map.

    Examples:
        >>> model = AlexNet()
        >>> x = torch.randn(2, 3, 224, 224)
        >>> model(x).shape  # fc7
        torch.Size([2, 4096])
        >>> feats = model.forward_features(x, ["conv3", "fc6"])
        >>> feats["conv3"].shape, feats["fc6"].shape
        (torch.Size([2, 384, 13, 13]), torch.Size([2, 4096]))
    """

    def __init__(self, sobel: bool = False, with_fc: bool = True) -> None:
        super().__init__(
            _IMAGENET_CONVS,
            pool_padding=0,
            input_size=224,
            fc_dim=_FC_DIM,
            sobel=sobel,
            with_fc=with_fc,
        )

    def _size_hint(self) -> str:
        return " (e.g. Resize(256) + CenterCrop(224)); for 32x32 images use AlexNetCIFAR"


class AlexNetCIFAR(_AlexNetBase):
    """AlexNet with BatchNorm for 32x32 input (CIFAR-10/100, SVHN), with a width multiplier.

    No original exists to follow for the 32x32 geometry. The paper's Table 1 takes its CIFAR/SVHN
    numbers from SeLa (Asano et al., ICLR 2020), which took the baselines from AND (Huang et al.,
    ICML 2019). SeLa's CIFAR code (``yukimasano/self-label`` ``cifar.py``, commit 65d6261) does
    not have a 32x32 AlexNet: it upsamples CIFAR to 224 (``Resize(256)``,
    ``RandomResizedCrop(224)``) and trains the ImageNet AlexNet (:class:`AlexNet`, fc7 4096 used
    for kNN). AND's public code (``Raymond-sci/AND``) has only CIFAR ResNets. This class is that
    same network (widths 96-256-384-384-256, BN after every conv, maxpool 3/2 after conv1, conv2,
    conv5, dropout 0.5 + fc6 + fc7, same init) with the geometry scaled to 32x32 so that it is
    ~10x cheaper than running :class:`AlexNet` on upsampled images:

    - conv1 is 5x5, stride 2, pad 2 (the original's 11x11 stride 4 is for 224 input);
    - the three max-pools are 3/2 with padding 1 (the original's have none), so the maps are
      16 -> 8 -> 4 -> 2 instead of losing a border row at each pool;
    - conv2..conv5 keep the original kernels/strides/pads.

    Use :class:`AlexNet` on 224-upsampled images to reproduce SeLa's CIFAR setting exactly.

    Width: the conv widths are ``round(width * (96, 256, 384, 384, 256))``; fc6/fc7 have
    ``fc_dim`` units, by default ``round(4096 * width)`` (scaled too, so that the model stays
    cheap; SeLa's network has 4096 at every width - pass ``fc_dim=4096`` for that).

    Probe points (after ReLU, before pooling) and shapes at width 1: conv1 (96, 16, 16),
    conv2 (256, 8, 8), conv3 (384, 4, 4), conv4 (384, 4, 4), conv5 (256, 4, 4), fc6 (4096,),
    fc7 (4096,). pool5 is (256, 2, 2) -> 1024 values.

    Parameters: 24,702,016 at width 1.0; 6,180,384 at 0.5; 1,547,536 at 0.25.

    Attributes:
        probe_points: ``("conv1", ..., "conv5", "fc6", "fc7")``; without fc only the convs.
        out_dim: ``fc_dim`` (fc7), or ``4 * round(256 * width)`` (flattened pool5) with
            ``with_fc=False``.
        conv_channels: The five conv widths after scaling.
        input_size: 32; other sizes raise a ``ValueError``.
        last_conv: The conv of conv5.
        width, fc_dim, sobel_input, with_fc: As built (``fc_dim`` 0 without fc).

    Args:
        width: Multiplier of every conv width (and of fc6/fc7 unless ``fc_dim`` is given).
        fc_dim: Units of fc6 and fc7; default ``round(4096 * width)``.
        sobel: Prepend DeepCluster's frozen grayscale + Sobel layer (see :class:`AlexNet`).
        with_fc: Build fc6/fc7. If False, ``forward`` returns the flattened pool5 map.

    Examples:
        >>> model = AlexNetCIFAR(width=0.5)
        >>> x = torch.randn(8, 3, 32, 32)
        >>> model(x).shape  # fc7, 2048 = 4096 * 0.5
        torch.Size([8, 2048])
        >>> model.forward_features(x, ["conv5"])["conv5"].shape
        torch.Size([8, 128, 4, 4])
    """

    def __init__(
        self,
        width: float = 1.0,
        fc_dim: int | None = None,
        sobel: bool = False,
        with_fc: bool = True,
    ) -> None:
        if (
            isinstance(width, bool)
            or not isinstance(width, int | float)
            or not 0 < width < math.inf
        ):
            raise ValueError(
                f"width must be a positive number such as 0.25, 0.5 or 1.0, got {width!r}"
            )
        if fc_dim is None:
            fc_dim = round_width(_FC_DIM, width)
        elif int(fc_dim) < 1:
            raise ValueError(f"fc_dim must be a positive int (e.g. 4096), got {fc_dim!r}")
        convs = tuple((round_width(c, width), k, s, p) for c, k, s, p in _CIFAR_CONVS)
        super().__init__(
            convs, pool_padding=1, input_size=32, fc_dim=fc_dim, sobel=sobel, with_fc=with_fc
        )
        self.width = float(width)

    def _size_hint(self) -> str:
        return "; for 224x224 images use AlexNet"

    def extra_repr(self) -> str:
        return f"width={self.width}, " + super().extra_repr()
