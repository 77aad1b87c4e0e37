"""Every committed run config loads and validates (without training)."""

from __future__ import annotations

import pytest

from adapters.config import load_run_config
from adapters.methods import method_class
from tests.helpers import REPO

CONFIGS = REPO / "benchmarks" / "configs"
RUN_CONFIGS = sorted([*(CONFIGS / "smoke").glob("*.yaml"), *(CONFIGS / "paper").glob("*.yaml")])


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_run_config_valid(path):
    cfg = load_run_config(path)
    assert method_class(cfg.method.name).__name__
    assert cfg.recon is not None  # +recon by default; recon=null gives the base method
    assert load_run_config(cfg.to_dict()).to_dict() == cfg.to_dict()  # the plain form reloads
