"""Tests of the SeLa adapter (adapters/methods/sela.py): schedule, hooks, resume (its
Sinkhorn-Knopp: tests/adapters/ops/test_sinkhorn.py).

None of them needs the engine: a fake :class:`EngineContext` with a tiny AlexNetCIFAR stands in.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import yaml

from adapters.backbones import AlexNetCIFAR
from adapters.methods import METHODS
from adapters.methods.base import EngineContext, StepOutput
from adapters.methods.sela import SeLa, label_update_steps
from adapters.ops.sinkhorn import sela_sinkhorn
from tests.helpers import REPO

# -- schedule ----------------------------------------------------------------------------------


def test_update_steps_linear_like_cifar_py():
    # cifar.py: times (epochs + 1.0001) * N * linspace(0, 1, nopts); the last is after the end.
    assert label_update_steps(2, 1, 7) == [0]
    assert label_update_steps(4, 1, 7) == [0, 5]  # 0, 0.667, 1.333, 2.0001 epochs
    steps = label_update_steps(400, 400, 390)  # the paper setting: 399 updates run
    assert len(steps) == 399 and steps[0] == 0 and steps[-1] < 400 * 390
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    assert gaps <= {391, 392}  # linear: 401.0001 / 399 epochs apart
    # More times than steps: one per step, the rest deferred, none past the end.
    assert label_update_steps(50, 1, 10) == list(range(10))
    assert label_update_steps(0, 5, 10) == [] and label_update_steps(1, 5, 10) == [0]


# -- the method with a fake engine ---------------------------------------------------------------


N, K, HC, SPE, EPOCHS = 96, 6, 3, 4, 3


class FakeEngine:
    """Enough of the engine for SeLa: extract runs the backbone un-augmented in eval mode."""

    def __init__(self, backbone, images, targets):
        self.backbone, self.images, self.targets = backbone, images, targets
        self.logged: list[dict] = []
        self.extracts = 0

    def extract(self, layer):
        self.extracts += 1
        was = self.backbone.training
        self.backbone.eval()
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(self.extracts))
        with torch.no_grad():
            feats = self.backbone.forward_features(self.images[perm], [layer])[layer]
        self.backbone.train(was)
        return feats, perm  # rows in a scrambled order, as gathered from ranks

    def ctx(self, epoch, step, seed=0):
        opt = torch.optim.SGD(self.backbone.parameters(), lr=0.1)
        return EngineContext(
            backbone=self.backbone, device=torch.device("cpu"), epoch=epoch, step=step,
            epochs=EPOCHS, steps_per_epoch=SPE, num_samples=N, targets=self.targets, seed=seed,
            rank=0, world_size=1, extract=self.extract, broadcast=lambda t: t, optimizer=opt,
            log=self.logged.append,
        )


def _setup(head_schedule="cycle", nopts=6, seed=0):
    torch.manual_seed(seed)
    backbone = AlexNetCIFAR(width=0.0625)
    method = SeLa(backbone, N, hc=HC, k=K, lamb=25, nopts=nopts, head_schedule=head_schedule)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(N, 3, 32, 32, generator=g)
    targets = torch.randint(0, 10, (N,), generator=g)
    return backbone, method, FakeEngine(backbone, images, targets), images


def _run(backbone, method, engine, images, start, stop, opt=None):
    """Steps [start, stop) with a plain SGD loop, as the engine would."""
    if opt is None:
        opt = _optimizer(backbone, method)
    for step in range(start, stop):
        ctx = engine.ctx(step // SPE, step)
        method.before_step(ctx)
        idx = torch.arange(step % SPE * 24, step % SPE * 24 + 24)
        out = method.training_step([images[idx]], idx)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return opt


def _optimizer(backbone, method):
    params = [*backbone.parameters(), *method.parameters()]
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def test_hooks_train_and_loss_is_mean_over_heads():
    backbone, method, engine, images = _setup()
    assert METHODS["sela"] is SeLa and SeLa.views == ("simclr",) and method.feature_layer == "fc7"
    method.on_train_start(engine.ctx(0, 0))
    assert method.update_steps == label_update_steps(6, EPOCHS, SPE) == [0, 4, 7, 10]
    init = method.labels.clone()
    for h in range(HC):  # random equipartition, different per head
        assert torch.bincount(init[h], minlength=K).tolist() == [N // K] * K
    assert not torch.equal(init[0], init[1])

    method.before_step(engine.ctx(0, 0))  # update 1 at step 0: head 0 ("cycle")
    assert engine.extracts == 1 and method.updates_done == 1
    assert not torch.equal(method.labels[0], init[0]) and torch.equal(method.labels[1:], init[1:])
    log = engine.logged[-1]
    for key in ("sk_nmi_prev", "sk_nmi_true", "sk_cluster_min", "sk_cluster_max", "sk_iters"):
        assert key in log
    assert log["sk_cluster_min"] <= N / K <= log["sk_cluster_max"]

    # The new labels are those of SK on the head's float64 softmax over the clean features.
    backbone.eval()
    with torch.no_grad():
        feats = backbone(images).double()
    backbone.train()
    head = method.heads[0]
    probs = torch.softmax(feats @ head.weight.double().T + head.bias.double(), 1)
    assert torch.equal(method.labels[0], sela_sinkhorn(probs, 25).labels)

    idx = torch.tensor([3, 50, 7, 90])
    x = images[idx]
    torch.manual_seed(5)  # same dropout masks in both forwards
    out = method.training_step([x], idx)
    assert isinstance(out, StepOutput) and len(out.recon_inputs) == 1
    assert out.recon_inputs[0] is x
    assert out.loss.ndim == 0 and set(out.logs) == {"ce", "label_acc"}
    with torch.no_grad():
        torch.manual_seed(5)
        f = backbone(x)
        expect = torch.stack([torch.nn.functional.cross_entropy(h(f), method.labels[i, idx])
                              for i, h in enumerate(method.heads)]).mean()
    torch.testing.assert_close(out.loss.detach(), expect)
    out.loss.backward()
    assert all(h.weight.grad is not None for h in method.heads)

    _run(backbone, method, engine, images, 1, EPOCHS * SPE)
    assert method.updates_done == 4 and engine.extracts == 4
    assert engine.logged[-1]["sk_updates"] == 4.0
    assert {int(e["sk_head"]) for e in engine.logged} == {0, 1, 2}


def test_head_schedules_epoch_and_all():
    _, method, engine, _ = _setup(head_schedule="all")
    method.on_train_start(engine.ctx(0, 0))
    before = method.labels.clone()
    method.before_step(engine.ctx(0, 0))
    assert all(not torch.equal(method.labels[h], before[h]) for h in range(HC))

    # "epoch" (cifar.py): head = epoch % hc. Updates at steps 0 and 9 (epochs 0 and 2): head 1
    # is never updated -> warning.
    _, method, engine, _ = _setup(head_schedule="epoch", nopts=3)
    with pytest.warns(UserWarning, match=r"never updates head\(s\) \[1\]"):
        method.on_train_start(engine.ctx(0, 0))
    # Two updates in epoch 0 (steps 0 and 3) both go to head 0, as in cifar.py.
    _, method, engine, _ = _setup(head_schedule="epoch", nopts=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        method.on_train_start(engine.ctx(0, 0))
    assert method.update_steps == [0, 3, 5, 7, 10]
    method.before_step(engine.ctx(0, 0))
    method.before_step(engine.ctx(0, 1))  # not due
    method.before_step(engine.ctx(0, 3))
    assert [int(e["sk_head"]) for e in engine.logged] == [0, 0]
    method.before_step(engine.ctx(1, 5))
    assert [int(e["sk_head"]) for e in engine.logged] == [0, 0, 1]


def test_extra_state_round_trip_and_exact_resume():
    # Uninterrupted run.
    backbone, method, engine, images = _setup(seed=3)
    method.on_train_start(engine.ctx(0, 0))
    _run(backbone, method, engine, images, 0, EPOCHS * SPE)

    # The same run killed after epoch 1 and resumed from a weights_only checkpoint (with the
    # optimizer and the RNG, as the engine saves them).
    backbone2, method2, engine2, _ = _setup(seed=3)
    method2.on_train_start(engine2.ctx(0, 0))
    opt2 = _run(backbone2, method2, engine2, images, 0, SPE)
    buf = io.BytesIO()
    torch.save({"backbone": backbone2.state_dict(), "method": method2.state_dict(),
                "extra": method2.extra_state(), "opt": opt2.state_dict(),
                "rng": torch.get_rng_state()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert state["extra"] == {"labels_initialized": 1, "updates_done": 1,
                              "update_steps": [0, 4, 7, 10]}

    backbone3, method3, engine3, _ = _setup(seed=99)  # other init: all must come from the state
    backbone3.load_state_dict(state["backbone"])
    method3.load_state_dict(state["method"])
    method3.load_extra_state(state["extra"])
    opt3 = _optimizer(backbone3, method3)
    opt3.load_state_dict(state["opt"])
    torch.set_rng_state(state["rng"])
    engine3.extracts = engine2.extracts  # the fake extract's row order depends on the count
    method3.on_train_start(engine3.ctx(1, SPE))  # must not redraw the labels
    assert torch.equal(method3.labels, method2.labels)
    _run(backbone3, method3, engine3, images, SPE, EPOCHS * SPE, opt3)
    assert method3.updates_done == method.updates_done == 4
    assert engine2.logged + engine3.logged != [] and [e["sk_head"] for e in engine3.logged] == [
        e["sk_head"] for e in engine.logged][1:]
    assert torch.equal(method3.labels, method.labels)  # bitwise the same labels at the end
    for a, b in zip(method3.parameters(), method.parameters()):
        assert torch.equal(a, b)

    # A checkpoint from another schedule, or one whose position does not match, is refused.
    _, method5, engine5, _ = _setup(seed=3, nopts=7)
    method5.load_state_dict(state["method"])
    method5.load_extra_state(state["extra"])
    with pytest.raises(RuntimeError, match="schedule differs"):
        method5.on_train_start(engine5.ctx(1, SPE))
    _, method6, engine6, _ = _setup(seed=3)
    method6.load_extra_state(state["extra"])
    with pytest.raises(RuntimeError, match="label updates done"):
        method6.on_train_start(engine6.ctx(2, 2 * SPE))


def test_constructor_errors():
    backbone = AlexNetCIFAR(width=0.0625)
    with pytest.raises(TypeError, match="unknown hyperparameter"):
        SeLa(backbone, 100, ncl=10)
    with pytest.raises(ValueError, match="k <= num_samples"):
        SeLa(backbone, 5, k=10)
    with pytest.raises(ValueError, match="head_schedule"):
        SeLa(backbone, 100, k=10, head_schedule="random")
    method = SeLa(backbone, 100, k=10)
    with pytest.raises(RuntimeError, match="on_train_start"):
        method.before_step(None)
    with pytest.raises(ValueError, match="one view"):
        method.training_step([torch.rand(2, 3, 32, 32)] * 2, torch.arange(2))


@pytest.mark.parametrize("kind", ["smoke", "paper"])
def test_configs_build(kind):
    cfg = yaml.safe_load((REPO / "benchmarks" / "configs" / kind / "sela.yaml").read_text())
    hp = dict(cfg["method"])
    assert hp.pop("name") == "sela"
    assert cfg["data"]["augment"] == ["simclr"]
    if kind == "smoke":
        SeLa(AlexNetCIFAR(width=cfg["backbone"]["width"]), 1000, **hp)
    else:
        assert cfg["backbone"]["name"] == "alexnet" and hp["hc"] == 10 and hp["k"] == 128
        SeLa(AlexNetCIFAR(width=0.0625), 50000, **hp)  # hparams accepted (backbone: see yaml)
