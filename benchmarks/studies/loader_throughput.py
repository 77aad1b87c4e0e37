"""Input-pipeline throughput vs. training-step throughput on this machine (CPU).

Loader: ``adapters.data.BatchLoader`` over the cached CIFAR-10 uint8 array: gather a batch of
256 by index (the "decode" from the cache and the collate), then the batched augmentation
(``crop_flip``; ``simclr`` one view; ``simclr`` two views as a SimCLR step needs). For reference
it also times torch's ``DataLoader`` over ``IndexedDataset`` with per-sample torchvision v2
transforms (``RandomCrop(32, 4)`` + flip, and the SimCLR recipe), the usual way, on 2 batches,
with 1 torch thread like ``BatchLoader``.

Step: ``AlexNetCIFAR(width=0.5)`` + 10-way linear head, cross-entropy, ``SGD(momentum=0.9)``,
forward + backward + step on a batch of 256.

Loader and step are timed interleaved (one step, then some batches of each loader variant, and
so on), so that load from other processes hits them alike; medians are reported. The loader
must deliver at least 3x the images/s of the step (one image = one view); the script exits 1
otherwise.

    RECON_AUX_DATA=../shared/data python -m benchmarks.studies.loader_throughput
    python -m benchmarks.studies.loader_throughput --data-root ../shared/data --steps 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from adapters.backbones import AlexNetCIFAR
from adapters.data import BatchLoader, IndexedDataset, load_dataset
from adapters.devices import torch_threads

REQUIRED_RATIO = 3.0


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=None, help="folder with cifar10-jpg.tar.gz")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=5, help="timed training steps")
    parser.add_argument("--loader-batches", type=int, default=4, help="per step and variant")
    parser.add_argument("--reference-batches", type=int, default=2, help="per-sample baseline")
    args = parser.parse_args(argv)
    bs = args.batch_size

    t0 = time.perf_counter()
    train = load_dataset("cifar10", data_root=args.data_root, train=True)
    load_s = time.perf_counter() - t0
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"CIFAR-10 train {train.images.shape} loaded in {load_s:.2f} s (cached uint8 array)")

    loaders = {
        "crop_flip": BatchLoader(train, bs, augment="crop_flip", seed=0, drop_last=True),
        "simclr": BatchLoader(train, bs, augment="simclr", seed=0, drop_last=True),
        "simclr x2 views": BatchLoader(
            train, bs, augment=["simclr", "simclr"], seed=0, drop_last=True
        ),
    }
    views = {"crop_flip": 1, "simclr": 1, "simclr x2 views": 2}
    iters = {name: iter(ld) for name, ld in loaders.items()}

    def next_batch(name: str) -> object:
        try:
            return next(iters[name])
        except StopIteration:
            iters[name] = iter(loaders[name])
            return next(iters[name])

    model = nn.Sequential(AlexNetCIFAR(width=args.width), nn.LazyLinear(10))
    images, targets, _ = next(iter(loaders["crop_flip"]))
    model(images)  # materialise the lazy head
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), targets)
        loss.backward()
        opt.step()

    step()  # warm-up
    for name in loaders:
        next_batch(name)
    step_times: list[float] = []
    batch_times: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(args.steps):
        step_times.append(_time(step))
        for name in loaders:
            for _ in range(args.loader_batches):
                batch_times[name].append(_time(lambda n=name: next_batch(n)))

    # reference: torch DataLoader + per-sample torchvision v2 transforms (main process)
    per_sample = {
        "crop_flip": v2.Compose(
            [
                v2.RandomCrop(32, padding=4),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
            ]
        ),
        "simclr": v2.Compose(
            [
                v2.RandomResizedCrop(32, scale=(0.08, 1.0), antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.ToDtype(torch.float32, scale=True),
            ]
        ),
    }
    ref_rates = {}
    for name, tf in per_sample.items():
        dl = DataLoader(IndexedDataset(train, tf), batch_size=bs, shuffle=True, num_workers=0)
        it = iter(dl)
        with torch_threads(1):  # same thread setting as BatchLoader, for a fair comparison
            next(it)
            times = [_time(lambda it=it: next(it)) for _ in range(args.reference_batches)]
        ref_rates[name] = bs / statistics.median(times)

    step_rate = bs / statistics.median(step_times)
    step_ms = statistics.median(step_times) * 1e3
    print(
        f"\ntraining step, AlexNetCIFAR(width={args.width}) batch {bs}, fwd+bwd+SGD: "
        f"{step_ms:.0f} ms/step = {step_rate:,.0f} images/s"
    )
    header = f"loader (batch {bs})"
    print(f"\n{header:34s} {'ms/batch':>9s} {'images/s':>10s} {'x step':>7s}")
    ok = True
    for name in loaders:
        med = statistics.median(batch_times[name])
        rate = bs * views[name] / med
        ratio = rate / step_rate
        ok &= ratio >= REQUIRED_RATIO
        label = f"BatchLoader {name}"
        print(f"{label:34s} {med * 1e3:9.1f} {rate:10,.0f} {ratio:7.1f}")
    for name, rate in ref_rates.items():
        label = f"per-sample v2 DataLoader {name}"
        print(f"{label:34s} {bs / rate * 1e3:9.1f} {rate:10,.0f} {rate / step_rate:7.1f}  (ref.)")
    verdict = "PASS" if ok else "FAIL"
    print(
        f"\n{verdict}: every BatchLoader variant must be >= {REQUIRED_RATIO:.0f}x the step "
        "(images/s, one image = one augmented view)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
