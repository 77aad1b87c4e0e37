"""DeepCluster method: the uniform sampler, the epoch hooks on a fake EngineContext, the top-layer
handling and the extra state (its PCA-whitening and k-means: tests/adapters/ops/test_kmeans.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.backbones import AlexNetCIFAR
from adapters.evaluation import extract_features
from adapters.methods import METHODS
from adapters.methods.base import EngineContext, StepOutput
from adapters.methods.deepcluster import DeepCluster, derive_seed, uniform_label_sampler
from adapters.ops.kmeans import (
    faiss_available,
)

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")  # comparable timings, deterministic sums


# ------------------------------------------------------------------------------------ sampler


def test_uniform_sampler_skips_empty_clusters_and_balances():
    labels = np.array([0] * 70 + [3] * 25 + [7] * 5)  # k = 10: clusters 1, 2, 4, 5, 6, 8, 9 empty
    out = uniform_label_sampler(torch.as_tensor(labels), 100, seed=0)
    assert out.shape == (100,) and out.dtype == np.int64
    assert set(labels[out]) == {0, 3, 7}
    counts = np.bincount(labels[out], minlength=10)
    assert counts[[0, 3, 7]].min() >= 100 // 3 - 1 and counts[[0, 3, 7]].max() <= 100 // 3 + 1
    # The 5-image cluster is drawn with replacement (34 > 5), the 70-image one without.
    first70 = out[labels[out] == 0]
    assert len(np.unique(first70)) == len(first70)
    assert np.array_equal(out, uniform_label_sampler(labels, 100, seed=0))
    assert not np.array_equal(out, uniform_label_sampler(labels, 100, seed=1))
    with pytest.raises(ValueError, match="cluster the data"):
        uniform_label_sampler(np.full(10, -1), 10, seed=0)


# ------------------------------------------------------------------------------------ method

N_IMAGES = 240


class _FakeEngine:
    """The engine's side of the contract, for one process on the CPU."""

    def __init__(self, method: DeepCluster, images: torch.Tensor, targets: torch.Tensor):
        self.method, self.images, self.targets = method, images, targets
        self.backbone = method.backbone
        params = [p for p in [*self.backbone.parameters(), *method.parameters()] if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-5)
        self.logs: dict[str, float] = {}
        self.broadcasts = 0

    def extract(self, layer: str):
        n = len(self.images)
        batches = [
            (self.images[i : i + 100], self.targets[i : i + 100], torch.arange(i, min(i + 100, n)))
            for i in range(0, n, 100)
        ]
        feats = extract_features(self.backbone, batches, layer, progress=False)
        # Hand them back in a scrambled order: the method must re-order rows by index.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
        return feats[layer][perm], feats.indices[perm]

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        self.broadcasts += 1
        return tensor

    def context(self, epoch: int) -> EngineContext:
        return EngineContext(
            backbone=self.backbone,
            device=torch.device("cpu"),
            epoch=epoch,
            step=0,
            epochs=3,
            steps_per_epoch=3,
            num_samples=len(self.images),
            targets=self.targets,
            seed=7,
            rank=0,
            world_size=1,
            extract=self.extract,
            broadcast=self.broadcast,
            optimizer=self.optimizer,
            log=self.logs.update,
        )

    def run_epoch(self, epoch: int, steps: int = 3, batch: int = 32) -> list[StepOutput]:
        ctx = self.context(epoch)
        if epoch == 0:
            self.method.on_train_start(ctx)
        self.backbone.train()
        self.method.on_epoch_start(ctx)
        order = self.method.epoch_indices(ctx)
        outs = []
        for s in range(steps):
            idx = torch.as_tensor(order[s * batch : (s + 1) * batch])
            self.method.before_step(ctx)
            out = self.method.training_step([self.images[idx]], idx)
            self.optimizer.zero_grad()
            out.loss.backward()
            self.optimizer.step()
            outs.append(out)
        return outs


def _make(seed: int = 0, **hparams) -> _FakeEngine:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(N_IMAGES, 3, 32, 32, generator=g)
    targets = torch.arange(N_IMAGES) % 10
    backbone = AlexNetCIFAR(width=0.125)
    hparams = {"k": 8, "pca_dim": 32, "kmeans_backend": "torch", **hparams}
    return _FakeEngine(DeepCluster(backbone, N_IMAGES, **hparams), images, targets)


def test_epoch_hooks_labels_top_layer_and_optimizer_state():
    engine = _make()
    method = engine.method
    assert METHODS["deepcluster"] is DeepCluster and method.views == ("crop_flip",)
    outs = engine.run_epoch(0)
    labels0 = method.pseudo_labels.clone()
    assert method.labels_epoch == 0 and labels0.min() >= 0 and labels0.max() < 8
    assert len(torch.unique(labels0)) > 1  # non-degenerate
    assert {"kmeans_loss", "clusters_nonempty", "nmi_true"} <= set(engine.logs)
    assert "nmi_prev" not in engine.logs
    assert engine.broadcasts == 1
    out = outs[-1]
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    assert len(out.recon_inputs) == 1 and out.recon_inputs[0].shape == (32, 3, 32, 32)
    assert set(out.logs) == {"ce", "pseudo_acc"}
    # The top layer's momentum buffer is dropped before every step (plain SGD, as the original).
    weight = method.top_layer.weight
    assert "momentum_buffer" in engine.optimizer.state[weight]
    method.before_step(engine.context(0))
    assert "momentum_buffer" not in engine.optimizer.state[weight]
    backbone_state = engine.optimizer.state[method.backbone.conv1[0].weight]
    assert "momentum_buffer" in backbone_state  # untouched

    trained = weight.detach().clone()
    engine.run_epoch(1, steps=0)
    assert "nmi_prev" in engine.logs and 0.0 <= engine.logs["nmi_prev"] <= 1.0
    # Re-initialised in place (same Parameter the optimizer holds), N(0, 0.01), zero bias.
    assert method.top_layer.weight is weight
    assert not torch.allclose(weight, trained)
    assert weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.count_nonzero(method.top_layer.bias) == 0
    assert weight not in engine.optimizer.state and method.top_layer.bias not in (
        engine.optimizer.state
    )
    g = torch.Generator().manual_seed(derive_seed(7, 1, 2))
    torch.testing.assert_close(
        weight.detach(), torch.empty(weight.shape).normal_(0, 0.01, generator=g)
    )


