"""The linear probe's weight-decay search with every candidate trained at once (not public API).

The sequential search trains one probe per candidate weight decay, one after the other, on the
same split, from the same initialisation, on the same shuffled mini-batches. Here the ``C``
candidates are one stacked linear layer, weight ``(C, K, D)``: each step reads one mini-batch
once and updates every candidate. The update is ``torch.optim.SGD``'s (momentum, no dampening,
no Nesterov, weight decay added to the gradient), each candidate with its own weight decay and
its own plateau rule; a candidate that has levelled off keeps its weights while the others train.
The loop is :func:`~adapters.evaluation._training.fit`'s.

It computes the same function with other floating-point operations (a batched matrix product,
one loss summed over the candidates), so its scores agree with the sequential search's to
rounding, not bit for bit. ``linear_probe(search="auto")`` uses it on CUDA only. There a probe
step is bound by the host's work per op (on an H200, 1.3 ms a step and 60,724 steps for one
evaluation's search and final fit), and the search's steps drop from the sum of the candidates'
epochs to the longest one's. CPU results stay the sequential search's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..devices import to_device
from ..progress import progress as progress_bar
from . import _training


def _stacked_logits(weight: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    """``(C, B, K)`` logits of the ``C`` stacked linear layers on ``x`` ``(B, D)``."""
    return torch.baddbmm(bias[:, None, :], x.expand(weight.shape[0], -1, -1),
                         weight.transpose(1, 2))


def val_scores(
    candidates: Sequence[float],
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    init: nn.Linear,
    *,
    standardize: nn.Module | None,
    epochs: int,
    batch_size: int,
    momentum: float,
    lr_at: Callable[[int, int, float], float],
    plateau: _training.Plateau | None,
    seed: int,
    device: torch.device,
    progress: bool | None,
) -> tuple[dict[float, float], dict[float, int]]:
    """Held-out top-1 (%) of a linear probe for each weight decay in ``candidates``, and the
    epochs each trained (up to its plateau's end, as ``fit``'s ``epochs_run``).

    Args:
        candidates: The weight decays, ``C`` of them.
        train_x, train_y: Prepared (pooled, flattened, float) training features ``(N, D)`` and
            their labels.
        val_x, val_y: The held-out features and labels.
        init: The probe every candidate starts from (``nn.Linear(D, K)``).
        standardize: The frozen z-scoring in front of the probe, or None.
        epochs, batch_size, momentum, plateau, seed, progress: As in
            :func:`~adapters.evaluation._training.fit`.
        lr_at: ``(epoch, iteration, weight_decay) -> lr`` before the plateau's reductions.
        device: Where the probes train.
    """
    c = len(candidates)
    x_all = _training.resident(train_x, device)
    y_all = train_y.long().to(x_all.device)
    weight = init.weight.detach().to(device).repeat(c, 1, 1).requires_grad_()
    bias = init.bias.detach().to(device).repeat(c, 1).requires_grad_()
    wd = to_device(torch.tensor(candidates, dtype=weight.dtype), device)
    std = standardize.to(device) if standardize is not None else None
    buffers: tuple[Tensor, Tensor] | None = None
    generator = torch.Generator().manual_seed(seed)
    n = x_all.shape[0]
    iteration = 0
    states = [_training.PlateauState(plateau) if plateau is not None else None
              for _ in candidates]
    running = [True] * c
    epochs_run = [0] * c
    rates: list[float] | None = None
    bar = progress_bar(range(epochs), enabled=progress, total=epochs,
                       desc=f"linear probe, {c} weight decays at once")
    for epoch in bar:
        if not any(running):
            break
        loss_total = torch.zeros(c, dtype=torch.float64, device=device)
        seen = 0
        order = torch.randperm(n, generator=generator).to(x_all.device)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            if index.numel() < 2:  # as fit(): BatchNorm-free, but the same batches
                continue
            now = [lr_at(epoch, iteration, w) * (st.scale if st is not None else 1.0) if r
                   else 0.0  # a stopped probe stays put
                   for w, st, r in zip(candidates, states, running, strict=True)]
            if now != rates:
                rates, lr = now, to_device(torch.tensor(now, dtype=weight.dtype), device)
            x = x_all[index].to(device, non_blocking=True)
            y = y_all[index].to(device, non_blocking=True)
            if std is not None:
                x = std(x)
            logits = _stacked_logits(weight, bias, x)
            losses = F.cross_entropy(logits.transpose(1, 2), y.expand(c, -1),
                                     reduction="none").mean(1)  # (C,): each probe's batch mean
            grad_w, grad_b = torch.autograd.grad(losses.sum(), (weight, bias))
            with torch.no_grad():
                grad_w = grad_w.add(weight * wd[:, None, None])
                grad_b = grad_b.add(bias * wd[:, None])
                if momentum == 0:
                    step_w, step_b = grad_w, grad_b
                elif buffers is None:
                    step_w, step_b = buffers = (grad_w.clone(), grad_b.clone())
                else:
                    step_w = buffers[0].mul_(momentum).add_(grad_w)
                    step_b = buffers[1].mul_(momentum).add_(grad_b)
                weight.sub_(step_w * lr[:, None, None])
                bias.sub_(step_b * lr[:, None])
            iteration += 1
            loss_total += losses.detach().double() * index.numel()
            seen += index.numel()
        means = (loss_total / max(seen, 1)).tolist()  # the epoch's one wait for the device
        for i in range(c):
            if not running[i]:
                continue
            epochs_run[i] += 1
            if seen and not math.isfinite(means[i]):
                raise FloatingPointError(
                    f"linear probe (weight decay {candidates[i]}): training loss became "
                    f"{means[i]} in epoch {epoch + 1}; lower lr or check the features for huge "
                    "values.")
            if states[i] is not None and states[i].end_epoch(means[i]):
                running[i] = False
    hits = torch.zeros(c, dtype=torch.int64, device=device)
    with torch.no_grad():
        for start in range(0, val_x.shape[0], 1024):
            x = val_x[start : start + 1024].to(device)
            y = val_y[start : start + 1024].long().to(device)
            logits = _stacked_logits(weight, bias, std(x) if std is not None else x)
            hits += (logits.argmax(2) == y).sum(1)
    top1 = {wd: 100.0 * h / val_x.shape[0] for wd, h in zip(candidates, hits.tolist())}
    return top1, dict(zip(candidates, epochs_run))
