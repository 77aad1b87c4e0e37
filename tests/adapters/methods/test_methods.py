"""Each method through the engine on real CIFAR-10: base and +recon, exact resume, 2-process DDP."""

from __future__ import annotations

import json

import pytest
import torch

from adapters.checkpoint import load_checkpoint
from adapters.config import load_run_config
from adapters.engine import StopTraining, train
from tests.adapters.test_distributed import torchrun
from tests.helpers import REPO

METHODS = ["deepcluster", "sela", "aet", "simclr"]
# Tiny: 200 images (20 per class), 2 short epochs, small eval; a few seconds per run.
TINY = ["data.per_class=20", "data.test_per_class=10", "data.batch_size=50", "train.epochs=2",
        "run.progress=false", "eval.linear=null", "eval.nonlinear=null",
        "eval.knn={layers: [conv2], k: 20, temperature: 0.1}"]
EXTRA = {"deepcluster": ["method.k=10", "method.pca_dim=32"],
         "sela": ["method.k=10", "method.nopts=4"], "aet": [],
         # the CIFAR ResNet-18 has layer1..layer4 and pool, not conv2
         "simclr": ["eval.knn={layers: [layer2], k: 20, temperature: 0.1}"]}
KNN = {"simclr": "knn_layer2"}
# The single-process runs below give AET the backbone of cifar10-cpu's AET rows (AlexNet-CIFAR
# width 0.25, regressing from pooled conv5): with the smoke config's NIN-4 the resume test alone
# took about a minute on 2 CPU cores. NIN still runs through the engine in the DDP test below,
# and alone in test_aet.py.
SINGLE = {"aet": ["backbone={name: alexnet_cifar, width: 0.25}", "method.feature_layer=conv5"]}


def config(method: str, out, data, *overrides: str) -> dict:
    smoke = REPO / "benchmarks" / "configs" / "smoke" / f"{method}.yaml"
    return load_run_config(smoke, [*TINY, *EXTRA[method], *SINGLE.get(method, []),
                                   f"run.out_dir={out}", f"data.root={data}", *overrides])


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("recon", [False, True])
def test_short_run_base_and_recon(method, recon, tmp_path, shared_data):
    result = train(config(method, tmp_path, shared_data, *([] if recon else ["recon=null"])))
    assert KNN.get(method, "knn_conv2") in result["metrics"]
    rows = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["method_loss"])) for r in rows)
    assert ("recon_l2" in rows[-1]) == recon
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    if method == "deepcluster":  # pseudo-labels non-degenerate; nothing sampled from empty ones
        assert rows[-1]["clusters_nonempty"] > 1
    if method == "sela":
        labels = state["method"]["labels"]
        assert labels.shape[1] == result["train_images"] and len(labels.unique()) > 1


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_resume_is_exact(method, tmp_path, shared_data):
    full = train(config(method, tmp_path / "full", shared_data))
    with pytest.raises(StopTraining):
        train(config(method, tmp_path / "cut", shared_data, "run.stop_after_epoch=1"))
    resumed = train(config(method, tmp_path / "cut", shared_data, "run.resume=true"))
    assert resumed["metrics"] == full["metrics"]
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["backbone"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["backbone"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_compiled_run_trains_as_the_eager_one(method, tmp_path, shared_data):
    """train.compile with each method's own hooks and calls (AET's feature hook, SimCLR's two
    views, the clustering passes between epochs); aot_eager traces as inductor does."""
    eager = train(config(method, tmp_path / "eager", shared_data))
    compiled = train(config(method, tmp_path / "compiled", shared_data, "train.compile=default",
                            "train.compile_backend=aot_eager"))
    for a, b in zip(compiled["history"], eager["history"], strict=True):
        for key in ("method_loss", "recon_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_process_ddp(method, tmp_path, shared_data):
    smoke = REPO / "benchmarks" / "configs" / "smoke" / f"{method}.yaml"
    result = torchrun(smoke, tmp_path, shared_data,
                      extra=["eval.linear=null", "eval.nonlinear=null",
                             "eval.knn={layers: [conv2], k: 10, temperature: 0.1}",
                             *EXTRA[method]])
    assert result["recon"] is True and KNN.get(method, "knn_conv2") in result["metrics"]


def test_simclr_step_and_recon_only_reconstruct_every_view():
    from adapters.backbones import build_backbone
    from adapters.methods.recon_only import ReconOnly
    from adapters.methods.simclr import SimCLR

    torch.manual_seed(0)
    backbone = build_backbone("resnet18_cifar", width=0.125)
    method = SimCLR(backbone, num_samples=8)
    x0, x1 = torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32)
    out = method.training_step([x0, x1], torch.arange(8))
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.recon_inputs[0] is x0 and out.recon_inputs[1] is x1
    out.loss.backward()
    assert backbone.conv1[0].weight.grad is not None
    with pytest.raises(ValueError, match="two views"):
        method.training_step([x0], torch.arange(8))
    with pytest.raises(TypeError, match="valid ones: temperature"):
        SimCLR(backbone, 8, temprature=0.1)
    only = ReconOnly(backbone, 8).training_step([x0, x1], torch.arange(8))
    assert float(only.loss.detach()) == 0.0 and len(only.recon_inputs) == 2
