"""PCA-whitening and k-means for DeepCluster (adapters/ops/kmeans.py): the torch version against
brute force and faiss, empty-cluster splits, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapters.ops.kmeans import (
    SPLIT_EPS,
    _split_empty_clusters,
    faiss_available,
    kmeans,
    kmeans_faiss,
    kmeans_torch,
    pca_whiten,
    preprocess_features,
    resolve_backend,
)
from adapters.ops.nmi import nmi

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")  # comparable timings, deterministic sums


def _anisotropic(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -1, d)
    return torch.randn(n, d, generator=g) * scales + torch.randn(d, generator=g)


def _blobs(n: int, centers: int, d: int, spread: float = 0.05, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, d, generator=g) * 3
    labels = torch.arange(n) % centers
    return c[labels] + spread * torch.randn(n, d, generator=g), labels


def _align_signs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` with each column's sign flipped to agree with ``b`` (eigenvector signs are free)."""
    return a * torch.sign((a * b).sum(0, keepdim=True))


# ------------------------------------------------------------------------------------ PCA


@pytest.mark.parametrize("n, d, dim", [(400, 48, 16), (60, 100, 20)])
def test_pca_whiten_matches_svd_reference(n, d, dim):
    x = _anisotropic(n, d).double()
    xc = x - x.mean(0)
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    # x_c V_i / sqrt(eig_i) with eig_i = s_i^2 of the scatter matrix = U_i.
    reference = u[:, :dim]
    ours = pca_whiten(x.float(), dim).double()
    torch.testing.assert_close(_align_signs(ours, reference), reference, atol=2e-4, rtol=1e-3)
    # Whitened: each column has unit sum of squares and columns are uncorrelated.
    torch.testing.assert_close(
        ours.T @ ours, torch.eye(dim, dtype=torch.float64), atol=2e-3, rtol=0
    )


@needs_faiss
@pytest.mark.parametrize("n, d, dim", [(400, 48, 16), (60, 100, 20)])
def test_pca_whiten_matches_faiss_pcamatrix(n, d, dim):
    import faiss

    x = _anisotropic(n, d, seed=1)
    mat = faiss.PCAMatrix(d, dim, -0.5)
    mat.train(x.numpy())
    reference = torch.from_numpy(mat.apply_py(x.numpy()))
    ours = pca_whiten(x, dim)
    torch.testing.assert_close(_align_signs(ours, reference), reference, atol=2e-4, rtol=1e-3)


def test_preprocess_features_unit_rows():
    z = preprocess_features(_anisotropic(300, 40), 16)
    assert z.shape == (300, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(300))


def test_pca_errors_name_the_fix():
    with pytest.raises(ValueError, match="at most 8"):
        pca_whiten(torch.randn(100, 8), 16)
    with pytest.raises(ValueError, match="more than 16 samples"):
        pca_whiten(torch.randn(16, 32), 16)
    low_rank = torch.randn(200, 3) @ torch.randn(3, 32)
    with pytest.raises(ValueError, match="only 3 non-degenerate directions.*pca_epsilon"):
        pca_whiten(low_rank, 8)


def test_pca_epsilon_regularises_degenerate_directions():
    torch.manual_seed(0)
    low_rank = torch.randn(200, 3) @ torch.randn(3, 32)
    z = pca_whiten(low_rank, 8, epsilon=1e-3)
    assert torch.isfinite(z).all()
    # the 3 real directions keep (nearly) unit scatter; the degenerate ones stay near zero
    scatter = (z * z).sum(0)
    assert torch.all(scatter[:3] > 0.99) and torch.all(scatter[3:] < 1e-6)
    # on full-rank data a tiny epsilon is (nearly) the exact transform
    x = torch.randn(300, 16)
    torch.testing.assert_close(pca_whiten(x, 8, epsilon=1e-9).abs(), pca_whiten(x, 8).abs(),
                               atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=">= 0"):
        pca_whiten(x, 8, epsilon=-1.0)


# ------------------------------------------------------------------------------------ k-means


