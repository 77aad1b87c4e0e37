"""Shared fixtures: real data, a small CNN (helpers in ``tests/helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.helpers import TinyAlexNet, data_root


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
