"""Atomic, checksummed checkpoints loaded with ``torch.load(weights_only=True)``.

A checkpoint is written to a temporary file, fsynced and renamed over the old one, with a
``.sha256`` side file written the same way; loading verifies the checksum before unpickling.
Everything saved is tensors and plain Python data (RNG states included), so the restricted
``weights_only`` unpickler needs no allowances.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recon_aux.weights import sha256_of

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or from a different config."""


def _write_atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically (temp file, fsync, rename) with a sha256 side file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda f: torch.save(state, f))
    digest = sha256_of(path).encode() + b"\n"
    _write_atomic(path.with_name(path.name + ".sha256"), lambda f: f.write(digest))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Verify the side file's sha256, then ``torch.load(..., weights_only=True)`` on the CPU."""
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}.")
    if not side.is_file():
        raise CheckpointError(f"{path} has no {side.name}: refusing to unpickle an unverified "
                              "file. Re-create it, or write its sha256 there if you trust it.")
    expected, actual = side.read_text().split()[0], sha256_of(path)
    if expected != actual:
        raise CheckpointError(f"{path} has sha256 {actual} but {side.name} says {expected}: the "
                              "file is corrupt or was changed. Resume from another checkpoint.")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as weights_only-safe data."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
