"""DeepCluster's clustering step: PCA-whitening + L2 normalisation, then k-means (torch or faiss).

Follows ``facebookresearch/deepcluster`` (commit 2d1927e) ``clustering.py``:
``preprocess_features`` (``faiss.PCAMatrix(d, 256, eigen_power=-0.5)``, then L2-normalised rows)
and ``run_kmeans`` (``faiss.Clustering(d, k)`` with ``niter=20``,
``max_points_per_centroid=10_000_000`` so nothing is subsampled, a new seed per call, and the
final assignment recomputed against the final centroids with ``index.search(x, 1)``).

The k-means loop of :func:`kmeans_torch` is the one of faiss ``Clustering::train_encoded``
(``faiss/Clustering.cpp``): centroids initialised with ``k`` distinct random training points;
each iteration assigns every point to its nearest centroid (squared L2), records the objective
(sum of squared distances), recomputes each centroid as the mean of its points and then
re-creates every empty centroid by splitting a large cluster (``split_clusters``: copy a
centroid ``cj`` chosen with probability proportional to ``size(cj) - 1``, perturb the copy by
``(1 + eps, 1 - eps, ...)`` and ``cj`` by ``(1 - eps, 1 + eps, ...)`` with ``eps = 1/1024``,
and halve the cluster's recorded size). Deviations from faiss:

- Random numbers come from a ``torch.Generator`` seeded with ``seed``, not from faiss'
  generators, so a given seed does not give faiss' initial centroids (pass ``init`` to both to
  compare them exactly).
- faiss picks the cluster to split by scanning the clusters cyclically with one Bernoulli draw
  each (``p = (size - 1) / (n - k)``); here it is drawn directly from the distribution
  ``(size - 1) / sum(size - 1)`` (``torch.multinomial``), the distribution that scan
  approximates, without a Python loop over ``k`` clusters per empty cluster.
- Iterations stop at a fixed point: when an assignment equals the previous one and the
  previous update split no cluster, the centroids can no longer change, so the remaining
  iterations would repeat it (the result is the same as running all ``niter``). The installed
  faiss (1.15) stops there too ("objective did not change"); the ``Clustering.cpp`` read for
  this port runs all ``niter``, with the same result.
- Squared distances below zero (float rounding of ``|x|^2 - 2 x.c + |c|^2``) count as zero in
  the objective; assignments are unaffected.

PCA (:func:`pca_whiten`) deviates from ``faiss.PCAMatrix`` only numerically: the scatter matrix
is accumulated in float64 from mean-centred float32 chunks (faiss: float32 ``X^T X - n m m^T``)
and diagonalised in float64, and a component whose eigenvalue is at rounding level raises an
error (faiss would scale it by ~1/sqrt(0) and k-means would then fail on Inf/NaN).

As in the original, the *final* assignment (nearest final centroid) can still leave clusters
empty: splitting happens inside the iterations only. DeepCluster's sampler skips them.

Example:
    >>> x = torch.randn(2000, 512)
    >>> z = preprocess_features(x, 64)  # (2000, 64), whitened, rows of unit norm
    >>> res = kmeans(z, k=10, niter=20, seed=0, backend="torch")
    >>> res.assignments.shape, res.centroids.shape, len(res.objective) <= 20
    (torch.Size([2000]), torch.Size([10, 64]), True)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from adapters.devices import torch_threads

__all__ = [
    "BACKENDS",
    "KMeansResult",
    "faiss_available",
    "kmeans",
    "kmeans_faiss",
    "kmeans_torch",
    "nearest_centroid",
    "pca_whiten",
    "preprocess_features",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "faiss")
#: Perturbation of split centroids, as faiss' ``EPS`` ("a bit above machine epsilon for float16").
SPLIT_EPS = 1.0 / 1024.0
#: Whitening refuses components whose eigenvalue is below this fraction of the largest one
#: (float32 rounding noise; whitening would blow it up to unit variance).
EIGEN_RTOL = 1e-6
_CHUNK_ELEMENTS = 1 << 24  # rows x centroids per distance block (64 MiB in float32)


@dataclass
class KMeansResult:
    """Output of :func:`kmeans`.

    Attributes:
        assignments: ``(N,)`` int64, index of each point's nearest final centroid (on the
            device of the input).
        centroids: ``(k, d)`` float32 final centroids.
        objective: Sum of squared distances to the assigned centroid at each iteration (before
            that iteration's update), as faiss' ``iteration_stats[i].obj``. Shorter than
            ``niter`` when the iterations reached a fixed point (see :func:`kmeans_torch`).
        splits: Number of empty-cluster splits performed over all iterations.
    """

    assignments: Tensor
    centroids: Tensor
    objective: list[float]
    splits: int


def faiss_available() -> bool:
    """Whether ``import faiss`` would succeed (checked without importing it)."""
    return importlib.util.find_spec("faiss") is not None


def resolve_backend(backend: str) -> str:
    """The k-means implementation that ``backend`` names: ``"torch"`` or ``"faiss"``.

    ``"auto"`` is torch: it runs where the features are (GPU when there is one) and needs no
    extra package; faiss stays optional. On the CPU faiss is faster: this project's benchmark
    (``benchmarks/studies/kmeans.py``, 10k/50k x 256 points, k = 100/1000, 2 threads;
    ``benchmarks/results/kmeans-cpu.txt``) has torch at 1.16-1.64x faiss-cpu's time (an
    earlier machine gave 0.5-1.4x), and ``clustering-scale-cpu.txt`` 1.3-1.5x at N = 160k.
    """
    if backend not in BACKENDS:
        raise ValueError(f"kmeans backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "faiss" and not faiss_available():
        raise ImportError(
            "kmeans_backend='faiss' needs the faiss package; install it with "
            "`pip install faiss-cpu` (or `pip install recon-aux[faiss]`), or use "
            "kmeans_backend='torch'"
        )
    return "torch" if backend == "auto" else backend


# ------------------------------------------------------------------------------------ PCA


def pca_whiten(
    x: Tensor,
    dim: int = 256,
    eigen_power: float = -0.5,
    device: torch.device | str | None = None,
    chunk_rows: int = 65536,
    epsilon: float = 0.0,
) -> Tensor:
    """PCA projection to ``dim`` components, each scaled by ``eigenvalue ** eigen_power``.

    Same transform as ``faiss.PCAMatrix(d, dim, eigen_power)`` trained on all of ``x`` (DeepCluster
    ``clustering.preprocess_features``): the eigenvalues are those of the *scatter* matrix
    ``sum_i (x_i - mean)(x_i - mean)^T`` (not divided by N), so with ``eigen_power=-0.5`` each
    output column has a sum of squares of 1 over the data set. Eigenvector signs are arbitrary
    (they do not change distances). Rows are processed in chunks of ``chunk_rows`` on ``device``,
    so ``x`` may stay on the CPU while the arithmetic runs on a GPU; the scatter matrix is
    accumulated in float64 and diagonalised in float64. With fewer samples than dimensions
    (``N < D``) the ``N x N`` Gram matrix is diagonalised instead, as faiss does.

    Args:
        x: ``(N, D)`` features.
        dim: Number of components kept; needs ``dim <= D`` and ``dim < N``.
        eigen_power: Exponent of the eigenvalue scaling (-0.5: whitening, 0: plain PCA).
        epsilon: Added to every eigenvalue before the scaling, as a fraction of the largest
            eigenvalue (faiss' ``PCAMatrix.epsilon`` is the same regulariser in absolute units;
            the original DeepCluster leaves it at 0). 0 keeps the exact transform and makes
            degenerate features an error; > 0 whitens degenerate directions by at most
            ``(epsilon * largest) ** eigen_power`` instead of amplifying rounding noise.
        device: Where to compute (default: ``x.device``).
        chunk_rows: Rows per chunk.

    Returns:
        ``(N, dim)`` float32 on ``device``.

    Raises:
        ValueError: ``dim`` too large for the data, or the data have fewer than ``dim``
            non-degenerate directions (whitening would amplify rounding noise).
    """
    if x.ndim != 2:
        raise ValueError(f"pca_whiten expects (N, D) features, got shape {tuple(x.shape)}")
    n, d = x.shape
    if not 1 <= dim <= d:
        raise ValueError(
            f"cannot keep {dim} PCA components of {d}-dimensional features; set the PCA "
            f"dimension (DeepCluster: method.pca_dim) to at most {d}"
        )
    if n <= dim:
        raise ValueError(
            f"PCA to {dim} components needs more than {dim} samples, got {n}; use more training "
            f"images or a smaller PCA dimension (method.pca_dim < {n})"
        )
    device = torch.device(device) if device is not None else x.device
    mean = torch.zeros(d, dtype=torch.float64, device=device)
    for start in range(0, n, chunk_rows):
        mean += x[start : start + chunk_rows].to(device, torch.float64).sum(0)
    mean /= n
    mean32 = mean.float()
    gram = n < d
    if gram:
        # Fewer samples than dimensions (faiss' other branch): diagonalise the n x n Gram matrix
        # Xc Xc^T, whose non-zero eigenvalues are the scatter matrix's.
        xc = x.to(device, torch.float32) - mean32
        matrix = (xc @ xc.T).double()
    else:
        matrix = torch.zeros(d, d, dtype=torch.float64, device=device)  # scatter Xc^T Xc
        for start in range(0, n, chunk_rows):
            xc = x[start : start + chunk_rows].to(device, torch.float32) - mean32
            matrix += (xc.T @ xc).double()
    if not torch.isfinite(matrix).all():
        raise ValueError("features contain NaN or Inf; check the backbone's outputs")
    if matrix.device.type == "cpu":
        # Single-threaded on the CPU: multi-threaded LAPACK eigh was measured 10-40x *slower*
        # than one thread on a shared 2-core machine (1024 x 1024 float64: 21 s vs 0.55 s).
        with torch_threads(1):
            eigenvalues, eigenvectors = torch.linalg.eigh(matrix)  # ascending
    else:
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    eigenvalues = eigenvalues.flip(0)[:dim]
    eigenvectors = eigenvectors.flip(1)[:, :dim]
    top = float(eigenvalues[0])
    if epsilon < 0:
        raise ValueError(f"PCA epsilon={epsilon} must be >= 0 (a fraction of the top eigenvalue)")
    if epsilon > 0:
        eigenvalues = eigenvalues.clamp_min(0) + epsilon * top
    elif not eigenvalues[-1] > EIGEN_RTOL * top:
        rank = int((eigenvalues > EIGEN_RTOL * top).sum())
        raise ValueError(
            f"the features span only {rank} non-degenerate directions (eigenvalues above "
            f"{EIGEN_RTOL:g} x the largest), fewer than the {dim} PCA components to whiten; "
            "lower the PCA dimension (method.pca_dim), cluster a wider layer, or regularise "
            "the whitening (method.pca_epsilon, e.g. 1e-3)"
        )
    if gram:
        # Components V = Xc^T U diag(eig)^-1/2 (unit columns), so the output
        # Xc V diag(eig)^p = U diag(eig)^(p + 1/2): the Gram eigenvectors themselves when whitening.
        return (eigenvectors * eigenvalues.pow(eigen_power + 0.5)).float()
    transform = (eigenvectors * eigenvalues.pow(eigen_power)).float()  # (D, dim)
    out = torch.empty(n, dim, dtype=torch.float32, device=device)
    for start in range(0, n, chunk_rows):
        xc = x[start : start + chunk_rows].to(device, torch.float32) - mean32
        out[start : start + chunk_rows] = xc @ transform
    return out


def preprocess_features(
    x: Tensor, pca_dim: int = 256, device: torch.device | str | None = None,
    epsilon: float = 0.0,
) -> Tensor:
    """DeepCluster's ``preprocess_features``: PCA-whitening to ``pca_dim``, then unit-L2 rows.

    Args:
        x: ``(N, D)`` features.
        pca_dim: Output dimension (DeepCluster: 256).
        device: Where to compute (default: ``x.device``).
        epsilon: Whitening regulariser, a fraction of the top eigenvalue (see :func:`pca_whiten`).

    Returns:
        ``(N, pca_dim)`` float32 rows of norm 1.
    """
    z = pca_whiten(x, pca_dim, -0.5, device=device, epsilon=epsilon)
    norms = z.norm(dim=1, keepdim=True)
    if not bool((norms > 0).all()):
        bad = int((norms == 0).sum())
        raise ValueError(
            f"{bad} feature rows are exactly the data mean after PCA and cannot be L2-normalised;"
            " the backbone maps different images to identical features (check its inputs)"
        )
    return z / norms


# ------------------------------------------------------------------------------------ k-means


def nearest_centroid(
    x: Tensor, centroids: Tensor, x_sq: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Squared L2 distance to, and index of, each row's nearest centroid.

    Computed as ``|x|^2 - 2 x.c + |c|^2`` block by block (as faiss' BLAS path); ties go to the
    lowest index. Negative rounding results are reported as 0.

    Args:
        x: ``(N, d)`` float32.
        centroids: ``(k, d)`` float32 on the same device.
        x_sq: Optional precomputed ``(x * x).sum(1)``.

    Returns:
        ``(distances (N,) float32, indices (N,) int64)``.
    """
    n, k = x.shape[0], centroids.shape[0]
    c_norms = (centroids * centroids).sum(1)
    if x_sq is None:
        x_sq = (x * x).sum(1)
    rows = max(1, _CHUNK_ELEMENTS // max(k, 1))
    dist = torch.empty(n, dtype=torch.float32, device=x.device)
    idx = torch.empty(n, dtype=torch.int64, device=x.device)
    for start in range(0, n, rows):
        xb = x[start : start + rows]
        scores = torch.addmm(c_norms, xb, centroids.T, beta=1.0, alpha=-2.0)  # |c|^2 - 2 x.c
        best, arg = scores.min(dim=1)
        dist[start : start + rows] = (best + x_sq[start : start + rows]).clamp_min_(0.0)
        idx[start : start + rows] = arg
    return dist, idx


def _split_empty_clusters(
    centroids: Tensor, counts: Tensor, n: int, generator: torch.Generator
) -> int:
    """faiss ``split_clusters``: re-create each empty centroid from a big cluster (in place)."""
    k, d = centroids.shape
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return 0
    sizes = counts.double().cpu()  # "hassign", updated as clusters are split
    sign = torch.ones(d, dtype=centroids.dtype, device=centroids.device)
    sign[1::2] = -1.0  # +eps on even dimensions of the new centroid, -eps on odd ones
    for ci in empty:
        weights = (sizes - 1.0).clamp_min(0.0)
        if not float(weights.sum()) > 0:  # pragma: no cover - impossible when n > k
            raise RuntimeError(f"k-means: no cluster large enough to split ({n} points, k={k})")
        cj = int(torch.multinomial(weights, 1, generator=generator))
        centroids[ci] = centroids[cj] * (1.0 + SPLIT_EPS * sign)
        centroids[cj] = centroids[cj] * (1.0 - SPLIT_EPS * sign)
        sizes[ci] = sizes[cj] / 2.0
        sizes[cj] -= sizes[ci]
    return len(empty)


def kmeans_torch(
    x: Tensor,
    k: int,
    niter: int = 20,
    seed: int = 0,
    init: Tensor | None = None,
) -> KMeansResult:
    """Lloyd's k-means with faiss' initialisation and empty-cluster splitting, in torch.

    Runs on ``x.device``. Deterministic for a given seed, input, device and thread count.

    Args:
        x: ``(N, d)`` float32 points, ``N > k``.
        k: Number of clusters.
        niter: Lloyd iterations (DeepCluster: 20).
        seed: Seed of the initial centroids and of the split choices.
        init: Optional ``(k, d)`` initial centroids (replaces the random initialisation).

    Returns:
        :class:`KMeansResult`; ``assignments`` are w.r.t. the final centroids.
    """
    x = _check_points(x, k)
    n, d = x.shape
    generator = torch.Generator().manual_seed(int(seed))
    if init is None:
        perm = torch.randperm(n, generator=generator)[:k].to(x.device)
        centroids = x[perm].clone()
    else:
        centroids = _check_init(init, k, d).to(x.device, torch.float32).clone()
    objective: list[float] = []
    splits = 0
    previous: Tensor | None = None
    converged = False
    x_sq = (x * x).sum(1)
    for _ in range(int(niter)):
        dist, assign = nearest_centroid(x, centroids, x_sq)
        objective.append(float(dist.double().sum()))
        if previous is not None and torch.equal(assign, previous):
            # Fixed point: the last update split nothing (else the assignment would have
            # changed), so these centroids are the means of this very assignment and every
            # further iteration would repeat it. faiss stops here too ("objective did not
            # change"); stopping changes no result, only skips work.
            converged = True
            break
        counts = torch.bincount(assign, minlength=k)
        centroids = torch.where(
            (counts > 0)[:, None],
            _cluster_sums(x, assign, k) / counts.clamp_min(1)[:, None],
            centroids,
        )
        new_splits = _split_empty_clusters(centroids, counts, n, generator)
        splits += new_splits
        previous = assign if new_splits == 0 else None
    if not converged:
        _, assign = nearest_centroid(x, centroids, x_sq)
    return KMeansResult(assign, centroids, objective, splits)


def _cluster_sums(x: Tensor, assign: Tensor, k: int) -> Tensor:
    """``(k, d)`` sum of the points of each cluster."""
    if x.device.type == "cpu":
        # A (k x N) one-hot sparse matrix times x: several times faster than index_add_ on the
        # CPU (measured: 10k x 256 points, k=1000).
        n = x.shape[0]
        rows = torch.stack([assign, torch.arange(n, device=x.device)])
        onehot = torch.sparse_coo_tensor(
            rows, torch.ones(n, dtype=x.dtype), (k, n), check_invariants=False
        )
        return torch.sparse.mm(onehot, x)
    return torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assign, x)


