"""Two processes with gloo on the CPU under torchrun: one short epoch per method."""

from __future__ import annotations

import json

import pytest
import yaml

from tests import helpers
from tests.helpers import REPO

TINY = [
    "data.per_class=10", "data.test_per_class=5", "data.batch_size=25", "train.epochs=1",
    "run.progress=false",
]


def torchrun(config, out_dir, data_root, extra=(), entry=("-m", "benchmarks.cli")):
    """``torchrun ENTRY train CONFIG`` on two processes (ENTRY: the harness's command line, or
    a script that registers a test-only method first); rank 0's result line."""
    return helpers.torchrun(*entry, "train", str(config), *TINY, f"run.out_dir={out_dir}",
                            *extra, env={"RECON_AUX_DATA": str(data_root)})


def _toy_config(tmp_path):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump({
        "method": {"name": "rotation"},
        "backbone": {"name": "alexnet_cifar", "width": 0.25},
        "eval": {"knn": {"layers": ["conv5"], "k": 20, "temperature": 0.1}},
        "recon": {"weight": 1.0},
    }))
    return cfg


@pytest.mark.slow
def test_two_process_toy(tmp_path, shared_data):
    result = torchrun(_toy_config(tmp_path), tmp_path / "run", shared_data,
                      entry=[str(REPO / "tests" / "adapters" / "toy_method.py")])
    assert result["recon"] is True and "knn_conv5" in result["metrics"]
    # each rank reads its own half of the 100 training images in batches of data.batch_size:
    # 2 steps an epoch (a rank reading all of them would take 4)
    history = json.loads((tmp_path / "run" / "result.json").read_text())["history"]
    assert history[0]["step"] == 100 // 2 // 25


@pytest.mark.slow
def test_two_process_compiled_trains_as_eager(tmp_path, shared_data):
    """train.compile inside the DDP-wrapped step (the backbone compiled in place; aot_eager
    traces as inductor does, without a C++ compiler): the same losses as the eager run."""
    entry = [str(REPO / "tests" / "adapters" / "toy_method.py")]
    torchrun(_toy_config(tmp_path), tmp_path / "eager", shared_data, entry=entry)
    torchrun(_toy_config(tmp_path), tmp_path / "compiled", shared_data, entry=entry,
             extra=["train.compile=default", "train.compile_backend=aot_eager"])
    eager, compiled = (json.loads((tmp_path / name / "result.json").read_text())
                       for name in ("eager", "compiled"))
    assert compiled["config"]["train"]["compile"] == "default"
    for a, b in zip(compiled["history"], eager["history"], strict=True):
        assert a["method_loss"] == pytest.approx(b["method_loss"], rel=1e-4)
        assert a["recon_loss"] == pytest.approx(b["recon_loss"], rel=1e-4)
