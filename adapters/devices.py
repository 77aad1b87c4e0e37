"""Where the work runs: small host tensors sent to the device without a wait, the host's torch
thread count for a block, whether inductor can build CPU kernels here, and the one-line
description of the machine that results record.

Small tensors made on the host (random parameters, learning rates) go to the device where the
work runs without making the host wait for it.
A plain ``.to("cuda")`` from ordinary host memory waits for every kernel already queued there: a
host-device synchronisation, which stalls the host's launching. From pinned memory with
``non_blocking=True`` the copy is queued like a kernel instead, and torch's pinned-memory cache
keeps the host block until the copy has run. (``recon_aux`` holds its own copy of this helper:
the library does not import the harness.)
"""

from __future__ import annotations

import os
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["to_device", "torch_threads", "has_cxx_compiler", "machine"]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the host) on ``device``: queued from pinned memory for a GPU, as it is for
    the CPU."""
    if t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(num_threads)``, restoring the old value.

    ``None`` changes nothing. Augmentation is many small tensor ops; on a busy 2-core machine
    OpenMP's thread hand-offs made them ~10x slower with 2 threads than with 1.
    """
    previous = torch.get_num_threads()
    if num_threads is None or num_threads == previous:
        yield
        return
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def has_cxx_compiler() -> bool:
    """Whether inductor can build its CPU kernels here: ``$CXX``, g++, c++ or clang++ found."""
    return any(shutil.which(n) for n in (os.environ.get("CXX"), "g++", "c++", "clang++") if n)


def machine() -> str:
    """The device, torch's thread count and torch's version, as results record them."""
    dev = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
           else f"{platform.machine()} CPU")
    return f"{dev}, {torch.get_num_threads()} threads, torch {torch.__version__}"