def test_plain_sgd_step_for_the_top_layer():
    engine = _make()
    engine.run_epoch(0, steps=2)
    method, opt = engine.method, engine.optimizer
    ctx = engine.context(0)
    idx = torch.arange(16)
    method.before_step(ctx)
    out = method.training_step([engine.images[idx]], idx)
    opt.zero_grad()
    out.loss.backward()
    w = method.top_layer.weight
    expected = w.detach() - 0.05 * (w.grad + 1e-5 * w.detach())
    opt.step()
    torch.testing.assert_close(w.detach(), expected)


def test_top_layer_momentum_option_keeps_the_buffer():
    engine = _make(top_layer_momentum=True)
    engine.run_epoch(0, steps=2)
    engine.method.before_step(engine.context(0))
    assert "momentum_buffer" in engine.optimizer.state[engine.method.top_layer.weight]


def test_clustering_is_reproducible_and_extra_state_round_trips():
    a, b = _make(seed=3), _make(seed=3)
    a.run_epoch(0, steps=2)
    b.run_epoch(0, steps=2)
    assert torch.equal(a.method.pseudo_labels, b.method.pseudo_labels)

    # Resume: a fresh method restored from the state dict + extra state (through torch.save
    # with weights_only loading, as the engine's checkpoints) samples the same epoch.
    import io

    buffer = io.BytesIO()
    torch.save({"method": a.method.state_dict(), "extra": a.method.extra_state()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    c = _make(seed=3)
    c.method.load_state_dict(state["method"])
    c.method.load_extra_state(state["extra"])
    assert c.method.labels_epoch == 0
    assert torch.equal(c.method.pseudo_labels, a.method.pseudo_labels)
    ctx = a.context(0)
    assert np.array_equal(c.method.epoch_indices(ctx), a.method.epoch_indices(ctx))
    with pytest.raises(KeyError, match="labels_epoch"):
        c.method.load_extra_state({})


def test_sampled_epoch_balances_the_non_empty_clusters():
    """The epoch's order draws every non-empty cluster about equally often (the uniform
    sampler), whatever the clusters' sizes: not the images uniformly."""
    engine = _make(k=20)
    engine.run_epoch(0, steps=0)
    method = engine.method
    order = method.epoch_indices(engine.context(0))
    assert order.shape == (N_IMAGES,)
    labels = method.pseudo_labels.numpy()
    present = np.unique(labels)
    assert set(labels[order]) == set(present)
    sizes, drawn = np.bincount(labels)[present], np.bincount(labels[order])[present]
    per_cluster = N_IMAGES // len(present) + 1  # drawn from each, then cut to N_IMAGES
    assert sizes.max() > per_cluster  # a large cluster: drawing images uniformly would show
    assert drawn.max() <= per_cluster and drawn.min() >= per_cluster // 2


@needs_faiss
def test_faiss_backend_runs_in_the_method():
    engine = _make(kmeans_backend="faiss")
    engine.run_epoch(0, steps=1)
    assert len(torch.unique(engine.method.pseudo_labels)) > 1


def test_errors_name_the_problem_and_the_fix():
    backbone = AlexNetCIFAR(width=0.125)
    with pytest.raises(ValueError, match="lower method.k"):
        DeepCluster(backbone, 50, k=50)
    with pytest.raises(ValueError, match="'fc7.1'"):
        DeepCluster(backbone, 500, k=10, layer="fc9")
    with pytest.raises(ValueError, match="at most 512"):
        DeepCluster(backbone, 5000, k=10, pca_dim=1024)
    with pytest.raises(TypeError, match="valid ones"):
        DeepCluster(backbone, 500, k=10, clusters=10)
    with pytest.raises(ValueError, match="one augmented view"):
        DeepCluster(backbone, 500, k=10, views=["crop_flip", "crop_flip"])
    method = DeepCluster(backbone, 500, k=10, pca_dim=32, views=["simclr"])
    assert method.views == ("simclr",)
    with pytest.raises(RuntimeError, match="on_epoch_start"):
        method.training_step([torch.rand(2, 3, 32, 32)], torch.tensor([0, 1]))
    engine = _make()
    with pytest.raises(RuntimeError, match="call on_epoch_start"):
        engine.method.epoch_indices(engine.context(0))
    nesterov = torch.optim.SGD(
        engine.optimizer.param_groups[0]["params"], lr=0.1, momentum=0.9, nesterov=True
    )
    ctx = engine.context(0)
    ctx.optimizer = nesterov
    with pytest.raises(ValueError, match="nesterov"):
        engine.method.on_train_start(ctx)
