"""The two lines in the loops people run today: momentum encoders, DDP, autocast, torch.compile,
multi-level taps."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
import torchvision
from torch import nn

import recon_aux
from tests.helpers import REPO, TinyAlexNet, torchrun


def fresh() -> nn.Module:
    torch.manual_seed(0)
    return TinyAlexNet()


# -- momentum / teacher encoders (BYOL, MoCo, DINO) ------------------------------------------------
@pytest.mark.parametrize("order", ["copy_then_attach", "attach_then_copy"])
def test_momentum_copy_is_never_captured(order):
    student = fresh()
    if order == "copy_then_attach":
        teacher = copy.deepcopy(student)
        aux = recon_aux.attach(student, lpips_weight=0.0)
    else:
        aux = recon_aux.attach(student, lpips_weight=0.0)
        teacher = copy.deepcopy(student)
    x0, x1 = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    # BYOL-style step: student on both views, teacher on both views (same batch sizes), in
    # train mode with grad enabled for the teacher too (the worst case for pairing).
    p0, p1 = student(x0), student(x1)
    t0, t1 = teacher(x0), teacher(x1)
    assert len(aux.tap.pending) == 2  # the teacher's forwards were not captured
    loss = (p0 - t0.detach()).pow(2).mean() + (p1 - t1.detach()).pow(2).mean()
    recon = aux.loss(x0) + aux.loss(x1)
    (from_recon,) = torch.autograd.grad(recon, student.features[0].weight, retain_graph=True)
    assert from_recon.abs().sum() > 0  # the reconstruction alone reaches the student's stem
    (loss + recon).backward()
    assert all(p.grad is None for p in teacher.parameters())  # recon reached the student only
    # the copy carries no live hooks of its own: attaching to it is independent
    aux_t = recon_aux.attach(teacher, lpips_weight=0.0)
    teacher(x0)
    assert len(aux_t.tap.pending) == 1 and aux.tap.pending == []


# -- DistributedDataParallel (two processes, gloo) -------------------------------------------------
def _ddp(order: str, *extra: str) -> dict:
    return torchrun(str(REPO / "tests" / "recon_aux" / "ddp_loop.py"), order, *extra)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["before", "after", "wrapper"])
def test_ddp_attach_before_or_after_wrapping(order):
    result = _ddp(order)
    assert result["loss_finite"] and result["head_moved"] and result["head_steps"] == 3
    assert result["encoder_agrees"], "DDP did not keep the encoder in sync"
    assert result["ranks_differ"] and result["head_grad_is_the_mean"], \
        "the head's gradients were not averaged over ranks"
    assert result["head_agrees"]
    assert result["layer"].endswith("features.13")


@pytest.mark.slow
def test_ddp_without_sync_the_head_drifts():
    # The control for the test above: each rank sees different images, so without the
    # all-reduce the head's weights differ after a few steps.
    result = _ddp("before", "nosync")
    assert result["encoder_agrees"] and not result["head_agrees"]
    assert not result["head_grad_is_the_mean"]  # each rank kept its own


# -- precision and memory format ---------------------------------------------------------------
def _autocast_step(device: str, dtype: torch.dtype) -> torch.Tensor:
    model = fresh().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    aux = recon_aux.attach(model, opt)
    x = torch.rand(4, 3, 32, 32, device=device)
    with torch.autocast(device, dtype=dtype):
        out = model(x)
        loss = out.float().pow(2).mean() + aux.loss(x)
    assert aux.last["l2"].dtype == torch.float32 and aux.last["lpips"].dtype == torch.float32
    loss.backward()
    opt.step()
    return loss


@pytest.mark.parametrize("device,dtype", [
    ("cpu", torch.bfloat16),
    ("cpu", torch.float16),
    pytest.param("cuda", torch.float16, marks=pytest.mark.cuda),  # skipped without a GPU
])
def test_autocast_loss_is_float32_and_finite(device, dtype):
    loss = _autocast_step(device, dtype)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# -- torch.compile -------------------------------------------------------------------------------
def _grads(order: str, backend: str | None, build=fresh, device: str = "cpu",
           **attach) -> dict[str, torch.Tensor]:
    torch._dynamo.reset()
    model = build().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    if order == "attach_then_compile":
        aux = recon_aux.attach(model, opt, lpips_weight=0.0, **attach)
        net = torch.compile(model, backend=backend) if backend else model
    else:
        net = torch.compile(model, backend=backend) if backend else model
        aux = recon_aux.attach(net, opt, lpips_weight=0.0, **attach)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    loss = net(x).pow(2).mean() + aux.loss(x)
    loss.backward()
    return {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("order", ["attach_then_compile", "compile_then_attach"])
def test_torch_compile_gives_eager_gradients(order):
    # aot_eager runs dynamo and AOTAutograd (where hooks could be lost) without a C compiler.
    eager = _grads(order, None)
    compiled = _grads(order, "aot_eager")
    for name, g in eager.items():
        torch.testing.assert_close(compiled[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # and the reconstruction term really is part of the encoder's gradient
    torch.manual_seed(0)
    base = fresh()
    base(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))).pow(2).mean() \
        .backward()
    assert not torch.allclose(base.features[0].weight.grad, eager["features.0.weight"])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="inductor on CPU needs a C compiler")
def test_torch_compile_inductor():
    eager = _grads("attach_then_compile", None)
    compiled = _grads("attach_then_compile", "inductor")
    for name, g in eager.items():
        torch.testing.assert_close(compiled[name], g, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("input_shape", [(3, 32, 32), None], ids=["head-at-attach", "lazy-head"])
def test_aux_compile_compiles_what_loss_runs(input_shape):
    """``aux.compile()`` reaches the head and LPIPS (``aux.loss`` never calls ``forward``), a
    head built later included; the losses, the gradients and the state_dict stay eager's."""
    from torch._dynamo.utils import counters

    def run(compiled: bool):
        torch._dynamo.reset()
        model = fresh()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        aux = recon_aux.attach(model, opt, input_shape=input_shape, lpips_weights="random")
        if compiled:
            aux.compile(backend="aot_eager")
        x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        before = counters["stats"]["unique_graphs"]
        losses = []
        for _ in range(2):
            loss = model(x).pow(2).mean() + aux.loss(x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        graphs = counters["stats"]["unique_graphs"] - before
        return losses, graphs, aux.state_dict(), dict(model.named_parameters())

    with pytest.warns(UserWarning, match="RANDOMLY initialised"):
        eager = run(False)
    with pytest.warns(UserWarning, match="RANDOMLY initialised"):
        compiled = run(True)
    assert eager[1] == 0 and compiled[1] >= 2  # the head's graph and LPIPS's
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    assert compiled[2].keys() == eager[2].keys()
    for name, p in eager[3].items():
        torch.testing.assert_close(compiled[3][name], p, rtol=1e-4, atol=1e-6, msg=name)


def test_graph_compiled_without_hooks_is_named_and_reset_mends_it():
    """torch.compile does not guard on hooks: a graph compiled for a hook-less copy of the class
    runs the attached one without them. The error says so and how to mend it."""
    torch._dynamo.reset()
    model = fresh()
    twin = copy.deepcopy(model)  # no hooks: compiled first, its graph serves both
    aux = recon_aux.attach(model, lpips_weight=0.0)
    net, other = (torch.compile(m, backend="aot_eager") for m in (model, twin))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    other(x).sum().backward()
    net(x)
    with pytest.raises(recon_aux.PairingError, match="No forward of the model has been seen "
                                                     "yet.*torch.compiler.reset\\(\\) after"):
        aux.loss(x)
    torch.compiler.reset()
    net(x).pow(2).mean().add(aux.loss(x)).backward()
    assert model.features[0].weight.grad is not None and aux.calls == 1


@pytest.mark.cuda
def test_torch_compile_inductor_cuda(monkeypatch):
    """Inductor's Triton kernels on the GPU keep the hooks and give eager's gradients."""
    # TF32 convolutions would differ from eager by more than the fusion does; compare in fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    eager = _grads("attach_then_compile", None, device="cuda")
    compiled = _grads("attach_then_compile", "inductor", device="cuda")
    for name, g in eager.items():
        torch.testing.assert_close(compiled[name], g, rtol=1e-3, atol=1e-5, msg=name)


# -- multi-level taps -----------------------------------------------------------------------------
def test_multi_level_tap_fuses_levels_and_trains_both():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    aux = recon_aux.attach(model, opt, layer=["layer3", "layer4"], lpips_weight=0.0,
                           input_shape=(3, 64, 64))
    assert aux.layer_name == "layer3+layer4" and aux.head.levels == 2
    assert aux.head.in_channels == (256, 512) and aux.head.in_size == (4, 4)
    x = torch.rand(4, 3, 64, 64)
    model(x)
    loss = aux.loss(x)
    assert aux.last["reconstruction"].shape == x.shape
    loss.backward()
    # the reconstruction gradient reaches both levels' own weights through their laterals
    for lateral in aux.head.laterals:
        assert lateral[0].weight.grad.abs().sum() > 0
    assert model.layer3[1].conv2.weight.grad.abs().sum() > 0
    # the head (and its geometry) round-trips through state_dict
    model2 = torchvision.models.resnet18(num_classes=10)
    aux2 = recon_aux.attach(model2, layer=["layer3", "layer4"], lpips_weight=0.0)
    aux2.load_state_dict(aux.state_dict())
    assert aux2.head.in_channels == (256, 512)


def test_multi_level_tap_errors_name_the_problem():
    model = fresh()
    with pytest.raises(ValueError, match="not a module"):
        recon_aux.attach(model, layer=["features.10", "nope"])
    with pytest.raises(ValueError, match="twice"):
        recon_aux.attach(model, layer=["features.10", "features.10"])
    with pytest.raises(ValueError, match="non-empty list"):
        recon_aux.attach(model, layer=[])


# -- models that encode several images per forward (AET's Regressor, siamese nets) -------------
class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x))).mean((2, 3))


