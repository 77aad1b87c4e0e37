"""Two processes with gloo on the CPU under torchrun: one short epoch per method."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

TINY = [
    "data.per_class=10", "data.test_per_class=5", "data.batch_size=25", "train.epochs=1",
    "run.progress=false",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(config, out_dir, data_root, extra=()):
    env = dict(os.environ, RECON_AUX_DATA=str(data_root), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "adapters.cli",
           "train", str(config), *TINY, f"run.out_dir={out_dir}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone prints the result
    return json.loads(lines[0])


@pytest.mark.slow
def test_two_process_toy(tmp_path, shared_data):
    cfg = tmp_path / "toy.yaml"
    cfg.write_text(yaml.safe_dump({
        "method": {"name": "toy_method:Rotation"},
        "backbone": {"name": "alexnet_cifar", "width": 0.25},
        "eval": {"knn": {"layers": ["conv5"], "k": 20, "temperature": 0.1}},
        "recon": {"weight": 1.0},
    }))
    result = torchrun(cfg, tmp_path / "run", shared_data)
    assert result["recon"] is True and "knn_conv5" in result["metrics"]
