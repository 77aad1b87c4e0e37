"""kill -9 at every file-system event of a run's writes, then resume: bitwise the uninterrupted
run, a log without duplicate epochs, no temporary file left (see ``kill_worker.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from adapters.checkpoint import load_checkpoint
from tests.adapters.tiny import make_tree, tiny_config
from tests.helpers import REPO

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork (POSIX)")


def _tensors_equal(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.slow
def test_kill_at_every_file_system_event_then_resume_is_bitwise_equal(tmp_path):
    tree = make_tree(tmp_path / "tree")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(tiny_config(tree, "unused")))
    base = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "RECON_AUX_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "tests.adapters.kill_worker", str(config),
                           str(base)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    events = json.loads((base / "events.json").read_text())
    report = json.loads((base / "report.json").read_text())
    kinds = {e.split()[0] for e in events}
    assert kinds == {"open", "write", "fsync", "close", "replace"}, kinds
    # two checkpoints, two logs, result.json and the picture: each written through a rename
    assert sum(e.startswith("replace checkpoint.pt.") for e in events) == 2
    assert sum(e.startswith("replace log.jsonl.") for e in events) == 2
    assert len(report) == len(events)
    assert all(r["killed"] for r in report), [r for r in report if not r["killed"]]
    assert all(r["resumed"] for r in report), ([r for r in report if not r["resumed"]],
                                               proc.stdout[-3000:])

    ref = json.loads((base / "ref" / "result.json").read_text())
    ref_state = load_checkpoint(base / "ref" / "checkpoint.pt")
    ref_log = (base / "ref" / "log.jsonl").read_text()
    ref_picture = (base / "ref" / "reconstructions.png").read_bytes()
    for r in report:
        run = base / f"kill{r['event']}"
        got = json.loads((run / "result.json").read_text())
        where = f"killed before event {r['event']} ({r['what']})"
        assert got["metrics"] == ref["metrics"], where
        assert got["history"] == ref["history"], where
        assert (run / "log.jsonl").read_text() == ref_log, where  # each epoch once
        assert (run / "reconstructions.png").read_bytes() == ref_picture, where
        state = load_checkpoint(run / "checkpoint.pt")
        for key in ("backbone", "method", "aux", "optimizer", "epoch", "step", "history"):
            _tensors_equal(ref_state[key], state[key], f"{where}: {key}")
        leftovers = sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp"))
        assert not leftovers, (where, leftovers)
