"""SeLa's Sinkhorn-Knopp: equipartitioned pseudo-labels from class probabilities, in float64.

The solver of Asano et al. (ICLR 2020) as ``yukimasano/self-label`` ``cifar.py``
(``optimize_L_sk``) runs it; ``adapters/methods/sela.py`` calls it at every label step (see
``docs/methods/sela.md``). Where it differs from the original, the comment at the line says so.

Not lightly's: ``lightly.loss.swav_loss.sinkhorn`` balances the same matrix (``exp(out / eps)``
with ``out = log p``, ``eps = 1 / lamb``) with the same row-then-column updates, so run for the
same number of iterations in float64 it gives the same labels (``tests/adapters/methods/
test_sela.py`` checks this), but it runs a fixed number of iterations (default 3) with no
convergence test, in the input's dtype (float32 underflows for ``p ** 25``), and returns SwAV's
soft codes. SeLa needs the tolerance-controlled float64 run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SinkhornResult", "sela_sinkhorn"]

# Entries per block of the final argmax (2**22: 32 MB of float64): it holds one block of P r.
_BLOCK_ENTRIES = 1 << 22


@dataclass
class SinkhornResult:
    """What :func:`sela_sinkhorn` returns.

    Attributes:
        labels: ``(N,)`` int64, argmax over clusters of the transport plan.
        r: ``(K,)`` float64 cluster scaling.
        c: ``(N,)`` float64 sample scaling; the plan is ``c[:, None] * probs**lamb * r[None]``.
        iterations: Sinkhorn iterations run (``1 + check_every * m``).
        error: ``sum |c / c_new - 1|`` at the last check (``<= tol``).
        cost: ``-mean(log probs[n, labels[n]])``, the cost cifar.py prints.
        plan: The ``(N, K)`` float64 transport plan (rows sum to ``1/N``, columns to about
            ``1/K``) when asked for with ``return_plan=True``, else None.
    """

    labels: Tensor
    r: Tensor
    c: Tensor
    iterations: int
    error: float
    cost: float
    plan: Tensor | None = None


@torch.no_grad()
def sela_sinkhorn(
    probs: Tensor,
    lamb: float,
    tol: float = 1e-2,
    check_every: int = 10,
    max_iters: int = 100_000,
    return_plan: bool = False,
) -> SinkhornResult:
    """SeLa's Sinkhorn-Knopp: equipartitioned pseudo-labels from class probabilities.

    Solves ``max_Q <Q, log P>`` + entropy over transport plans with uniform marginals
    (``N`` samples, ``K`` clusters, each cluster ``N/K`` samples) by scaling ``P ** lamb`` as
    ``yukimasano/self-label`` ``cifar.py`` ``optimize_L_sk`` does, in float64::

        c = 1/N;  repeat: r = (1/K) / (P^T c);  c_new = (1/N) / (P r)
        every check_every-th iteration (the 1st, 11th, ...): err = sum |c / c_new - 1|
        stop when err <= tol;  labels = argmax_k c_n P_nk r_k

    Args:
        probs: ``(N, K)`` non-negative probabilities (softmax of the head's logits); converted
            to float64 first (pass float64 to keep the precision of the softmax).
        lamb: The power ``lambda = 1 / epsilon`` (cifar.py default 10, main.py 25).
        tol: Convergence tolerance on ``sum |c / c_new - 1|`` (cifar.py 1e-2, main.py 1e-1).
        check_every: Iterations between convergence checks (10 in the original).
        max_iters: Raise if not converged after this many iterations.
        return_plan: Also return the ``(N, K)`` transport plan.

    Memory: the caller's ``probs`` and one float64 ``(N, K)`` working copy, ``P ** lamb``; the
    plan, when asked for, is that copy scaled in place. So 16 bytes per entry with a float64
    input and 12 with float32, plus ``O(N + K)`` (``benchmarks/studies/clustering_scale.py``
    measures it).

    Returns:
        :class:`SinkhornResult` (labels on ``probs.device``).

    Raises:
        ValueError: Bad shapes/values, or a cluster whose ``p ** lamb`` underflows to 0 for
            every sample (lower ``lamb``).
        RuntimeError: No convergence within ``max_iters``.

    Example:
        >>> probs = torch.softmax(torch.randn(100, 10, dtype=torch.float64), 1)
        >>> res = sela_sinkhorn(probs, lamb=25)
        >>> res.labels.shape, res.error <= 1e-2
        (torch.Size([100]), True)
    """
    if probs.ndim != 2 or min(probs.shape) < 1:
        raise ValueError(f"probs must be a non-empty (N, K) matrix, got shape {tuple(probs.shape)}")
    if not (lamb > 0 and math.isfinite(lamb)):
        raise ValueError(f"lamb must be a positive finite number (e.g. 10 or 25), got {lamb!r}")
    if not tol > 0 or check_every < 1 or max_iters < 1:
        raise ValueError(
            f"need tol > 0, check_every >= 1, max_iters >= 1; got {tol}, {check_every}, "
            f"{max_iters}"
        )
    n, k = probs.shape
    p = probs.to(torch.float64, copy=True)
    # min/max rather than isfinite(p) / p < 0: no (N, K) boolean transients (NaN propagates).
    if not (float(p.amin()) >= 0 and math.isfinite(float(p.amax()))):
        raise ValueError(
            "probs has negative or non-finite entries; pass softmax probabilities (check the "
            "features and head weights for NaN/inf)"
        )
    p.pow_(lamb)  # P ** lambda, (N, K)
    # Deviation: a cluster whose p ** lamb underflows to 0 on every image makes cifar.py produce
    # NaN labels; here it is an error that says to lower lamb.
    dead = (p.sum(0) == 0).nonzero().flatten()
    if dead.numel():
        raise ValueError(
            f"{dead.numel()} of {k} clusters have p ** lamb == 0 (float64 underflow) for every "
            f"sample, e.g. cluster {int(dead[0])}; Sinkhorn-Knopp cannot give them mass. Lower "
            f"lamb (now {lamb}) or check the head for collapse."
        )
    if (p.sum(1) == 0).any():
        raise ValueError(
            f"some samples have p ** lamb == 0 for every cluster (float64 underflow); lower lamb "
            f"(now {lamb})"
        )
    inv_k, inv_n = 1.0 / k, 1.0 / n
    c = torch.full((n,), inv_n, dtype=torch.float64, device=p.device)
    err = math.inf
    iterations = 0
    while err > tol:
        # Deviation: cifar.py loops until converged with no bound; max_iters bounds it.
        if iterations >= max_iters:
            raise RuntimeError(
                f"Sinkhorn-Knopp did not converge in {max_iters} iterations (error {err:.3g} > "
                f"tol {tol}); raise max_sk_iters or tol, or lower lamb ({lamb})"
            )
        r = inv_k / (p.T @ c)
        c_new = inv_n / (p @ r)
        if iterations % check_every == 0:
            err = float((c / c_new - 1).abs().sum())
            if not math.isfinite(err):
                raise ValueError(
                    f"Sinkhorn-Knopp diverged to a non-finite error at iteration {iterations + 1}"
                    f" (lamb {lamb}); lower lamb"
                )
        c = c_new
        iterations += 1
    # c_n is constant along a row: the argmax of P r is the plan's. Taken over blocks of rows in
    # one reused buffer, so no (N, K) product is held beside P (the same labels as one argmax
    # over the whole matrix; a new buffer per block left the freed ones in the heap on Linux).
    rows = min(n, max(1, _BLOCK_ENTRIES // k))
    labels = torch.empty(n, dtype=torch.long, device=p.device)
    buffer = torch.empty(rows, k, dtype=torch.float64, device=p.device)
    for start in range(0, n, rows):
        block = p[start:start + rows]
        m = block.shape[0]
        torch.argmax(torch.mul(block, r, out=buffer[:m]), dim=1, out=labels[start:start + m])
    chosen = probs.gather(1, labels[:, None]).squeeze(1).to(torch.float64)
    cost = float(-chosen.log().mean())
    plan = p.mul_(r).mul_(c[:, None]) if return_plan else None
    return SinkhornResult(labels, r, c, iterations, err, cost, plan)
