"""ReconstructionHead: geometry for any feature map size, output encoding, documented sizes."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import recon_aux
from recon_aux import ReconstructionHead


@pytest.mark.parametrize("hw, out", [
    ((1, 1), (32, 32)), ((3, 3), (32, 32)), ((4, 4), (32, 32)), ((7, 7), (224, 224)),
    ((5, 3), (30, 20)), ((32, 32), (32, 32)),
])
def test_any_geometry(hw, out):
    head = ReconstructionHead(64, hw, out)
    y = head(torch.randn(2, 64, *hw))
    assert y.shape == (2, 3, *out)
    assert 0 <= y.min() and y.max() <= 1
    assert head(torch.randn(2, 64, *hw), out_size=(16, 16)).shape == (2, 3, 16, 16)


def test_output_in_normalised_encoding():
    """With mean/std the head's [0, 1] output is normalised as the pipeline's images are: the
    same weights without mean/std give the unnormalised output."""
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.1, 0.25]
    torch.manual_seed(0)
    head = ReconstructionHead(8, (4, 4), (16, 16), mean=mean, std=std, output_range=(0, 1))
    plain = ReconstructionHead(8, (4, 4), (16, 16), output_range=(0, 1))
    plain.load_state_dict(head.state_dict())  # mean/std are not in it: the only difference
    x = torch.randn(4, 8, 4, 4)
    y, unit = head.eval()(x), plain.eval()(x)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(y, (unit - m) / s)
    assert 0 <= unit.min() and unit.max() <= 1 and y.min() < 0


def test_wrong_feature_channels():
    head = ReconstructionHead(8, (4, 4), (16, 16))
    with pytest.raises(ValueError, match="N x 8 x h x w"):
        head(torch.randn(2, 9, 4, 4))


def params(head: nn.Module) -> float:
    return round(sum(p.numel() for p in head.parameters()) / 1e6, 2)


def test_documented_parameter_counts():
    """The table in ReconstructionHead's docstring."""
    from adapters.backbones import AlexNetCIFAR

    cases = []
    enc = AlexNetCIFAR(width=1.0)
    cases.append((enc, 32, (256, 4, 4), 3, params))
    r18 = torchvision.models.resnet18()
    r18.fc = nn.Identity()
    cases.append((r18, 32, (512, 1, 1), 5, params))
    cases.append((r18, 224, (512, 7, 7), 5, params))
    doc = ReconstructionHead.__doc__
    for model, size, fmap, stages, count in cases:
        aux = recon_aux.attach(model, input_shape=(3, size, size), lpips_weight=0)
        assert (aux.head.in_channels, *aux.head.in_size) == fmap
        assert aux.head.stages == stages
        assert f"{count(aux.head):.2f} M" in doc, (fmap, count(aux.head))
        aux.remove()


def test_multi_level_head_shapes_and_errors():
    head = ReconstructionHead([64, 128], (8, 8), (32, 32))
    assert head.levels == 2 and head.multi_level and head.channels[0] == 32  # 128 // 4
    out = head([torch.randn(2, 64, 8, 8), torch.randn(2, 128, 4, 4)])
    assert out.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="expects 2 feature maps"):
        head(torch.randn(2, 64, 8, 8))
    with pytest.raises(ValueError, match="channels \\[64, 128\\]"):
        head([torch.randn(2, 64, 8, 8), torch.randn(2, 64, 4, 4)])
    with pytest.raises(ValueError, match="empty"):
        ReconstructionHead([], (8, 8), (32, 32))


def _decode(head: ReconstructionHead, x: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
    """The head's output and, per conv stage, whether its output was channels-last."""
    seen: list[bool] = []
    hooks = [b[0].register_forward_hook(
        lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)
                                    and not o.is_contiguous()))
        for b in head.blocks]
    try:
        return head(x), seen
    finally:
        for h in hooks:
            h.remove()


