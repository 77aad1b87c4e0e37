"""Network-In-Network backbone of AET's CIFAR experiments."""

from __future__ import annotations

import math

from torch import nn

from .base import Backbone

__all__ = ["NIN"]

_WIDTH = 192


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    # AET's BasicBlock: bias-free conv ("same" padding, stride 1), BatchNorm, ReLU.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=(kernel - 1) // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class NIN(Backbone):
    """Network-In-Network (NIN) with BatchNorm, the CIFAR backbone of AET.

    - AET: Zhang, Qi, Wang and Luo, "AET vs. AED: Unsupervised Representation Learning by
      Auto-Encoding Transformations rather than Data", CVPR 2019; code
      ``maple-research-lab/AET`` ``cifar/projective/NetworkInNetwork.py`` (commit 96ef428; the
      ``cifar/affine`` copy is the same network), built there as
      ``NetworkInNetwork(_num_stages=4, _use_avg_on_conv3=False)`` by ``Regressor`` in
      ``main.py``. AET took the network from RotNet (Gidaris et al., ICLR 2018).

    Blocks (each conv is a bias-free ``nn.Conv2d`` with "same" padding, then its own
    ``BatchNorm2d`` and ``ReLU``):

    - conv1: 5x5 192, 1x1 160, 1x1 96, max-pool 3/2 pad 1;
    - conv2: 5x5 192, 1x1 192, 1x1 192, avg-pool 3/2 pad 1;
    - conv3, conv4 (and further blocks if ``num_blocks > 4``): 3x3 192, 1x1 192, 1x1 192, no pool;
    - global average pooling -> ``(N, 192)``, the output of ``forward`` (AET's default output,
      which its ``Regressor`` concatenates for the two images of a pair).

    The last conv run in ``forward`` is the final 1x1 conv of the last block. Weight init as AET:
    convs ``N(0, 2 / (k*k*out_channels))``, BN weight 1 / bias 0.

    Deviations: none in the network. The transformation regressor (AET's ``Regressor.fc``) and the
    evaluation classifiers are not part of the backbone. Note that conv1 ends with 96 channels,
    not 192, as in the original.

    Probe points are block outputs (after the block's pooling, as AET's ``out_feat_keys``); shapes
    for a 32x32 input: conv1 (96, 16, 16), conv2 (192, 8, 8), conv3 (192, 8, 8),
    conv4 (192, 8, 8). AET's CIFAR classifiers read conv2.

    Parameters: 1,410,368 with 4 blocks (each extra block adds 406,656).

    Attributes:
        probe_points: ``("conv1", ..., "conv<num_blocks>")``.
        out_dim: 192.
        input_size: 32, used by :meth:`feature_shape` by default. The network is fully
            convolutional, so other sizes run too (feature maps scale accordingly).
        num_blocks: Number of blocks.
        last_conv: The last 1x1 conv of the last block.

    Args:
        num_blocks: Number of NIN blocks, at least 3 (AET: 4).

    Examples:
        >>> import torch
        >>> model = NIN()
        >>> x = torch.randn(8, 3, 32, 32)
        >>> model(x).shape
        torch.Size([8, 192])
        >>> model.forward_features(x, ["conv2"])["conv2"].shape
        torch.Size([8, 192, 8, 8])
    """

    _fixed_input_size = False
    _min_input_size = 1

    def __init__(self, num_blocks: int = 4) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 3:
            raise ValueError(f"num_blocks must be an int >= 3 (AET uses 4), got {num_blocks!r}")
        super().__init__()
        self.input_size = 32
        self.num_blocks = num_blocks
        self.conv1 = nn.Sequential(
            _conv_bn_relu(3, _WIDTH, 5),
            _conv_bn_relu(_WIDTH, 160, 1),
            _conv_bn_relu(160, 96, 1),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.conv2 = nn.Sequential(
            _conv_bn_relu(96, _WIDTH, 5),
            _conv_bn_relu(_WIDTH, _WIDTH, 1),
            _conv_bn_relu(_WIDTH, _WIDTH, 1),
            nn.AvgPool2d(3, stride=2, padding=1),
        )
        for i in range(3, num_blocks + 1):
            block = nn.Sequential(
                _conv_bn_relu(_WIDTH, _WIDTH, 3),
                _conv_bn_relu(_WIDTH, _WIDTH, 1),
                _conv_bn_relu(_WIDTH, _WIDTH, 1),
            )
            setattr(self, f"conv{i}", block)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.probe_points = tuple(f"conv{i}" for i in range(1, num_blocks + 1))
        self._stage_names = (*self.probe_points, "pool")
        self.out_dim = _WIDTH
        self._initialize_weights()

    def _initialize_weights(self) -> None:
        # AET's ``weight_initialization``.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def extra_repr(self) -> str:
        return f"num_blocks={self.num_blocks}, out_dim={self.out_dim}"
