"""SeLa's Sinkhorn-Knopp and DeepCluster's k-means toward ImageNet scale: time, memory, limits.

For N points (10k up to the largest N that fits this machine's memory) and K = 1000 / 3000
clusters, it measures

- Sinkhorn-Knopp (``sela_sinkhorn``, which computes in float64 as SeLa's ``cifar.py``/``main.py``
  do: ``p ** lamb`` underflows in float32), fed float64 or float32 probabilities (the network's
  softmax is float32; a float32 input halves what the caller holds): wall time, iterations, peak
  resident memory added, and whether the labels from the float32 input equal the others;
- k-means (``kmeans_torch``, DeepCluster's 20 Lloyd iterations on 256-d PCA-whitened features;
  ``kmeans_faiss`` when faiss is installed): wall time and peak memory,

on synthetic inputs shaped like the real ones (softmax of a linear head on low-rank features for
Sinkhorn; L2-normalised low-rank 256-d points for k-means), then fits ``time = a * N`` and
``memory = b * N`` and extrapolates to ImageNet's N = 1,281,167. With ``--limit-check F`` it
then runs Sinkhorn once more at the fraction F of the largest N the fit says fits in memory, and
prints what it measured there beside what the fit predicted.

    python -m benchmarks.studies.clustering_scale --threads 2 --limit-check 0.8
    python -m benchmarks.studies.clustering_scale --sizes 10000 50000 --ks 1000 --write out.txt

Memory formula (the N x K matrices dominate): Sinkhorn holds the input probabilities (N x K, 8 or
4 bytes an entry) and its float64 working copy ``probs ** lamb`` (8 bytes), so 16 or 12 bytes
an entry; the study fits the measured bytes per N x K entry and extrapolates with it. k-means
holds the N x D points, K x D centroids and an N-chunked N x K distance block: ``4 * N * D``
bytes plus a constant.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adapters.ops.kmeans import faiss_available, kmeans_faiss, kmeans_torch
from adapters.ops.sinkhorn import sela_sinkhorn

IMAGENET = 1_281_167


def _probs(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Softmax of a random linear head on rank-16 features (logit std ~2), built in blocks of
    at most 2**20 entries so that building it adds little to the peak the study measures."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, k, dtype=dtype)
    w = torch.randn(16, k, generator=g, dtype=torch.float32) * 0.5  # logits std ~2
    rows = max(1, (1 << 20) // k)
    for start in range(0, n, rows):
        f = torch.randn(min(rows, n - start), 16, generator=g)
        out[start:start + f.shape[0]] = torch.softmax(f @ w, dim=1).to(dtype)
    return out


def _points(n: int, d: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, d, generator=g)
    x = torch.randn(n, 8, generator=g) @ basis + 0.1 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def _peak_gb() -> float:
    """Peak resident memory of this process (GB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _child_main(spec: dict) -> dict:
    """One measurement in a fresh process (so its peak memory is its own)."""
    torch.set_num_threads(spec["threads"])
    kind, n, k = spec["kind"], spec.get("n", 0), spec.get("k", 0)
    if kind == "baseline":  # torch imported, nothing built: subtracted from every peak
        return {"peak_gb": _peak_gb()}
    if kind == "sinkhorn":
        dtype = torch.float64 if spec["dtype"] == "f64" else torch.float32
        probs = _probs(n, k, dtype)
        t0 = time.perf_counter()
        res = sela_sinkhorn(probs, lamb=spec["lamb"], tol=1e-1)
        seconds = time.perf_counter() - t0
        torch.save(res.labels.to(torch.int64), spec["labels"])
        return {"s": seconds, "iters": res.iterations, "peak_gb": _peak_gb()}
    x = _points(n)
    t0 = time.perf_counter()
    res = kmeans_torch(x, k, niter=20, seed=0)
    out = {"torch_s": time.perf_counter() - t0, "iters": len(res.objective),
           "peak_gb": _peak_gb()}
    if faiss_available():
        t0 = time.perf_counter()
        kmeans_faiss(x, k, niter=20, seed=0)
        out["faiss_s"] = time.perf_counter() - t0
    return out


def _memory_gb() -> float:
    """This machine's physical memory (GB)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"must be in (0, 1], a fraction of the largest N that fits (e.g. 0.8), got {text}")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _sinkhorn_cells(s: dict, fits: dict[str, tuple[float | None, float]] | None = None) -> str:
    """One :func:`sinkhorn_case` as text; ``fits`` adds the fit's seconds (or None) and GB
    beside an input's measurement."""
    cells = []
    for name in ("f64", "f32"):
        r, (fit_s, fit_gb) = s[name], (fits or {}).get(name, (None, None))
        cells.append(f"{name} input {r['s']:.1f}s"
                     + ("" if fit_s is None else f" (fit {fit_s:.1f}s)")
                     + f" {r['iters']} it +{r['peak_gb']:.2f}GB"
                     + ("" if fit_gb is None else f" (fit {fit_gb:.2f}GB)"))
    return " | ".join(cells) + f" | labels equal {100 * s['agree']:.2f}%"


def _child(spec: dict) -> dict:
    """Run :func:`_child_main` in a new interpreter; its JSON answer."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.studies.clustering_scale",
                           "--child", json.dumps(spec)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {spec} failed (exit {done.returncode}; out of memory "
                           f"is exit -9): {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sinkhorn_case(n: int, k: int, threads: int, baseline: float, lamb: float = 25.0) -> dict:
    """Sinkhorn-Knopp on float64 and on float32 inputs, each in its own process: time,
    iterations, peak memory above ``baseline`` and the share of equal labels."""
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("f64", "f32"):
            spec = {"kind": "sinkhorn", "n": n, "k": k, "dtype": name, "lamb": lamb,
                    "threads": threads, "labels": str(Path(tmp) / f"{name}.pt")}
            res = _child(spec)
            out[name] = {"s": res["s"], "iters": res["iters"],
                         "peak_gb": res["peak_gb"] - baseline}
        a, b = (torch.load(Path(tmp) / f"{name}.pt", weights_only=True) for name in ("f64", "f32"))
        out["agree"] = float((a == b).double().mean())
    return out


def kmeans_case(n: int, k: int, threads: int, baseline: float) -> dict:
    """DeepCluster's 20 Lloyd iterations on 256-d points, in its own process."""
    res = _child({"kind": "kmeans", "n": n, "k": k, "threads": threads})
    return {**res, "peak_gb": res["peak_gb"] - baseline}


def _fit(ns: list[int], ys: list[float]) -> float:
    """Least-squares slope of y = a * N through the origin."""
    return sum(n * y for n, y in zip(ns, ys)) / sum(n * n for n in ns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--ks", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-kmeans", action="store_true")
    parser.add_argument("--limit-check", type=_fraction, default=None, metavar="F",
                        help="after the fit, run Sinkhorn (both inputs) at F x the largest N "
                             "whose fitted float64-input peak fits the memory; off by default")
    parser.add_argument("--memory-gb", type=_positive, default=None,
                        help="memory the limits are computed for (default: this machine's)")
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child_main(json.loads(args.child))))
        return 0
    memory = args.memory_gb if args.memory_gb is not None else _memory_gb()
    torch.set_num_threads(args.threads)
    baseline = _child({"kind": "baseline", "threads": args.threads})["peak_gb"]
    lines = [f"# {platform.machine()} CPU ({os.cpu_count()} cores), {args.threads} threads, "
             f"torch {torch.__version__}, faiss {'yes' if faiss_available() else 'no'}; each "
             f"measurement in its own process, memory = its peak resident set minus that of a "
             f"process that only imported torch ({baseline:.2f} GB)",
             "# python -m benchmarks.studies.clustering_scale "
             + " ".join(argv if argv is not None else sys.argv[1:])]

    def say(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    for k in args.ks:
        sk_t, sk_m, sk_m32, km_t = [], [], [], []
        for n in args.sizes:
            s = sinkhorn_case(n, k, args.threads, baseline)
            sk_t.append(s["f64"]["s"])
            sk_m.append(max(s["f64"]["peak_gb"], 0.0))
            sk_m32.append(max(s["f32"]["peak_gb"], 0.0))
            say(f"sinkhorn N={n} K={k}: {_sinkhorn_cells(s)}")
            if not args.skip_kmeans:
                m = kmeans_case(n, k, args.threads, baseline)
                km_t.append(m["torch_s"])
                say(f"kmeans   N={n} K={k} D=256: torch {m['torch_s']:.1f}s ({m['iters']} it, "
                    f"+{m['peak_gb']:.2f}GB)"
                    + (f" | faiss {m['faiss_s']:.1f}s" if "faiss_s" in m else ""))
        a, m64, m32 = (_fit(args.sizes, v) for v in (sk_t, sk_m, sk_m32))
        say(f"-> sinkhorn K={k}: {1e6 * a:.2f} s per 1M points per call (linear fit); at "
            f"N={IMAGENET:,}: ~{a * IMAGENET / 60:.1f} min per label update; measured peaks fit "
            f"{m64 * 1e9 / k:.1f} bytes per N x K entry with float64 input, {m32 * 1e9 / k:.1f} "
            f"with float32 input, so ~{m64 * IMAGENET:.0f} / ~{m32 * IMAGENET:.0f} GB at that N")
        if m64 > 0 and m32 > 0:
            where = "this machine's" if args.memory_gb is None else "the given"
            say(f"-> sinkhorn K={k}: the largest N whose measured peak fits {where} "
                f"{memory:.3g} GB: ~{round(memory / m64):,} (float64 input), "
                f"~{round(memory / m32):,} (float32 input)")
            if args.limit_check is not None:
                n = round(args.limit_check * memory / m64)
                s = sinkhorn_case(n, k, args.threads, baseline)
                fits = {"f64": (a * n, m64 * n), "f32": (None, m32 * n)}
                say(f"-> sinkhorn K={k} at {args.limit_check:g} of that limit, N={n:,}: "
                    f"{_sinkhorn_cells(s, fits)}")
        elif args.limit_check is not None:
            say(f"-> sinkhorn K={k}: no limit check, the sizes measured added no memory to fit "
                "(measure larger N)")
        if km_t:
            b = _fit(args.sizes, km_t)
            say(f"-> kmeans K={k}: at N={IMAGENET}: ~{b * IMAGENET / 60:.1f} min per epoch "
                f"(20 iterations; linear fit; grows with K too)")
    if args.write:
        args.write.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
