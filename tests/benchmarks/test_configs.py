"""Every committed bench and ablate config loads, and every run it plans validates."""

from __future__ import annotations

import pytest

from benchmarks import ablate, bench
from benchmarks.matrix import dotted
from tests.helpers import REPO

CONFIGS = REPO / "benchmarks" / "configs"
BENCH_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", BENCH_CONFIGS, ids=lambda p: p.name)
def test_bench_config_valid(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run config paths resolve against the config's folder
    if path.name.startswith("ablation"):
        cfg = ablate.load_ablate_config(path)
        sources = [cfg.method]
        assert set(cfg.axes) <= set(ablate.AXES)
    else:
        cfg = bench.load_bench_config(path)
        sources = list(cfg.methods.values())
    common = dotted(cfg.common)
    for src in sources:
        rc = src.run_config([*common, "recon=null"], cfg.name)
        assert rc.train.epochs >= 1
