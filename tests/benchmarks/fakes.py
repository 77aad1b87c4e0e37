"""What :func:`adapters.engine.train` returns, without training: for matrix tests that plan and
record runs but train nothing."""

from __future__ import annotations

from typing import Any

from adapters.config import RunConfig
from benchmarks.matrix import tap_name


def fake_train(c: RunConfig, metric: str = "knn_pool", default_tap: str = "layer4"
               ) -> dict[str, Any]:
    """A finished run's result: ``metric`` is the seed, ``default_tap`` what layer=None tapped."""
    tapped = None if c.recon is None else (tap_name(c.recon.layer) or default_tap)
    return {"metrics": {metric: float(c.train.seed)}, "config": c.to_dict(), "wall_s": 0.0,
            "machine": "test", "history": [], "train_images": 1, "test_images": 1,
            "tapped": tapped}


def crash_or_fake(c: RunConfig, console: Any, threads: Any, method: Any) -> dict[str, Any]:
    """A worker of ``bench --jobs`` (in place of ``schedule._train_in_process``; importable, so
    a spawned process finds it) whose seed-0 random-init run dies abruptly, as a segfault or
    the kernel's OOM killer would end it; the others finish a second after it died (they wait
    for its mark, not for a fixed time: how long a spawned worker takes to start varies with
    the machine's load, and a sibling that ended first would let a fourth run start)."""
    import os
    import time
    from pathlib import Path

    mark = Path(c.run.out_dir).parent / "a-worker-died"
    if c.train.seed == 0 and c.train.epochs == 0:
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
        os._exit(1)
    deadline = time.monotonic() + 120
    while not mark.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{mark} never appeared")
        time.sleep(0.05)
    time.sleep(1.0)
    return fake_train(c)
