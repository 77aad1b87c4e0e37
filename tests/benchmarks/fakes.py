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
    the kernel's OOM killer would end it; the others finish after a second."""
    import os
    import time

    if c.train.seed == 0 and c.train.epochs == 0:
        time.sleep(0.3)
        os._exit(1)
    time.sleep(1.0)
    return fake_train(c)
