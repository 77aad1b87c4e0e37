"""Tests of adapters.backbones: shapes, probe points, width, errors, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from adapters.backbones import (
    BACKBONES,
    NIN,
    AlexNet,
    AlexNetCIFAR,
    Backbone,
    SobelFilter,
    build_backbone,
    count_parameters,
)


def _conv_run_order(model: nn.Module, run) -> list[nn.Conv2d]:
    """The nn.Conv2d modules in the order their forward ran during ``run()``."""
    order: list[nn.Module] = []
    handles = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return order


def _check_model(model: Backbone, x: torch.Tensor, expected: dict[str, tuple[int, ...]]) -> None:
    """Shapes of forward_features / feature_shape / forward, and the last conv run."""
    assert model.probe_points == tuple(expected)
    n = x.shape[0]
    feats: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        order = _conv_run_order(
            model, lambda: feats.update(model.forward_features(x, list(expected)))
        )
        assert order[-1] is model.last_conv
        assert list(feats) == list(expected)
        for name, shape in expected.items():
            assert tuple(feats[name].shape) == (n, *shape), name
            assert model.feature_shape(name) == shape, name
            assert model.feature_dim(name) == math.prod(shape), name
        out: list[torch.Tensor] = []
        order = _conv_run_order(model, lambda: out.append(model(x)))
        assert order[-1] is model.last_conv
    assert out[0].shape == (n, model.out_dim)
    assert model.feature_shape("out") == (model.out_dim,)
    if not model.training and "fc7" in feats:  # forward() is the fc7 output
        assert torch.equal(out[0], feats["fc7"])


# ---------------------------------------------------------------- AlexNetCIFAR
@pytest.mark.parametrize("width", [1.0, 0.5, 0.25])
def test_alexnet_cifar_shapes_and_width(width: float) -> None:
    torch.manual_seed(0)
    model = AlexNetCIFAR(width=width)
    c = [round(n * width) for n in (96, 256, 384, 384, 256)]
    fc = round(4096 * width)
    assert model.conv_channels == tuple(c)
    assert [getattr(model, f"conv{i}")[0].out_channels for i in range(1, 6)] == c
    assert model.fc6[1].in_features == c[4] * 2 * 2
    assert model.out_dim == fc
    expected = {
        "conv1": (c[0], 16, 16),
        "conv2": (c[1], 8, 8),
        "conv3": (c[2], 4, 4),
        "conv4": (c[3], 4, 4),
        "conv5": (c[4], 4, 4),
        "fc6": (fc,),
        "fc7": (fc,),
    }
    _check_model(model, torch.randn(4, 3, 32, 32), expected)
    assert model.last_conv is model.conv5[0]
    # BN and ReLU are separate modules after the last conv.
    assert isinstance(model.conv5[1], nn.BatchNorm2d) and isinstance(model.conv5[2], nn.ReLU)


def test_alexnet_cifar_param_counts_and_options() -> None:
    assert count_parameters(AlexNetCIFAR(width=1.0)) == 24_702_016
    assert count_parameters(AlexNetCIFAR(width=0.5)) == 6_180_384
    assert count_parameters(AlexNetCIFAR(width=0.25)) == 1_547_536
    odd = AlexNetCIFAR(width=0.3)  # rounded to the nearest int
    assert odd.conv_channels == (29, 77, 115, 115, 77) and odd.out_dim == 1229
    wide_fc = AlexNetCIFAR(width=0.5, fc_dim=4096)  # SeLa keeps 4096 units
    assert wide_fc.out_dim == 4096 and wide_fc.fc6[1].in_features == 128 * 4
    conv_only = AlexNetCIFAR(width=0.5, with_fc=False)
    assert conv_only.probe_points == ("conv1", "conv2", "conv3", "conv4", "conv5")
    assert conv_only.out_dim == 128 * 2 * 2
    assert conv_only(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    with pytest.raises(ValueError, match="no probe point.*'fc6'.*valid names: conv1"):
        conv_only.forward_features(torch.randn(2, 3, 32, 32), ["fc6"])
    for bad in (0, -0.5, float("nan"), True):
        with pytest.raises(ValueError, match="width must be a positive number"):
            AlexNetCIFAR(width=bad)


def test_alexnet_cifar_trains() -> None:
    torch.manual_seed(0)
    model = AlexNetCIFAR(width=0.25).train()
    loss = model(torch.randn(8, 3, 32, 32)).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- AlexNet (224)
def test_alexnet_imagenet_shapes_and_params() -> None:
    torch.manual_seed(0)
    model = AlexNet().eval()
    assert count_parameters(model) == 58_284_096
    expected = {
        "conv1": (96, 55, 55),
        "conv2": (256, 27, 27),
        "conv3": (384, 13, 13),
        "conv4": (384, 13, 13),
        "conv5": (256, 13, 13),
        "fc6": (4096,),
        "fc7": (4096,),
    }
    x = torch.randn(2, 3, 224, 224)
    _check_model(model, x, expected)
    c1 = model.conv1[0]
    assert (c1.in_channels, c1.kernel_size, c1.stride, c1.padding) == (3, (11, 11), (4, 4), (2, 2))
    assert model.fc6[1].in_features == 256 * 6 * 6
    assert isinstance(model.fc6[0], nn.Dropout) and model.fc6[0].p == 0.5


def test_alexnet_sobel_and_conv_only() -> None:
    model = AlexNet(sobel=True, with_fc=False).eval()
    assert isinstance(model.sobel, SobelFilter) and model.conv1[0].in_channels == 2
    assert not any(p.requires_grad for p in model.sobel.parameters())
    assert count_parameters(model) - count_parameters(model, trainable_only=True) == 24
    assert count_parameters(model) == 3_749_952 - 3 * 96 * 121 + 2 * 96 * 121 + 24
    assert count_parameters(AlexNet(sobel=True)) == 58_272_504
    assert model.out_dim == 9216 and model.probe_points[-1] == "conv5"
    # The Sobel convs run first; conv5 is still the last conv.
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        order = _conv_run_order(model, lambda: model(x))
    assert order[:2] == list(model.sobel) and order[-1] is model.last_conv is model.conv5[0]
    # Sobel gradients of a constant image vanish away from the zero-padded border.
    grads = model.sobel(torch.full((1, 3, 8, 8), 0.7))
    assert grads.shape == (1, 2, 8, 8) and grads[..., 1:-1, 1:-1].abs().max() < 1e-6


def test_alexnet_init_as_originals() -> None:
    torch.manual_seed(0)
    model = AlexNetCIFAR(width=1.0)
    conv = model.conv2[0]
    fan_out = 5 * 5 * 256
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / fan_out), rel=0.02)
    assert model.fc7[1].weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert conv.bias.abs().sum() == 0 and model.fc6[1].bias.abs().sum() == 0
    assert torch.all(model.conv2[1].weight == 1) and torch.all(model.conv2[1].bias == 0)


# ---------------------------------------------------------------- NIN
def test_nin_shapes_params_and_init() -> None:
    torch.manual_seed(0)
    model = NIN().eval()
    assert count_parameters(model) == 1_410_368 and model.out_dim == 192
    expected = {
        "conv1": (96, 16, 16),
        "conv2": (192, 8, 8),
        "conv3": (192, 8, 8),
        "conv4": (192, 8, 8),
    }
    _check_model(model, torch.randn(2, 3, 32, 32), expected)
    assert model.last_conv is model.conv4[2][0] and model.last_conv.kernel_size == (1, 1)
    assert [model.conv1[i][0].out_channels for i in range(3)] == [192, 160, 96]
    assert isinstance(model.conv1[3], nn.MaxPool2d) and isinstance(model.conv2[3], nn.AvgPool2d)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    conv = model.conv2[0][0]
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (25 * 192)), rel=0.02)
    # Fully convolutional: other sizes run, with matching feature_shape.
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 40, 40), ["conv4"])["conv4"].shape == (
            1,
            *model.feature_shape("conv4", input_size=40),
        )
    assert model.feature_shape("conv4", input_size=40) == (192, 10, 10)


def test_nin_num_blocks() -> None:
    three, five = NIN(num_blocks=3), NIN(num_blocks=5)
    assert three.probe_points == ("conv1", "conv2", "conv3")
    assert five.probe_points[-1] == "conv5" and five.last_conv is five.conv5[2][0]
    assert count_parameters(five) - count_parameters(NIN()) == 406_656
    with pytest.raises(ValueError, match="num_blocks must be an int >= 3"):
        NIN(num_blocks=2)


# ---------------------------------------------------------------- forward_features
def test_forward_features_returns_exactly_the_requested_layers() -> None:
    model = AlexNetCIFAR(width=0.25).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x, ["fc7", "conv2", "fc7"])  # order kept, duplicate dropped
    assert list(feats) == ["fc7", "conv2"]
    assert list(model.forward_features(x, "conv3")) == ["conv3"]
    # The pass stops at the deepest requested layer: later convs do not run.
    order = _conv_run_order(model, lambda: model.forward_features(x, ["conv1"]))
    assert order == [model.conv1[0]]
    with pytest.raises(ValueError, match="layers is empty"):
        model.forward_features(x, [])
    with pytest.raises(ValueError, match=r"no probe point\(s\) 'conv6'.*valid names: conv1, conv2"):
        model.forward_features(x, ["conv1", "conv6"])
    with pytest.raises(ValueError, match="valid names"):
        model.feature_shape("pool5")


# ---------------------------------------------------------------- registry
def test_build_backbone() -> None:
    assert set(BACKBONES) == {"alexnet", "alexnet_cifar", "nin", "resnet18_cifar", "vit_cifar"}
    model = build_backbone("alexnet_cifar", width=0.25)
    assert isinstance(model, AlexNetCIFAR) and model.conv_channels[0] == 24
    assert isinstance(build_backbone("NIN", num_blocks=3), NIN)
    assert isinstance(build_backbone("alexnet", with_fc=False), AlexNet)
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'; valid names: alexnet, "):
        build_backbone("resnet18")
    with pytest.raises(TypeError, match="takes no argument.*width.*it takes: num_blocks"):
        build_backbone("nin", width=0.5)


# ---------------------------------------------------------------- input errors
@pytest.mark.parametrize(
    ("model", "x", "message"),
    [
        (AlexNetCIFAR(width=0.25), torch.randn(3, 32, 32), r"4-D batch.*x\.unsqueeze\(0\)"),
        (AlexNetCIFAR(width=0.25), torch.randn(2, 1, 32, 32), "expects 3 input channels"),
        (AlexNetCIFAR(width=0.25), torch.randn(2, 32, 32, 3), "expects 3 input channels"),
        (AlexNetCIFAR(width=0.25), torch.randn(2, 3, 224, 224), "expects 32x32 inputs.*AlexNet"),
        (AlexNet(with_fc=False), torch.randn(2, 3, 32, 32), "expects 224x224 inputs.*AlexNetCIFAR"),
        (NIN(), torch.randn(32, 32), "4-D batch"),
        (NIN(), torch.randn(2, 4, 32, 32), "expects 3 input channels"),
    ],
)
def test_wrong_input_gives_clear_error(model: Backbone, x: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model(x)
    with pytest.raises(ValueError, match=message):
        model.forward_features(x, [model.probe_points[0]])


def test_feature_shape_checks_size() -> None:
    with pytest.raises(ValueError, match="expects 32x32 inputs"):
        AlexNetCIFAR(width=0.25).feature_dim("conv5", input_size=64)


def test_resnet18_cifar_shapes_params_and_tap():
    from adapters.backbones import ResNet18CIFAR, build_backbone

    full = ResNet18CIFAR()
    assert round(count_parameters(full) / 1e6, 1) == 11.2  # torchvision resnet18 minus fc
    model = build_backbone("resnet18_cifar", width=0.25)
    assert model.widths == (16, 32, 64, 128) and model.out_dim == 128
    x = torch.rand(2, 3, 32, 32)
    feats = model.forward_features(x, ["layer4", "pool"])
    assert feats["layer4"].shape == (2, 128, 4, 4) == (2, *model.feature_shape("layer4"))
    assert feats["pool"].shape == (2, 128) and model(x).shape == (2, 128)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 128)  # multi-crop sizes
    assert [n for n, m in model.named_modules() if m is model.last_conv] == ["layer4.1.conv2"]