def _lloyd_reference(x: np.ndarray, init: np.ndarray, niter: int) -> np.ndarray:
    """Brute-force Lloyd in float64 (no empty clusters expected), final nearest-centroid."""
    c = init.astype(np.float64)
    for _ in range(niter):
        a = ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x[a == j].mean(0) for j in range(len(c))])
    return ((x[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)


def test_kmeans_torch_matches_brute_force_lloyd():
    x, _ = _blobs(600, 8, 6, spread=1.0)  # overlapping blobs: several Lloyd iterations
    init = x[:12].clone()
    ours = kmeans_torch(x, 12, niter=20, init=init)
    ref = _lloyd_reference(x.double().numpy(), init.numpy(), 20)
    assert (ours.assignments.numpy() == ref).mean() >= 0.995
    assert ours.splits == 0


@needs_faiss
def test_kmeans_torch_matches_faiss_same_init():
    x, _ = _blobs(1500, 10, 16, spread=1.5, seed=2)
    init = x[torch.randperm(1500, generator=torch.Generator().manual_seed(0))[:20]].clone()
    ours = kmeans_torch(x, 20, niter=20, init=init)
    theirs = kmeans_faiss(x, 20, niter=20, init=init)
    assert (ours.assignments == theirs.assignments).float().mean() >= 0.995
    assert ours.objective[-1] == pytest.approx(theirs.objective[-1], rel=1e-4)


@needs_faiss
def test_kmeans_torch_and_faiss_find_the_same_blobs():
    x, truth = _blobs(1000, 10, 32, seed=3)
    z = preprocess_features(x, 16)
    for backend in ("torch", "faiss"):
        res = kmeans(z, 10, niter=20, seed=5, backend=backend)
        # Random init can merge two blobs; allow that, but the partition must be near-perfect.
        assert nmi(res.assignments, truth) > 0.9, backend


def test_kmeans_seed_determinism_and_fixed_point_stop():
    x, _ = _blobs(500, 5, 8, spread=0.5)
    a = kmeans_torch(x, 5, niter=20, seed=1)
    b = kmeans_torch(x, 5, niter=20, seed=1)
    assert torch.equal(a.assignments, b.assignments) and a.objective == b.objective
    assert len(a.objective) < 20  # well separated: converged, stopped early
    full = kmeans_torch(x, 5, niter=len(a.objective) + 5, seed=1)
    assert torch.equal(full.assignments, a.assignments)


def test_kmeans_splits_empty_clusters():
    x, truth = _blobs(400, 4, 8, seed=4)
    # Two duplicated initial centroids: ties go to the lower index, so clusters 2 and 3 are
    # empty after the first assignment and must be re-created by splitting.
    init = torch.stack([x[0], x[1], x[0], x[1]])
    res = kmeans_torch(x, 4, niter=20, init=init)
    assert res.splits >= 2
    assert torch.bincount(res.assignments, minlength=4).min() > 0
    if faiss_available():
        assert kmeans_faiss(x, 4, niter=20, init=init).splits >= 2


def test_split_rule_copies_and_perturbs_a_big_cluster():
    centroids = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [4.0, 4.0, 4.0]])
    counts = torch.tensor([10, 0, 1])  # cluster 2 has size 1: weight 0, never split
    n = _split_empty_clusters(centroids, counts, 11, torch.Generator().manual_seed(0))
    assert n == 1
    eps = SPLIT_EPS
    torch.testing.assert_close(centroids[1], torch.tensor([1 + eps, 2 * (1 - eps), 3 * (1 + eps)]))
    torch.testing.assert_close(centroids[0], torch.tensor([1 - eps, 2 * (1 + eps), 3 * (1 - eps)]))
    torch.testing.assert_close(centroids[2], torch.tensor([4.0, 4.0, 4.0]))


def test_kmeans_input_errors():
    with pytest.raises(ValueError, match="needs more than k points"):
        kmeans_torch(torch.randn(5, 3), 5)
    with pytest.raises(ValueError, match="NaN"):
        kmeans_torch(torch.full((10, 3), float("nan")), 2)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("sklearn")
    assert resolve_backend("auto") == "torch"
