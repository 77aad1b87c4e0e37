"""Tests of recon_aux.models: shapes, probe points, width, errors, parameter counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recon_aux.models import AlexNetCIFAR, count_parameters


def _last_conv_run(model: nn.Module, x: torch.Tensor) -> nn.Conv2d:
    """The nn.Conv2d whose forward ran last (what the core library hooks)."""
    order: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return order[-1]


@pytest.mark.parametrize("width", [1.0, 0.5, 0.25])
def test_alexnet_cifar_shapes(width: float) -> None:
    torch.manual_seed(0)
    model = AlexNetCIFAR(width=width)
    c = [round(n * width) for n in (96, 256, 384, 384, 256)]
    fc = round(4096 * width)
    expected = {
        "conv1": (c[0], 16, 16),
        "conv2": (c[1], 8, 8),
        "conv3": (c[2], 4, 4),
        "conv4": (c[3], 4, 4),
        "conv5": (c[4], 4, 4),
        "fc6": (fc,),
        "fc7": (fc,),
    }
    assert model.conv_channels == tuple(c)
    assert model.probe_points == tuple(expected)
    x = torch.randn(4, 3, 32, 32)
    feats = model.forward_features(x, list(expected))
    assert list(feats) == list(expected)
    for name, shape in expected.items():
        assert tuple(feats[name].shape) == (4, *shape), name
        assert model.feature_shape(name) == shape
    out = model(x)
    assert out.shape == (4, fc) and model.out_dim == fc
    assert _last_conv_run(model, x) is model.last_conv is model.conv5[0]
    assert model.last_conv.out_channels == c[4]


def test_alexnet_cifar_param_counts() -> None:
    assert count_parameters(AlexNetCIFAR(width=1.0)) == 24_702_016
    assert count_parameters(AlexNetCIFAR(width=0.5)) == 6_180_384
    assert count_parameters(AlexNetCIFAR(width=0.25)) == 1_547_536
