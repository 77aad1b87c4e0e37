"""SeLa's Sinkhorn-Knopp (adapters/ops/sinkhorn.py): equipartition in float64, convergence,
errors, and how it relates to lightly's SwAV sinkhorn."""

from __future__ import annotations

import pytest
import torch

from adapters.ops.sinkhorn import sela_sinkhorn


def _probs(n: int, k: int, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(scale * torch.randn(n, k, generator=g, dtype=torch.float64), 1)


# -- Sinkhorn-Knopp ----------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(1000, 10), (1003, 7)])  # N divisible and not divisible by K
def test_sinkhorn_equipartition_float64_converges(n, k):
    probs = _probs(n, k)
    res = sela_sinkhorn(probs, lamb=25, tol=1e-2, return_plan=True)
    assert res.plan.dtype == torch.float64 and res.r.dtype == res.c.dtype == torch.float64
    assert res.error <= 1e-2 and res.iterations % 10 == 1  # checked at iterations 1, 11, 21...
    # Plan marginals: every sample has mass 1/N exactly, every cluster N/K samples within one.
    torch.testing.assert_close(res.plan.sum(1) * n, torch.ones(n, dtype=torch.float64))
    assert ((res.plan.sum(0) * n - n / k).abs() < 1).all()
    # Labels are the argmax of the plan.
    assert torch.equal(res.labels, res.plan.argmax(1))
    # The hard labels are near-balanced (argmax of a soft plan is not exactly balanced).
    sizes = torch.bincount(res.labels, minlength=k)
    assert sizes.min() >= 0.9 * n / k and sizes.max() <= 1.1 * n / k
    # A tighter tolerance changes nothing essential and still converges.
    tight = sela_sinkhorn(probs, lamb=25, tol=1e-6)
    assert tight.error <= 1e-6 and (tight.labels == res.labels).float().mean() > 0.95


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sinkhorn_argmax_over_row_blocks_equals_the_whole_matrix(monkeypatch, dtype):
    """The labels are taken block by block (no (N, K) product beside P): blocks of 64 rows,
    the last one short, give the argmax of the whole plan, and the cost of the input's own
    probabilities at those labels."""
    import adapters.ops.sinkhorn as sk

    probs = _probs(1000, 7).to(dtype)
    whole = sela_sinkhorn(probs, lamb=25, return_plan=True)
    monkeypatch.setattr(sk, "_BLOCK_ENTRIES", 64 * 7)  # 64 rows of 7 clusters
    blocks = sela_sinkhorn(probs, lamb=25)
    assert torch.equal(blocks.labels, whole.plan.argmax(1))
    chosen = probs.double().gather(1, blocks.labels[:, None])
    assert blocks.cost == float(-chosen.log().mean())


def test_sinkhorn_balances_a_collapsed_problem():
    # Every sample prefers cluster 0: plain argmax puts all in one cluster, SK spreads them.
    probs = _probs(500, 5, scale=0.5)
    probs[:, 0] += 2.0
    probs /= probs.sum(1, keepdim=True)
    assert torch.equal(probs.argmax(1), torch.zeros(500, dtype=torch.long))
    res = sela_sinkhorn(probs, lamb=10, return_plan=True)
    assert ((res.plan.sum(0) * 500 - 100).abs() < 1).all()
    assert torch.bincount(res.labels, minlength=5).min() > 50


def test_sinkhorn_errors_name_the_fix():
    probs = _probs(50, 4)
    probs[:, 3] = 0.0
    with pytest.raises(ValueError, match="lower lamb|Lower"):
        sela_sinkhorn(probs / probs.sum(1, keepdim=True), lamb=10)
    for bad in (float("nan"), float("inf"), -0.5):
        one_bad = _probs(5, 2)
        one_bad[3, 1] = bad
        with pytest.raises(ValueError, match="negative or non-finite"):
            sela_sinkhorn(one_bad, lamb=10)
    with pytest.raises(RuntimeError, match="did not converge"):
        sela_sinkhorn(_probs(200, 10), lamb=25, tol=1e-12, max_iters=20)


def test_lightly_sinkhorn_matches_only_with_the_same_iterations_in_float64():
    """lightly's SwAV sinkhorn is the same scaling (row, then column) of exp(log p / eps) =
    p ** lamb: run for SeLa's iteration count in float64 it gives SeLa's labels. With its own
    fixed 3 iterations it does not, and in float32 p ** 25 underflows (NaN codes). So SeLa does
    not reuse it: it needs the tolerance-controlled float64 run."""
    from lightly.loss.swav_loss import sinkhorn as lightly_sinkhorn

    probs = _probs(2000, 50)
    ours = sela_sinkhorn(probs, lamb=25)
    same = lightly_sinkhorn(probs.log(), iterations=ours.iterations, epsilon=1 / 25)
    assert torch.equal(same.argmax(1), ours.labels)
    three = lightly_sinkhorn(probs.log(), iterations=3, epsilon=1 / 25)
    assert (three.argmax(1) != ours.labels).float().mean() > 0.01
    # Near-uniform p ~ 1/100: p ** 25 ~ 1e-50 is 0 in float32.
    flat = _probs(500, 100, scale=0.1)
    f32 = lightly_sinkhorn(flat.log().float(), iterations=3, epsilon=1 / 25)
    assert not torch.isfinite(f32).all()
    assert sela_sinkhorn(flat, lamb=25).labels.shape == (500,)
