"""ReconAuxConfig and attach(): bad input gets an error that names the problem and the fix."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

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


def test_a_config_file_that_does_not_exist_says_what_else_is_accepted(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml does not exist; give the path of a YAML "
                                          "file, a dict or a ReconAuxConfig"):
        ReconAuxConfig.from_any(tmp_path / "nope.yaml")


NAN, INF = float("nan"), float("inf")

# Each refused value: (overrides, what the error must say). The message names field and value.
REFUSED = [
    ({"weight": NAN}, r"weight=nan is not finite\. Use a finite number >= 0"),
    ({"weight": INF}, r"weight=inf is not finite"),
    ({"l2_weight": NAN}, r"l2_weight=nan is not finite"),
    ({"lpips_weight": -INF}, r"lpips_weight=-inf is not finite"),
    ({"l2_weight": -0.5}, r"l2_weight=-0\.5 must be >= 0"),
    ({"lpips_weight": -1}, r"lpips_weight=-1\.0 must be >= 0"),
    ({"range_tolerance": -0.01}, r"range_tolerance=-0\.01 must be >= 0.*check_inputs=False"),
    ({"range_tolerance": NAN}, r"range_tolerance=nan is not finite"),
    ({"range_tolerance": INF}, r"range_tolerance=inf is not finite"),
    ({"input_range": (0, INF)}, r"input_range=\(0\.0, inf\) holds inf; each value must be finite"),
    ({"input_range": (NAN, 1)}, r"input_range=\(nan, 1\.0\) holds nan"),
    ({"input_range": (1, 0)}, r"input_range=\(1\.0, 0\.0\) must be \(low, high\) with high > low"),
    ({"input_range": (1, 1)}, r"input_range=\(1\.0, 1\.0\) must be \(low, high\)"),
    ({"max_pending": 0}, r"max_pending=0 must be >= 1"),
    ({"max_pending": -3}, r"max_pending=-3 must be >= 1"),
    ({"head_width": 0}, r"head_width=0 must be >= 1.*or None"),
    ({"head_width": -8}, r"head_width=-8 must be >= 1"),
    ({"head_min_width": 0}, r"head_min_width=0 must be >= 1"),
    ({"head_out_scale": 3}, r"head_out_scale=3 is not one of \(1, 2, 4\)"),
    ({"resize_to": 0}, r"resize_to=0 must be >= 1"),
    ({"resize_to": -64}, r"resize_to=-64 must be >= 1"),
    ({"resize_to": [64, 0]}, r"resize_to=\(64, 0\) holds 0; each value must be >= 1"),
    ({"resize_to": 16}, r"resize_to=16 is smaller than the 31x31 pixels LPIPS-alex needs"),
    ({"resize_to": 8, "net": "vgg"}, r"resize_to=8 is smaller than the 16x16 pixels LPIPS-vgg"),
    ({"mean": [0.5] * 3, "std": [0.5]}, r"std=\(0\.5,\) has 1 value\(s\), not 3"),
    ({"mean": [0.5, 0.5], "std": [0.5] * 3}, r"mean=\(0\.5, 0\.5\) has 2 value\(s\), not 3"),
    ({"mean": [0.5], "std": [0.5]}, r"mean=\(0\.5,\) has 1 value\(s\), not 3.*RGB"),
    ({"mean": [0.5] * 4, "std": [0.5] * 4}, r"mean=.* has 4 value\(s\), not 3"),
    ({"mean": [0.5, NAN, 0.5], "std": [0.5] * 3}, r"mean=\(0\.5, nan, 0\.5\) holds nan"),
    ({"mean": [0.5] * 3, "std": [0.5, 0, 0.5]}, r"std=\(0\.5, 0\.0, 0\.5\) holds 0\.0; each value "
                                                r"must be > 0"),
    ({"mean": [0.5] * 3, "std": [0.5, INF, 0.5]}, r"std=\(0\.5, inf, 0\.5\) holds inf"),
    ({"std": [0.5] * 3}, r"give both mean and std"),
    ({"lr": -0.1}, r"lr=-0\.1 must be >= 0.*ascend"),
    ({"lr": NAN}, r"lr=nan is not finite"),
    ({"weight_decay": -1e-4}, r"weight_decay=-0\.0001 must be >= 0"),
    ({"weight_decay": INF}, r"weight_decay=inf is not finite"),
]


@pytest.mark.parametrize("kwargs, match", REFUSED, ids=[repr(k) for k, _ in REFUSED])
def test_refused_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ReconAuxConfig.from_any(None, **kwargs)


@pytest.mark.parametrize("kwargs, match", REFUSED, ids=[repr(k) for k, _ in REFUSED])
def test_refused_at_attach_before_any_work(tiny_alexnet, kwargs, match):
    opt = torch.optim.SGD(tiny_alexnet.parameters(), lr=0.1)
    hooks = len(tiny_alexnet._forward_hooks), len(tiny_alexnet._forward_pre_hooks)
    with pytest.raises(ConfigError, match=match):
        recon_aux.attach(tiny_alexnet, opt, input_shape=(3, 32, 32), **kwargs)
    assert (len(tiny_alexnet._forward_hooks), len(tiny_alexnet._forward_pre_hooks)) == hooks
    assert len(opt.param_groups) == 1
    recon_aux.attach(tiny_alexnet, opt, lpips_weight=0)  # nothing was left attached


def test_non_finite_yaml_values_refused(tmp_path):
    for text, match in [("weight: .nan\n", "weight=nan is not finite"),
                        ("input_range: [0, .inf]\n", r"input_range=\(0\.0, inf\)"),
                        ("lr: -.inf\n", "lr=-inf is not finite")]:
        path = tmp_path / "recon.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            ReconAuxConfig.from_any(path)


def test_boundary_values_accepted():
    import numpy as np

    cfg = ReconAuxConfig(weight=0, range_tolerance=0, lr=0, weight_decay=0, max_pending=1,
                         head_width=1, head_min_width=1, resize_to=(31, 64), lpips_weight=1,
                         input_range=(-1, 1), mean=np.array([0.5, 0.5, 0.5]).tolist(),
                         std=(0.25, 0.25, 0.25))
    assert cfg.resize_to == (31, 64) and cfg.std == (0.25,) * 3
    assert ReconAuxConfig(lpips_weight=0, resize_to=8).resize_to == 8  # no LPIPS: no minimum
    numpy_cfg = ReconAuxConfig(weight=np.float32(0.5), max_pending=np.int64(4))
    assert (type(numpy_cfg.weight), type(numpy_cfg.max_pending)) == (float, int)
    with pytest.raises(ConfigError, match="'max_pending' expects"):
        ReconAuxConfig(max_pending=True)


def test_assignment_is_checked():
    cfg = ReconAuxConfig()
    cfg.weight = 0.25  # e.g. a weight schedule
    assert cfg.weight == 0.25
    with pytest.raises(ConfigError, match="weight=nan is not finite"):
        cfg.weight = NAN
    with pytest.raises(ConfigError, match="lr=-1.0 must be >= 0"):
        cfg.lr = -1
    assert (cfg.weight, cfg.lr) == (0.25, None)
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['wieght'\]. Valid keys"):
        cfg.wieght = 2  # a typo is not a new attribute
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['wieght'\]. Valid keys"):
        ReconAuxConfig(wieght=2)  # nor a keyword of the constructor (its TypeError named none)
    cfg.lpips_weight = 0
    with pytest.raises(ConfigError, match="both 0: the objective is empty"):
        cfg.l2_weight = 0  # the rules that relate two fields hold for assignments too
    assert (cfg.l2_weight, cfg.lpips_weight) == (1.0, 0.0)


def test_attach_fixes_the_fields_it_built_from(tiny_alexnet):
    given = ReconAuxConfig(net="alex")
    aux = recon_aux.attach(tiny_alexnet, config=given)
    aux.config.weight = 0.5  # read at every loss call: live
    aux.config.check_inputs = False
    for name, value in (("net", "vgg"), ("input_range", (-1, 1)), ("head_width", 8),
                        ("lpips_weight", 0.0)):
        with pytest.raises(ConfigError, match=f"{name} is fixed once attach.*weight, "
                                              f"check_inputs change live.*attach again"):
            setattr(aux.config, name, value)
    assert (aux.config.net, aux.perceptual.net, aux.config.weight) == ("alex", "alex", 0.5)
    given.net = "vgg"  # the caller's config is not the one attach fixed
    assert aux.config.net == "alex"


def test_every_numeric_field_declares_its_range():
    import dataclasses

    for f in dataclasses.fields(ReconAuxConfig):
        if any(t in str(f.type) for t in ("float", "int")):
            assert "allowed" in f.metadata, f"{f.name} declares no Allowed values"


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


@pytest.mark.parametrize("images, err, match", [
    (torch.rand(2, 3, 32, 32) * 255, RangeError, "target images span .* outside the declared"),
    (torch.full((2, 3, 32, 32), float("nan")), NonFiniteLossError,
     "target images contains NaN.*Check the data pipeline"),
    (torch.rand(2, 3, 16, 16), ValueError, "needs images of at least 31x31 pixels.*resize_to"),
    (torch.rand(0, 3, 32, 32), ValueError, "empty batch"),
])
def test_bad_first_batch_is_refused_before_the_head_is_built(tiny_alexnet, images, err, match):
    """The first loss builds the head from its batch and adds it to the optimizer: a batch that
    cannot be used is refused before that."""
    opt = torch.optim.SGD(tiny_alexnet.parameters(), lr=0.1)
    aux = recon_aux.attach(tiny_alexnet, opt)
    if images.shape[0] and images.shape[-1] == 32:  # the AlexNet-CIFAR's input size
        tiny_alexnet(images)
    with pytest.raises(err, match=match):
        aux.loss(images)
    assert aux.head is None and len(opt.param_groups) == 1 and aux.calls == 0


def test_non_finite_images_later_blame_the_data_not_training(tiny_alexnet):
    aux = recon_aux.attach(tiny_alexnet)
    x = torch.rand(2, 3, 32, 32)
    tiny_alexnet(x)
    aux.loss(x)
    x[0, 0, 0, 0] = float("inf")
    tiny_alexnet(x)
    with pytest.raises(NonFiniteLossError, match="target images contains NaN or Inf .*Check the "
                                                 "data pipeline") as caught:
        aux.loss(x)
    assert "diverged" not in str(caught.value)


def test_a_float64_encoder_is_refused_with_the_fix(tiny_alexnet):
    tiny_alexnet.double()
    aux = recon_aux.attach(tiny_alexnet)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    tiny_alexnet(x)
    with pytest.raises(TypeError, match=r"gave a torch.float64 map; the head and the loss run in "
                                        r"float32. Keep the encoder in float32 \(model.float"):
        aux.loss(x)
    assert aux.head is None


def test_reconstruct_after_remove_says_so(tiny_alexnet):
    aux = recon_aux.attach(tiny_alexnet)
    x = torch.rand(2, 3, 32, 32)
    tiny_alexnet(x)
    aux.loss(x)
    aux.remove()
    with pytest.raises(RuntimeError, match="this ReconAux was removed"):
        aux.reconstruct(x)


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


class _HostReads(TorchFunctionMode):
    """Records every read of a tensor's value by the host (a sync on a GPU)."""

    READS = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_checks_read_the_device_once_per_call_and_follow_the_knob(tiny_alexnet):
    aux = recon_aux.attach(tiny_alexnet)
    x = torch.rand(2, 3, 32, 32)
    tiny_alexnet(x)
    with _HostReads() as mode:
        aux.loss(x)  # builds the head, after reading the images' range once first
    assert mode.reads == ["tolist", "tolist"]
    tiny_alexnet(x)
    with _HostReads() as mode:
        aux.loss(x)
    assert mode.reads == ["tolist"]  # the range of both images and the loss's finiteness
    aux.config.check_inputs = False  # live: both checks off, no read at all
    tiny_alexnet(255 * x)
    with _HostReads() as mode:
        aux.loss(255 * x)  # out of the declared range, unchecked as asked
    assert mode.reads == []
    aux.config.check_inputs = True
    tiny_alexnet(255 * x)
    with pytest.raises(RangeError, match="outside the declared"):
        aux.loss(255 * x)