class Siamese(nn.Module):
    """Like AET's Regressor: one forward encodes the image and its transformed copy. ``copy``
    mimics DataParallel's scatter, which hands the submodule copies of the inputs."""

    def __init__(self, copy: bool = False) -> None:
        super().__init__()
        self.encoder, self.fc, self.copy = Encoder(), nn.Linear(32, 8), copy

    def forward(self, x1, x2):
        if self.copy:
            x1, x2 = x1.clone(), x2.clone()
        return self.fc(torch.cat([self.encoder(x1), self.encoder(x2)], 1))


def test_layer_running_twice_per_forward_is_a_pairing_error_not_a_silent_mismatch():
    torch.manual_seed(0)
    net = Siamese()
    aux = recon_aux.attach(net, lpips_weight=0.0)
    x1, x2 = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    net(x1, x2)
    with pytest.raises(recon_aux.PairingError, match="ran 2 times during one forward"):
        aux.loss(x1)  # the capture holds x2's features: never pair it with x1


def test_copies_of_the_input_pair_by_value():
    torch.manual_seed(0)
    net = Siamese(copy=True)
    aux = recon_aux.attach(net.encoder, lpips_weight=0.0)
    x1, x2 = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    net(x1, x2)  # two captures of batch 4, neither received x1 itself
    capture = aux.tap.take(x1)
    with torch.no_grad():
        expected = net.encoder.conv2(torch.relu(net.encoder.conv1(x1)))
    torch.testing.assert_close(capture.feature.detach(), expected)
    assert aux.tap.take(x2).index == capture.index + 1


