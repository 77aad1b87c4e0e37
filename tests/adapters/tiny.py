"""A tiny ImageFolder data set written on the fly, and a run config of the test-only rotation
method on it: whole runs in a second or two, without the real data (for the tests that train
many runs: kills at every file-system event, run folders, refusals)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Images per class of each split of :func:`make_tree`.
TRAIN_PER_CLASS, TEST_PER_CLASS = 12, 4


def make_tree(root: Path, seed: int = 0) -> Path:
    """``root/train/{ant,bee}/*.png`` and ``root/test/...``: 32x32 RGB noise with a class-
    dependent tint, so that kNN has something to find. Returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for c, name in enumerate(("ant", "bee")):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 160, (32, 32, 3), dtype=np.uint8)
                pixels[..., c] += 90
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def tiny_config(tree: Path, out_dir: Path | str, **sections) -> dict:
    """A run config of the rotation method (register it with the ``toy_method`` fixture) on
    :func:`make_tree`'s images: 24 training images, batches of 8, two epochs, +recon, kNN."""
    cfg = {
        "method": {"name": "rotation"},
        "backbone": {"name": "alexnet_cifar", "width": 0.25},
        "data": {"dataset": str(tree), "batch_size": 8, "eval_batch_size": 16},
        "train": {"epochs": 2, "lr": 0.05, "seed": 0, "device": "cpu"},
        "eval": {"knn": {"layers": ["conv5"], "k": 5, "temperature": 0.1},
                 "bn_recalibration_images": 16},
        "recon": {"weight": 1.0},
        "run": {"progress": False, "out_dir": str(out_dir)},
    }
    for name, values in sections.items():
        cfg[name] = None if values is None else {**(cfg.get(name) or {}), **values}
    return cfg
