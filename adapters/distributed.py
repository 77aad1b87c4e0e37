"""Distributed plumbing for the engine: torchrun environment, gathers, broadcasts.

``torchrun --nproc_per_node=N -m benchmarks.cli train CONFIG`` sets RANK/WORLD_SIZE; the engine then
initialises a process group (gloo on CPU, nccl on CUDA), wraps the training step in
``DistributedDataParallel``, shards the batches by rank, and gives methods features gathered from
every rank so that clustering and Sinkhorn see the whole training set.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["init", "is_distributed", "rank", "world_size", "all_gather_cat", "broadcast",
           "all_reduce_mean_", "barrier", "shutdown"]


def is_distributed() -> bool:
    """Whether a process group is up (a torchrun launch after :func:`init`)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def init(device: torch.device) -> bool:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def all_gather_cat(t: Tensor) -> Tensor:
    """Concatenate ``t`` (first dimension may differ per rank) from all ranks, in rank order."""
    if not is_distributed():
        return t
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
    n = int(max(s.item() for s in sizes))
    padded = torch.zeros((n, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def broadcast(t: Tensor, src: int = 0) -> Tensor:
    """Rank ``src``'s ``t`` on every rank (returns a new tensor; identity when not distributed)."""
    if not is_distributed():
        return t
    out = t.clone().contiguous()
    dist.broadcast(out, src)
    return out


def all_reduce_mean_(tensors: Iterable[Tensor | None]) -> None:
    """Average tensors (e.g. gradients) over ranks, in place (None entries are skipped)."""
    if not is_distributed():
        return
    for t in tensors:
        if t is not None:
            dist.all_reduce(t)
            t /= world_size()


def barrier() -> None:
    """Wait until every rank gets here (nothing when not distributed)."""
    if is_distributed():
        dist.barrier()


def shutdown(wait: bool = True) -> None:
    """Tear the process group down; with ``wait`` (the normal end of a run) every rank first
    reaches a barrier, so no rank destroys gloo while another still uses it (after an error,
    ``wait=False``: the other ranks may be gone)."""
    if is_distributed():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
