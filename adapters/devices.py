"""Small tensors made on the host (random parameters, learning rates), sent to the device where
the work runs without making the host wait for it.

A plain ``.to("cuda")`` from ordinary host memory waits for every kernel already queued there: a
host-device synchronisation, which stalls the host's launching. From pinned memory with
``non_blocking=True`` the copy is queued like a kernel instead, and torch's pinned-memory cache
keeps the host block until the copy has run. (``recon_aux`` holds its own copy of this helper:
the library does not import the harness.)
"""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the host) on ``device``: queued from pinned memory for a GPU, as it is for
    the CPU."""
    if t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