def kmeans_faiss(
    x: Tensor,
    k: int,
    niter: int = 20,
    seed: int = 0,
    init: Tensor | None = None,
) -> KMeansResult:
    """The original's k-means: ``faiss.Clustering`` + ``IndexFlatL2`` on the CPU.

    Settings as DeepCluster ``run_kmeans``: ``niter``, ``seed``,
    ``max_points_per_centroid=10_000_000`` (no subsampling); ``min_points_per_centroid=1`` only
    silences faiss' "please provide at least 39 x k points" warning. The final assignment is
    ``index.search(x, 1)`` against the final centroids. Computed on the CPU; ``assignments`` are
    returned on ``x.device``.

    Args:
        x: Points ``(N, D)`` (float; copied to float32 on the CPU for faiss).
        k: Clusters, ``2 <= k <= N``.
        niter: Lloyd iterations.
        seed: faiss' seed for the initial centroids (masked to 31 bits).
        init: Initial centroids ``(k, D)`` instead of faiss' random draw.

    Returns:
        A :class:`KMeansResult` as :func:`kmeans_torch`'s.
    """
    import faiss  # optional dependency, imported only when used

    x = _check_points(x, k)
    n, d = x.shape
    xb = np.ascontiguousarray(x.detach().float().cpu().numpy())
    clus = faiss.Clustering(d, k)
    clus.niter = int(niter)
    clus.seed = int(seed) & 0x7FFFFFFF
    clus.max_points_per_centroid = 10_000_000
    clus.min_points_per_centroid = 1
    if init is not None:
        start = np.ascontiguousarray(_check_init(init, k, d).float().cpu().numpy())
        faiss.copy_array_to_vector(start.ravel(), clus.centroids)
    index = faiss.IndexFlatL2(d)
    clus.train(xb, index)
    _, assign = index.search(xb, 1)
    stats = clus.iteration_stats
    objective = [float(stats.at(i).obj) for i in range(stats.size())]
    splits = sum(int(stats.at(i).nsplit) for i in range(stats.size()))
    centroids = torch.from_numpy(faiss.vector_to_array(clus.centroids).reshape(k, d).copy())
    return KMeansResult(
        torch.from_numpy(assign.reshape(-1).astype(np.int64)).to(x.device),
        centroids.to(x.device),
        objective,
        splits,
    )


def kmeans(
    x: Tensor,
    k: int,
    niter: int = 20,
    seed: int = 0,
    backend: str = "auto",
    init: Tensor | None = None,
) -> KMeansResult:
    """k-means with the chosen backend (see :func:`resolve_backend`); arguments as
    :func:`kmeans_torch`."""
    name = resolve_backend(backend)
    fn = kmeans_torch if name == "torch" else kmeans_faiss
    return fn(x, k, niter=niter, seed=seed, init=init)


def _check_points(x: Tensor, k: int) -> Tensor:
    if x.ndim != 2:
        raise ValueError(f"k-means expects (N, d) points, got shape {tuple(x.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if x.shape[0] <= k:
        raise ValueError(
            f"k-means with k={k} needs more than k points, got {x.shape[0]}; lower k "
            "(DeepCluster: method.k) or use more training images"
        )
    x = x.detach().float().contiguous()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("k-means input contains NaN or Inf; check the features")
    return x


def _check_init(init: Tensor, k: int, d: int) -> Tensor:
    if tuple(init.shape) != (k, d):
        raise ValueError(f"init must have shape (k, d) = ({k}, {d}), got {tuple(init.shape)}")
    return init.detach()