def _errors(head: ReconstructionHead, x: torch.Tensor, ref: tuple) -> tuple[float, float, list]:
    """Largest error of the head's output and input gradient against ``ref``, each as a share
    of the reference's largest magnitude, and the stages' formats."""
    x = x.detach().requires_grad_(True)
    y, fmt = _decode(head, x)
    g, = torch.autograd.grad(y.square().sum(), x)
    (yr, gr) = ref
    return (float((y.detach().double().cpu() - yr).abs().max() / yr.abs().max()),
            float((g.double().cpu() - gr).abs().max() / gr.abs().max()), fmt)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_channels_last_decoding_is_the_same_function(device, monkeypatch):
    torch.manual_seed(0)
    head = ReconstructionHead(64, (4, 4), (32, 32)).to(device)
    x = torch.randn(4, 64, 4, 4, device=device)
    ref_head = copy.deepcopy(head).to("cpu", torch.float64)
    ref_head.channels_last = False
    xr = x.detach().cpu().double().requires_grad_(True)
    yr = ref_head(xr)
    ref = (yr.detach(), torch.autograd.grad(yr.square().sum(), xr)[0])
    stages = len(head.blocks)
    if device == "cpu":
        default = _decode(head, x)[0]
        for channels_last in (False, True):
            head.channels_last = channels_last
            y_err, g_err, fmt = _errors(head, x, ref)
            assert fmt == [channels_last] * stages and y_err < 1e-5 and g_err < 1e-5
        head.channels_last = False  # the default leaves CPU runs bit for bit as they were
        assert torch.equal(_decode(head, x)[0], default)
        return
    # CUDA: with TF32 (cuDNN's default) both formats round like TF32; measured on an H200
    # (torch 2.11): 2e-4 / 2e-2 (output / input gradient) in both. With TF32 off NCHW is float32
    # (6e-7 of the gradient) and NHWC is not (8e-3 of it), so strict float32 defaults to NCHW.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    for channels_last in (None, True, False):
        head.channels_last = channels_last
        y_err, g_err, fmt = _errors(head, x, ref)
        assert fmt == [channels_last is not False] * stages and y_err < 5e-3 and g_err < 5e-2
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    head.channels_last = None
    y_err, g_err, fmt = _errors(head, x, ref)
    assert fmt == [False] * stages and y_err < 1e-5 and g_err < 1e-5
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert _decode(head, x)[1] == [True] * stages  # reduced precision anyway: NHWC
    head.channels_last = True
    y_err, g_err, fmt = _errors(head, x, ref)
    assert fmt == [True] * stages and y_err < 1e-5 and g_err < 5e-2


def test_tf32_reading_follows_the_legacy_and_the_new_settings(monkeypatch):
    from recon_aux.head import cudnn_conv_tf32
    cudnn = torch.backends.cudnn
    if not hasattr(getattr(cudnn, "conv", None), "fp32_precision"):  # torch < 2.9
        monkeypatch.setattr(cudnn, "allow_tf32", False)
        assert cudnn_conv_tf32() is False
        return
    saved = (torch.backends.fp32_precision, cudnn.fp32_precision, cudnn.conv.fp32_precision)
    try:
        for conv, expected in (("tf32", True), ("ieee", False)):
            cudnn.conv.fp32_precision = conv
            assert cudnn_conv_tf32() is expected
        cudnn.conv.fp32_precision = "none"  # defers to the levels above
        cudnn.fp32_precision = "tf32"
        assert cudnn_conv_tf32() is True
        cudnn.fp32_precision = "none"
        assert cudnn_conv_tf32() is (torch.backends.fp32_precision == "tf32")
        cudnn.allow_tf32 = False  # the legacy flag sets the new ones
        assert cudnn_conv_tf32() is False
    finally:
        torch.backends.fp32_precision, cudnn.fp32_precision, cudnn.conv.fp32_precision = saved


def test_an_out_scale_the_geometry_cannot_take_is_refused_not_lowered():
    """4 asks for two sub-pixel doublings; a 16x16 map to 32x32 needs one. Lowering it silently
    would record 4 for a head that ran 2."""
    with pytest.raises(ValueError, match=r"out_scale=4 \(head_out_scale\) needs 2 doublings from "
                                         r"the 16x16 map to the 32x32 image, which takes 1; use "
                                         r"head_out_scale=2"):
        ReconstructionHead(64, (16, 16), (32, 32), out_scale=4)
    assert ReconstructionHead(64, (4, 4), (32, 32), out_scale=4).out_scale == 4
    assert ReconstructionHead(64, (32, 32), (32, 32)).out_scale == 1  # the default adapts
