"""Shared fixtures: real data, a small CNN, the test-only method (helpers: ``tests/helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import TinyAlexNet, data_root


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped on a machine without a CUDA GPU (``make gpu-check``
    runs them where there is one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (make gpu-check runs these)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    root = data_root()
    if root is None:
        pytest.skip("real data not found: set RECON_AUX_DATA or put ../shared/data beside the repo")
    return root


@pytest.fixture
def tiny_alexnet() -> nn.Module:
    torch.manual_seed(0)
    return TinyAlexNet()


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def toy_method(monkeypatch: pytest.MonkeyPatch) -> str:
    """Registers the test-only rotation method (``tests/adapters/toy_method.py``) in the
    method registry for one test, and removes it after; returns its name."""
    from adapters.methods import METHODS
    from tests.adapters.toy_method import Rotation

    monkeypatch.setitem(METHODS, Rotation.name, Rotation)
    return Rotation.name
