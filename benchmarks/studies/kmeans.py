"""k-means for DeepCluster: pure-torch (``adapters.ops.kmeans.kmeans_torch``) vs faiss-cpu, on CPU.

Both run DeepCluster's setting (at most 20 Lloyd iterations, no subsampling, empty clusters
split) with the same number of threads; the best of ``--repeats`` runs is reported. Both stop
early at a fixed point (faiss >= 1.7 when the objective stops changing, torch when the assignment
does), so the data are made to need (nearly) all 20 iterations: L2-normalised 256-d points of low
intrinsic dimension (a rank-8 Gaussian plus 0.1 isotropic noise), as deep features are. Random
isotropic points converge in 3-5 iterations and would time little but the initialisation.

Run::

    .venv/bin/python -m benchmarks.studies.kmeans                # 10k/50k x 256, k = 100/1000
    .venv/bin/python -m benchmarks.studies.kmeans --sizes 10000 --ks 100 --threads 1

Prints one line per case: iterations run, total seconds and milliseconds per iteration for torch
and faiss, the ratios torch / faiss (total and per iteration; < 1: torch faster), and the
relative difference of the final objectives (different random initialisations: close, not
equal).
"""

from __future__ import annotations

import argparse
import time

import torch

from adapters.ops.kmeans import faiss_available, kmeans_faiss, kmeans_torch


def _time(fn, args: tuple, repeats: int) -> tuple[float, int, float]:
    """Best wall time of ``repeats`` calls ``fn(*args)``, and the iterations and final objective
    of the last."""
    best, iters, objective = float("inf"), 0, float("nan")
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = fn(*args)
        best = min(best, time.perf_counter() - t0)
        iters, objective = len(res.objective), res.objective[-1]
    return best, iters, objective


def make_points(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``(n, dim)`` unit-norm points of low intrinsic dimension (rank-8 Gaussian + noise)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g) @ torch.randn(8, dim, generator=g)
    return torch.nn.functional.normalize(z + 0.1 * torch.randn(n, dim, generator=g), dim=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--ks", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    if not faiss_available():
        raise SystemExit("faiss is not installed: `pip install faiss-cpu` to run this benchmark")
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    print(
        f"k-means, {args.niter} iterations, d={args.dim}, {args.threads} thread(s), "
        f"torch {torch.__version__}, faiss {faiss.__version__}"
    )
    print(
        f"{'N':>6} {'k':>5} | {'it':>3} {'torch s':>7} {'ms/it':>6} | {'it':>3} {'faiss s':>7} "
        f"{'ms/it':>6} | {'ratio':>5} {'r/it':>5} | {'obj diff':>8}"
    )
    for n in args.sizes:
        x = make_points(n, args.dim, seed=n)
        for k in args.ks:
            t_t, it_t, o_t = _time(kmeans_torch, (x, k, args.niter, 0), args.repeats)
            t_f, it_f, o_f = _time(kmeans_faiss, (x, k, args.niter, 0), args.repeats)
            per_t, per_f = 1e3 * t_t / it_t, 1e3 * t_f / it_f
            print(
                f"{n:>6} {k:>5} | {it_t:>3} {t_t:>7.2f} {per_t:>6.1f} | {it_f:>3} {t_f:>7.2f} "
                f"{per_f:>6.1f} | {t_t / t_f:>5.2f} {per_t / per_f:>5.2f} | "
                f"{abs(o_t - o_f) / o_f:>8.2%}",
                flush=True,
            )


if __name__ == "__main__":
    main()
