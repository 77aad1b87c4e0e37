"""ReconAuxConfig and attach(): bad input gets an error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import recon_aux
from recon_aux import ConfigError, NonFiniteLossError, PairingError, RangeError, ReconAuxConfig


def test_config_sources(tmp_path):
    path = tmp_path / "recon.yaml"
    path.write_text("weight: 0.5\nnet: vgg\ninput_range: [-1, 1]\nresize_to: 64\n")
    cfg = ReconAuxConfig.from_any(path, l2_weight=2)
    assert (cfg.weight, cfg.net, cfg.input_range, cfg.resize_to, cfg.l2_weight) == (
        0.5, "vgg", (-1.0, 1.0), 64, 2.0)
    assert ReconAuxConfig.from_any({"weight": 1}).weight == 1.0
    assert ReconAuxConfig.from_any(cfg) == cfg
    assert ReconAuxConfig.from_any(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs, match", [
    ({"wieght": 1.0}, r"unknown config key\(s\) \['wieght'\].*Valid keys: weight"),
    ({"weight": "big"}, "'weight' expects"),
    ({"check_inputs": 1}, "'check_inputs' expects"),
    ({"input_range": [0, 1, 2]}, "'input_range' expects"),
    ({"net": "squeeze"}, "net='squeeze' is not one of"),
    ({"l2_weight": 0, "lpips_weight": 0}, "both 0"),
    ({"mean": [0.5, 0.5, 0.5]}, "give both mean and std"),
    ({"weight": -1}, "must be >= 0"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ReconAuxConfig.from_any(None, **kwargs)


def test_yaml_must_be_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        ReconAuxConfig.from_any(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        ReconAuxConfig.from_any(tmp_path / "missing.yaml")


def test_model_without_conv():
    with pytest.raises(ValueError, match="has no nn.Conv2d"):
        recon_aux.attach(nn.Sequential(nn.Flatten(), nn.Linear(12, 4)))


def test_unknown_layer_lists_convs(tiny_alexnet):
    with pytest.raises(ValueError, match=r"features\.nope.*features\.0.*features\.13"):
        recon_aux.attach(tiny_alexnet, layer="features.nope")


def test_attach_twice(tiny_alexnet):
    aux = recon_aux.attach(tiny_alexnet)
    with pytest.raises(RuntimeError, match="already attached"):
        recon_aux.attach(tiny_alexnet)
    aux.remove()
    recon_aux.attach(tiny_alexnet)


def test_loss_without_forward(tiny_alexnet):
    aux = recon_aux.attach(tiny_alexnet)
    with pytest.raises(PairingError, match="No forward of the model has been seen yet"):
        aux.loss(torch.rand(2, 3, 32, 32))


class StopsEarly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

    def forward(self, x, stop: bool = False):
        y = self.conv1(x)
        return y.mean() if stop else self.conv2(y).mean()


def test_loss_after_forward_that_skips_the_layer():
    model = StopsEarly()
    aux = recon_aux.attach(model, layer="conv2")
    x = torch.rand(2, 3, 32, 32)
    model(x, stop=True)
    with pytest.raises(PairingError, match="without reaching the tapped layer 'conv2'"):
        aux.loss(x)


def test_loss_other_batch_size(tiny_alexnet):
    aux = recon_aux.attach(tiny_alexnet)
    tiny_alexnet(torch.rand(4, 3, 32, 32))
    with pytest.raises(PairingError, match=r"batch of 2 images.*batch sizes \[4\]"):
        aux.loss(torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize("images, err, match", [
    (torch.rand(3, 32, 32), ValueError, "float N x 3 x H x W"),
    (torch.rand(2, 1, 32, 32), ValueError, "1 channel"),
    (torch.rand(2, 3, 32, 32) * 255, RangeError, "outside the declared"),
])
def test_bad_images_in_loss(tiny_alexnet, images, err, match):
    aux = recon_aux.attach(tiny_alexnet)
    if images.dim() == 4 and images.shape[1] == 3:
        tiny_alexnet(images)
    with pytest.raises(err, match=match):
        aux.loss(images)


def test_non_finite_names_step_and_component(tiny_alexnet):
    opt = torch.optim.SGD(tiny_alexnet.parameters(), lr=0.1)
    aux = recon_aux.attach(tiny_alexnet, opt)
    x = torch.rand(2, 3, 32, 32)
    tiny_alexnet(x)
    aux.loss(x).backward()
    opt.step()
    with torch.no_grad():
        aux.head.out[0].bias.fill_(float("nan"))
    tiny_alexnet(x)
    with pytest.raises(NonFiniteLossError, match=r"aux.loss call 2 \(optimizer step 1\): "
                                                 "reconstruction contains NaN"):
        aux.loss(x)
