"""The linear probe's weight-decay search, sequential against batched, on real features.

The standardised linear probe chooses its weight decay among seven candidates on held-out
training features (``adapters.evaluation.linear``). ``search="sequential"`` trains one probe per
candidate; ``search="batched"`` trains all seven at once as one stacked layer
(``adapters.evaluation._search``, the default on CUDA). This study runs both on the same cached
features and reports, per candidate, the held-out top-1 and the epochs it trained (each ends at its
own plateau), the choice, the final probe's test top-1, and each search's wall time. The
sequential search runs ``sum(epochs)`` epochs of steps and the batched one ``max(epochs)``.

Features: conv5 of an untrained AlexNet-CIFAR (BatchNorm statistics as initialised, not
recalibrated: the study compares two ways of training the same probes, not an encoder), pooled as
the probe's ``deepcluster`` pooling does, from ``--train-images`` CIFAR-10 training images drawn
at random (seeded) and the whole test set.

    python -m benchmarks.studies.probe_search --threads 1 \\
        --write benchmarks/results/probe-search-cpu.txt
    python -m benchmarks.studies.probe_search --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from adapters.backbones import build_backbone
from adapters.data import load_dataset
from adapters.devices import machine
from adapters.evaluation.features import extract_features
from adapters.evaluation.linear import linear_probe

SEARCHES = ("sequential", "batched")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.probe_search",
                                description=__doc__.split("\n")[0])
    p.add_argument("--width", type=float, default=0.25, help="AlexNet-CIFAR width factor")
    p.add_argument("--train-images", type=int, default=10_000,
                   help="training images drawn at random (the probe holds 20%% of them out)")
    p.add_argument("--layer", default="conv5")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the encoder and the image draw")
    p.add_argument("--write", type=Path, default=None, metavar="PATH",
                   help="also write the report to PATH")
    return p.parse_args(argv)


def features(args: argparse.Namespace) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train features, train labels, test features, test labels) of ``args.layer``."""
    torch.manual_seed(args.seed)
    model = build_backbone("alexnet_cifar", width=args.width).eval().to(args.device)
    out = []
    for train, n in ((True, args.train_images), (False, None)):
        arrays = load_dataset("cifar10", train=train)
        pick = torch.arange(len(arrays.targets))
        if n is not None:
            if not 1 <= n <= len(pick):
                raise SystemExit(f"--train-images {n}: choose 1 to {len(pick)}.")
            g = torch.Generator().manual_seed(args.seed)
            pick = torch.randperm(len(pick), generator=g)[:n]
        x = torch.from_numpy(arrays.images[pick.numpy()]).permute(0, 3, 1, 2)
        y = torch.from_numpy(arrays.targets[pick.numpy()])
        batches = [(x[i:i + 500].float() / 255, y[i:i + 500]) for i in range(0, len(y), 500)]
        f = extract_features(model, batches, args.layer, args.device, pool="deepcluster",
                             progress=False)
        out += [f[args.layer], f.targets]
    return out[0], out[1], out[2], out[3]


def compare(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
            device: str) -> list[str]:
    """Both searches on the same features: the report's lines."""
    results, seconds = {}, {}
    for search in SEARCHES:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        results[search] = linear_probe(train_x, train_y, test_x, test_y, device=device,
                                       search=search, progress=False)
        seconds[search] = time.perf_counter() - t0
    seq, bat = results["sequential"], results["batched"]
    lines = ["weight decay   held-out top-1 (seq / batched)   epochs (seq / batched)"]
    for wd in seq["val_top1"]:
        lines.append(f"{wd:<12g}   {seq['val_top1'][wd]:6.2f} / {bat['val_top1'][wd]:6.2f}"
                     f"                 {seq['val_epochs'][wd]:4d} / {bat['val_epochs'][wd]:4d}")
    epochs = list(seq["val_epochs"].values())
    lines += [
        f"chosen: {seq['weight_decay']:g} / {bat['weight_decay']:g}; test top-1 of the final "
        f"probe {seq['top1']:.2f} / {bat['top1']:.2f}",
        f"search epochs: sequential {sum(epochs)} (the candidates' sum), batched {max(epochs)} "
        f"(the longest): {sum(epochs) / max(epochs):.1f}x fewer steps batched",
        f"wall time, search + final fit: sequential {seconds['sequential']:.1f} s, batched "
        f"{seconds['batched']:.1f} s (batched / sequential "
        f"{seconds['batched'] / seconds['sequential']:.2f})",
    ]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("probe_search: --device cuda needs a CUDA GPU; use --device cpu", file=sys.stderr)
        return 2
    train_x, train_y, test_x, test_y = features(args)
    head = [f"python -m benchmarks.studies.probe_search {' '.join(argv or sys.argv[1:])}",
            f"machine: {machine()}; device {args.device}",
            f"features: {args.layer} of an untrained AlexNet-CIFAR width {args.width} (seed "
            f"{args.seed}), {train_x.shape[1]} dims; {len(train_y)} training images at random, "
            f"{len(test_y)} test images", ""]
    text = "\n".join(head + compare(train_x, train_y, test_x, test_y, args.device)) + "\n"
    print(text, end="")
    if args.write is not None:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
