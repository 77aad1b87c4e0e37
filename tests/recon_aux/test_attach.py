"""The two lines on real model classes: capture, pairing, gradients, release, removal."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
import torchvision
from torch import nn

import recon_aux
from recon_aux import PairingError


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10)
    m.fc = nn.Identity()
    return m


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def base_loss(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()


@pytest.mark.parametrize("make", [resnet18, "tiny"])
def test_two_lines_train_head_and_reach_encoder(make, tiny_alexnet):
    model = tiny_alexnet if make == "tiny" else make()
    x = torch.rand(8, 3, 32, 32)
    # Without aux: conv1 gradient of the base loss alone.
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    model.zero_grad()
    base_loss(model(x)).backward()
    g_base = first_conv.weight.grad.clone()
    model.zero_grad()

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    aux = recon_aux.attach(model, opt)
    loss = base_loss(model(x))
    loss = loss + aux.loss(x)
    assert aux.head is not None and len(opt.param_groups) == 2
    head_before = [p.detach().clone() for p in aux.head.parameters()]
    opt.zero_grad()
    loss.backward()
    assert not torch.allclose(first_conv.weight.grad, g_base), "aux gradient did not reach conv1"
    opt.step()
    changed = [not torch.equal(a, p) for a, p in zip(head_before, aux.head.parameters())]
    assert all(changed), "the user's optimizer did not train every head parameter"
    assert set(aux.last) >= {"l2", "lpips", "total", "reconstruction"}
    assert aux.last["reconstruction"].shape == x.shape
    assert aux.last["lpips"] > 0 and aux.last["l2"] > 0


def test_layer_choice_resnet18_and_by_name(tiny_alexnet):
    model = resnet18()
    aux = recon_aux.attach(model)
    assert aux.layer_name is None  # chosen from execution order at the first forward
    model(torch.rand(2, 3, 32, 32))
    assert aux.layer_name == "layer4.1.conv2"  # the last residual branch conv (recon_aux.layers)
    aux.remove()
    aux = recon_aux.attach(tiny_alexnet, layer="features.4")
    assert aux.layer_name == "features.4"
    x = torch.rand(4, 3, 32, 32)
    tiny_alexnet(x)
    aux.loss(x)
    assert aux.head.in_channels == 32 and aux.head.in_size == (8, 8)


class ReversedRegistration(nn.Module):
    """``late`` is registered first but runs last: execution order must win."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Conv2d(8, 12, 3, padding=1)
        self.early = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.late(torch.relu(self.early(x))).mean((2, 3))


def test_last_conv_is_found_by_execution_order():
    model = ReversedRegistration()
    aux = recon_aux.attach(model)
    model(torch.rand(2, 3, 16, 16))
    assert aux.layer_name == "late"


@pytest.mark.parametrize("first", [0, 1])
def test_two_pending_views_pair_with_their_own_forward(tiny_alexnet, first):
    """Two forwards of the same shape are pending; each ``aux.loss`` takes the one that
    received its images, whatever the order of the calls (a pairing by shape alone, taking the
    oldest or the newest pending capture, gets one of the two orders wrong)."""
    aux = recon_aux.attach(tiny_alexnet, layer="features.7", lpips_weight=0.0)
    seen = []
    tiny_alexnet.features[7].register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    xs = [torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)]  # two tensors: paired by identity
    tiny_alexnet(xs[0])
    tiny_alexnet(xs[1])
    assert not torch.equal(seen[0], seen[1])
    for i in (first, 1 - first):
        assert torch.equal(aux.tap.take(xs[i]).feature.detach(), seen[i])


def test_two_views_per_step_and_normalised_copy(tiny_alexnet):
    model = tiny_alexnet
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    aux = recon_aux.attach(model, opt)
    x0, x1 = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    z0, z1 = model(x0), model(x1)
    loss = base_loss(z0 - z1) + aux.loss(x1) + aux.loss(x0)  # any order: paired by identity
    loss.backward()
    opt.step()
    # The model got a normalised copy: the one pending capture of that batch size is used.
    mean, std = torch.tensor([0.5] * 3), torch.tensor([0.25] * 3)
    aux2_model = resnet18()
    aux2 = recon_aux.attach(aux2_model, mean=mean.tolist(), std=std.tolist())
    x = torch.rand(3, 3, 32, 32)
    xn = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    aux2_model(xn)
    assert torch.isfinite(aux2.loss(xn))
    # Two pending forwards of the same size and a tensor neither received: ambiguous.
    aux2_model(xn.clone())
    aux2_model(xn.clone())
    with pytest.raises(PairingError, match="ambiguous"):
        aux2.loss(xn * 1)
    # xn itself went to the first forward, whose features were used: said so, and never paired
    # with another forward of the same size.
    with pytest.raises(PairingError, match="already used by an earlier aux.loss call"):
        aux2.loss(xn)