def test_dataparallel_replicas_get_a_clear_error():
    model = fresh()
    aux = recon_aux.attach(model, lpips_weight=0.0)
    replica = model._replicate_for_data_parallel()  # what DataParallel runs on each GPU
    with warnings.catch_warnings():  # raised once: no second error for torch to silence
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="DistributedDataParallel"):
            replica(torch.rand(2, 3, 32, 32))
    assert aux.tap.pending == []


def test_head_gradients_are_cleared_after_each_step():
    # AET's loop zeroes only its own model (net.zero_grad()); the head must not accumulate.
    model = fresh()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    aux = recon_aux.attach(model, opt, lpips_weight=0.0, input_shape=(3, 32, 32))
    for _ in range(2):
        model.zero_grad()
        x = torch.rand(4, 3, 32, 32)
        (model(x).pow(2).mean() + aux.loss(x)).backward()
        assert all(p.grad is not None for p in aux.parameters())
        opt.step()
        assert all(p.grad is None for p in aux.parameters())


def test_frozen_encoder_warns_that_only_the_head_trains():
    model = fresh().requires_grad_(False)
    aux = recon_aux.attach(model, lpips_weight=0.0)
    x = torch.rand(2, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match="trains the head only"):
        model(x)
    aux.loss(x).backward()
    assert all(p.grad is not None for p in aux.parameters())
