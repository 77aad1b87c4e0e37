"""Every committed config loads and validates (without training)."""

from __future__ import annotations

import pytest

from adapters.config import load_run_config
from adapters.engine import load_method
from benchmarks import bench
from tests.helpers import REPO

CONFIGS = REPO / "benchmarks" / "configs"
RUN_CONFIGS = sorted([*(CONFIGS / "smoke").glob("*.yaml"), *(CONFIGS / "paper").glob("*.yaml")])
BENCH_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_run_config_valid(path):
    cfg = load_run_config(path)
    assert load_method(cfg["method"]["name"]).__name__
    assert cfg["recon"] is not None  # +recon by default; recon=null gives the base method


@pytest.mark.parametrize("path", BENCH_CONFIGS, ids=lambda p: p.name)
def test_bench_config_valid(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = bench.load_bench_config(path)
    common = bench._dotted(cfg.get("common"))
    sources = list((cfg.get("methods") or {}).values()) or [cfg["method"]]
    for src in sources:
        rc = bench._run_config(src, [*common, "recon=null"], cfg["name"])
        assert rc["train"]["epochs"] >= 1
    for axis in (cfg.get("axes") or {}):
        assert axis in {"weight", "mix", "net", "resize_to", "layer"}