def test_no_grad_and_eval_forwards_are_not_captured(tiny_alexnet):
    model = tiny_alexnet
    aux = recon_aux.attach(model)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        model(x)
    assert aux.tap.pending == [] and aux.layer_name == "features.13"
    with pytest.raises(PairingError, match="torch.no_grad"):
        aux.loss(x)
    model.eval()
    model(x)
    with pytest.raises(PairingError, match="eval mode"):
        aux.loss(x)
    model.train()
    model(x)
    assert len(aux.tap.pending) == 1


def test_captures_are_released_no_leak(tiny_alexnet):
    model = tiny_alexnet
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    aux = recon_aux.attach(model, opt, lpips_weight=0.0)  # the capture logic is what is tested
    feats: list[weakref.ref] = []
    layer = dict(model.named_modules())["features.13"]
    layer.register_forward_hook(lambda m, i, o: feats.append(weakref.ref(o)))
    for step in range(200):
        x = torch.rand(2, 3, 32, 32)
        y = torch.rand(2, 3, 32, 32)
        out = model(x)
        model(y)  # a forward that never reaches aux.loss
        loss = base_loss(out) + aux.loss(x)
        if step % 3 == 0:  # sometimes no backward at all: optimizer.step still releases
            opt.zero_grad()
            loss.backward()
        opt.step()
        del out, loss, x, y
    gc.collect()
    alive = sum(r() is not None for r in feats)
    assert len(feats) == 400
    assert alive <= 2, f"{alive} feature maps still alive after 200 steps"
    assert aux.tap.pending == []


def test_release_without_optimizer_at_next_forward(tiny_alexnet):
    model = tiny_alexnet
    aux = recon_aux.attach(model, lpips_weight=0.0)  # no optimizer given
    for _ in range(30):
        x = torch.rand(2, 3, 32, 32)
        model(x)
        model(torch.rand(2, 3, 32, 32))  # never used
        aux.loss(x)
    assert len(aux.tap.pending) <= 1


def test_remove_restores_hooks(tiny_alexnet):
    model = resnet18()
    before = all_hooks(model)
    assert before == 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with recon_aux.attach(model, opt) as aux:
        assert all_hooks(model) > 0
        x = torch.rand(2, 3, 32, 32)
        model(x)
        aux.loss(x)
    assert all_hooks(model) == 0
    assert len(opt._optimizer_step_post_hooks) == 0
    # and a new attach is allowed once removed
    recon_aux.attach(model).remove()


def test_deepcopy_after_attach_is_not_captured(tiny_alexnet):
    model = tiny_alexnet
    aux = recon_aux.attach(model)
    teacher = copy.deepcopy(model)  # BYOL/MoCo/DINO momentum encoder
    x = torch.rand(2, 3, 32, 32)
    teacher(x)
    assert aux.tap.pending == []
    model(x)
    assert len(aux.tap.pending) == 1


def test_input_shape_builds_head_without_touching_model(tiny_alexnet):
    model = tiny_alexnet
    model.train()
    state = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    aux = recon_aux.attach(model, input_shape=(3, 32, 32))
    assert aux.head is not None and aux.layer_name == "features.13"
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(m.training for m in model.modules())
    assert aux.tap.pending == []
    params = list(aux.parameters())
    assert params and all(p.requires_grad for p in params)
    assert sum(p.numel() for p in params) == sum(p.numel() for p in aux.head.parameters())


def test_state_dict_round_trip_rebuilds_head(tiny_alexnet):
    model = tiny_alexnet
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    aux = recon_aux.attach(model, opt)
    x = torch.rand(4, 3, 32, 32)
    model(x)
    aux.loss(x).backward()
    opt.step()
    sd = aux.state_dict()
    assert not any("lpips" in k or "perceptual" in k for k in sd), "LPIPS leaked into state_dict"
    model2 = copy.deepcopy(model)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    aux2 = recon_aux.attach(model2, opt2)
    aux2.load_state_dict(sd)
    assert len(opt2.param_groups) == 2
    for a, b in zip(aux.head.state_dict().values(), aux2.head.state_dict().values()):
        assert torch.equal(a, b)
    opt2.load_state_dict(opt.state_dict())  # same group layout: optimizer state restores


