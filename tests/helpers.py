"""What several test modules share: the checkout's path, the real-data location, a small CNN,
and a two-process ``torchrun`` launcher. Fixtures built on these live in ``tests/conftest.py``."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

#: The root of the checkout under test.
REPO = Path(__file__).resolve().parents[1]

#: A run config of the test-only rotation method (register it with the ``toy_method`` fixture):
#: 200 CIFAR-10 images, two epochs, kNN on conv5 and fc7, +recon.
TOY = {
    "method": {"name": "rotation"},
    "backbone": {"name": "alexnet_cifar", "width": 0.25},
    "data": {"dataset": "cifar10", "per_class": 20, "test_per_class": 10, "batch_size": 50},
    "train": {"epochs": 2, "lr": 0.05, "seed": 0},
    "eval": {"knn": {"layers": ["conv5", "fc7"], "k": 20, "temperature": 0.1}},
    "recon": {"weight": 1.0},
    "run": {"progress": False},
}


def data_root() -> Path | None:
    """RECON_AUX_DATA, or ../shared/data beside the repo; None when neither exists."""
    env = os.environ.get("RECON_AUX_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if cand.is_dir():
            return cand
    return None


class TinyAlexNet(nn.Module):
    """AlexNet-style CNN for 32x32 input (5 conv + BN), small enough for unit tests."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 5, stride=2, padding=2), nn.BatchNorm2d(w), nn.ReLU(True),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(True),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(2 * w * 16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, env: dict[str, str] | None = None) -> dict:
    """``torchrun --nproc_per_node=2 ARGS`` (gloo, the checkout on PYTHONPATH, one thread per
    process) from the checkout; returns the one JSON line that rank 0 prints."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone prints the result
    return json.loads(lines[0])
