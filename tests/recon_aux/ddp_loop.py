"""A plain DDP training loop with the two lines, run under torchrun by test_loops.py.

Usage: torchrun --nproc_per_node=2 tests/recon_aux/ddp_loop.py {before|after|wrapper} [nosync]
  before:  attach to the model, then wrap it in DistributedDataParallel
  after:   wrap first, attach to ddp.module
  wrapper: wrap first, attach to the DDP wrapper itself
  nosync:  sync_grads=False (the control: the head's weights then drift apart across ranks)
Rank 0 prints one JSON line: whether head and encoder weights agree across ranks after training,
whether the head moved, and whether its last gradient was the mean of the ranks' own.
"""

from __future__ import annotations

import gc
import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import recon_aux
from tests.helpers import TinyAlexNet


def main(order: str, sync: bool) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = TinyAlexNet()
    if order == "before":
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        aux = recon_aux.attach(model, opt, sync_grads=sync)
        net = DDP(model)
    else:
        net = DDP(model)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        aux = recon_aux.attach(net.module if order == "after" else net, opt,
                               sync_grads=sync)
    seen = {}  # the head's gradient as the step reads it: after recon_aux's sync pre-hook
    opt.register_step_pre_hook(lambda *_, head=aux: seen.update(synced=torch.cat(
        [p.grad.reshape(-1).clone() for p in head.parameters()])))
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own shard of data
    for step in range(3):
        x = torch.rand(6, 3, 32, 32, generator=g)
        loss = net(x).pow(2).mean()
        loss = loss + aux.loss(x)
        if step == 0:
            initial = [p.detach().clone() for p in aux.parameters()]
        opt.zero_grad()
        loss.backward()
        local = torch.cat([p.grad.reshape(-1) for p in aux.parameters()])  # before the sync
        opt.step()
    every = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(every, local)

    def agree(tensors) -> bool:
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        return all(torch.equal(gathered[0], t) for t in gathered)

    result = {
        "order": order, "layer": aux.layer_name, "loss_finite": bool(torch.isfinite(loss)),
        "head_agrees": agree(list(aux.parameters())),
        "encoder_agrees": agree(list(model.parameters())),
        "head_steps": aux.steps,
        "head_moved": any(not torch.equal(a, b) for a, b in zip(initial, aux.parameters())),
        "ranks_differ": not torch.equal(every[0], every[1]),
        "head_grad_is_the_mean": bool(torch.allclose(seen["synced"], torch.stack(every).mean(0),
                                                     rtol=1e-5, atol=1e-7)),
    }
    if rank == 0:
        print(json.dumps(result))
    # Drop the DDP wrapper (its reducer holds the process group) and wait for both ranks before
    # tearing gloo down: otherwise a rank can abort at exit ("terminate called without an
    # active exception").
    del net, aux, opt, model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sync="nosync" not in sys.argv[2:])