def test_state_dict_of_another_layer_names_the_layer_to_attach(tiny_alexnet):
    """A state dict saved tapping one layer does not load into an objective tapping another,
    nor into a model without that layer; the error says what to attach with."""
    x = torch.rand(4, 3, 32, 32)
    aux = recon_aux.attach(tiny_alexnet, layer="features.7", lpips_weight=0.0)
    tiny_alexnet(x)
    aux.loss(x)
    sd = aux.state_dict()
    aux.remove()
    other = recon_aux.attach(tiny_alexnet, layer="features.10", lpips_weight=0.0)
    with pytest.raises(ValueError, match="made with layer 'features.7', this ReconAux taps "
                                         "'features.10'; attach with layer='features.7'"):
        other.load_state_dict(sd)
    other.remove()
    conv_net = nn.Sequential(nn.Conv2d(3, 8, 3))
    fresh = recon_aux.attach(conv_net, lpips_weight=0.0)
    with pytest.raises(ValueError, match=r"\['features.7'\] are not modules of Sequential: load "
                                         "it into the model it was saved with, or attach with "
                                         "layer="):
        fresh.load_state_dict(sd)


def test_lpips_never_reaches_optimizer_or_parameters(tiny_alexnet):
    aux = recon_aux.attach(tiny_alexnet, input_shape=(3, 32, 32))
    assert aux.perceptual.lpips is not None
    lpips_ids = {id(p) for p in aux.perceptual.lpips.parameters()}
    assert lpips_ids.isdisjoint(id(p) for p in aux.parameters())
    assert all(not p.requires_grad for p in aux.perceptual.lpips.parameters())
    assert not aux.perceptual.lpips.training


def test_channels_last_and_autocast_bf16(tiny_alexnet):
    model = tiny_alexnet.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    aux = recon_aux.attach(model, opt)
    x = torch.rand(4, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = base_loss(out.float()) + aux.loss(x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    opt.step()


def test_pairing_checks_the_image_shape(tiny_alexnet):
    model = tiny_alexnet
    aux = recon_aux.attach(model, lpips_weight=0.0)
    model(torch.rand(4, 3, 32, 32))
    with pytest.raises(PairingError, match=r"\(4, 3, 40, 40\).*\(4, 3, 32, 32\)"):
        aux.loss(torch.rand(4, 3, 40, 40))  # same batch size, other size: never paired


def test_pairing_errors_say_what_released_the_forward(tiny_alexnet):
    model = tiny_alexnet
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    aux = recon_aux.attach(model, opt, lpips_weight=0.0)
    with pytest.raises(PairingError, match="No forward of the model has been seen yet.*stem"):
        aux.loss(torch.rand(2, 3, 32, 32))
    x = torch.rand(2, 3, 32, 32)
    loss = base_loss(model(x)) + aux.loss(x)
    with pytest.raises(PairingError, match="already used by an earlier aux.loss call"):
        aux.loss(x)
    loss.backward()
    opt.step()
    y = torch.rand(2, 3, 32, 32)
    model(y)
    opt.step()
    with pytest.raises(PairingError, match=r"released by optimizer.step\(\).*before"):
        aux.loss(y)
    with pytest.raises(PairingError, match=r"last captured forward was released by optimizer"):
        aux.loss(torch.rand(2, 3, 32, 32))  # a tensor never seen: the last release is named
    z = torch.rand(2, 3, 32, 32)
    model(z).pow(2).mean().backward()
    with pytest.raises(PairingError, match="released when backward reached its feature map"):
        aux.loss(z)


def test_checkpoint_keeps_its_layer_when_the_default_rule_differs():
    # A run checkpointed when layer=None meant layer4 resumes tapping layer4.
    model = resnet18()
    aux = recon_aux.attach(model, layer="layer4", lpips_weight=0.0, input_shape=(3, 32, 32))
    model2 = resnet18()
    fresh = recon_aux.attach(model2, lpips_weight=0.0)
    fresh.load_state_dict(aux.state_dict())
    assert fresh.layer_name == "layer4"
    x = torch.rand(2, 3, 32, 32)
    model2(x)
    assert fresh.loss(x).requires_grad