def test_a_checkpoint_of_another_head_names_the_settings_that_differ(tiny_alexnet):
    x = torch.rand(2, 3, 32, 32)
    saved = recon_aux.attach(tiny_alexnet, head_width=16)
    tiny_alexnet(x)
    saved.loss(x)
    state = saved.state_dict()
    saved.remove()
    other = recon_aux.attach(tiny_alexnet, head_norm="group")
    with pytest.raises(ValueError, match=r"\(norm: 'batch' in the checkpoint, 'group' here; "
                                         r"width: 16 in the checkpoint, None here\); use the same"):
        other.load_state_dict(state)


def test_a_layer_that_returns_a_dict_is_refused_with_the_fix():
    class Packs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, 2, 1)

        def forward(self, x):
            return {"features": self.conv(x)}

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = Packs()

        def forward(self, x):
            return self.block(x)["features"].mean((2, 3))

    net = Net()
    aux = recon_aux.attach(net, layer="block")
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"'block' returned dict; .*attach\(\.\.\., layer=NAME\)"):
        net(x)
        aux.loss(x)


def test_an_optimizer_without_the_encoders_parameters_is_warned_about(tiny_alexnet):
    other = nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="holds none of this TinyAlexNet's trainable parameters"):
        recon_aux.attach(tiny_alexnet, torch.optim.SGD(other.parameters(), lr=0.1)).remove()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the encoder's own optimizer: nothing to say
        recon_aux.attach(tiny_alexnet, torch.optim.SGD(tiny_alexnet.parameters(), lr=0.1))


def test_yaml_with_a_key_written_twice_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("weight: 0.5\nnet: alex\nweight: 2.0\n")
    with pytest.raises(ConfigError, match=r"c.yaml is not valid YAML: .*key 'weight' is written "
                                          r"twice in one mapping \(first on line 1\); YAML would "
                                          r"keep the last silently"):
        ReconAuxConfig.from_any(path)
    assert recon_aux.config.safe_load("a: 1\nb: {c: 2}\n") == {"a": 1, "b": {"c": 2}}
    assert recon_aux.config.safe_load("base: &b {x: 1}\nuse: {<<: *b, x: 2}\n")["use"] == {"x": 2}


def test_a_number_yaml_read_as_text_gets_the_fix(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("weight: 5e-1\n")
    with pytest.raises(ConfigError, match=r"got '5e-1' \(str\). YAML reads '5e-1' as text; write "
                                          r"5.0e-1 \(a dot and a signed exponent\)"):
        ReconAuxConfig.from_any(path)
    path.write_text("weight: 5.0e-1\n")
    assert ReconAuxConfig.from_any(path).weight == 0.5
