"""``make demo-recon``: the two lines on real CIFAR-10, with pictures.

Trains an AlexNet-CIFAR encoder (narrow, CPU scale) on a balanced CIFAR-10 subset with the
reconstruction objective attached by the two lines of ``recon_aux``, then writes

- ``reconstructions.png``: test images (odd rows) above their reconstructions (even rows),
- ``metrics.json``: the settings, per-epoch losses and a conv5 kNN accuracy (k=200, T=0.1)
  before and after training, measured on the same subset,

into ``--out`` (default ``outputs/demo``). The encoder's own objective here is the auxiliary one
alone (an autoencoder): the demo shows the plumbing and the pictures; the comparisons of methods
with and without the objective live in ``benchmarks/``.

    python -m examples.demo --data-root ../shared/data --epochs 3
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

import recon_aux
from adapters.backbones import AlexNetCIFAR
from adapters.data import BatchLoader, DatasetError, balanced_subset, load_dataset
from adapters.evaluation import knn_eval


def progress(iterable, total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=None)  # off without a tty


def knn(encoder, train, test, train_idx, test_idx, seed: int) -> float:
    tr = BatchLoader(train, 500, indices=train_idx, augment="none", shuffle=False, seed=seed)
    te = BatchLoader(test, 500, indices=test_idx, augment="none", shuffle=False, seed=seed)
    return knn_eval(encoder, tr, te, "conv5", k=200, temperature=0.1, progress=False)["top1"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="recon-aux demo on real CIFAR-10")
    p.add_argument("--data-root", default=None, help="folder with cifar10-jpg.tar.gz "
                   "(default: $RECON_AUX_DATA)")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--per-class", type=int, default=500, help="train images per class")
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--width", type=float, default=0.25, help="AlexNet-CIFAR width factor")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    for name in ("per_class", "test_per_class", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.batch_size > 10 * args.per_class:  # CIFAR-10: 10 classes; only full batches train
        p.error(f"--batch-size {args.batch_size} is more than the {10 * args.per_class} training "
                "images (--per-class x 10 classes): no step would run. Lower --batch-size or "
                "raise --per-class.")

    torch.manual_seed(args.seed)
    try:
        train = load_dataset("cifar10", data_root=args.data_root, train=True)
        test = load_dataset("cifar10", data_root=args.data_root, train=False)
        train_idx = balanced_subset(train.targets, args.per_class, seed=args.seed)
        test_idx = balanced_subset(test.targets, args.test_per_class, seed=args.seed)
    except (DatasetError, ValueError) as exc:
        p.error(" ".join(str(exc).split()))
    encoder = AlexNetCIFAR(width=args.width)
    knn_before = knn(encoder, train, test, train_idx, test_idx, args.seed)

    optimizer = torch.optim.SGD(encoder.parameters(), lr=args.lr, momentum=0.9,
                                weight_decay=5e-4)
    aux = recon_aux.attach(encoder, optimizer)  # line 1: before the loop
    loader = BatchLoader(train, args.batch_size, indices=train_idx, augment="crop_flip",
                         seed=args.seed, drop_last=True)
    history, t0 = [], time.perf_counter()
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        encoder.train()
        sums = {"l2": 0.0, "lpips": 0.0, "total": 0.0}
        batches = progress(loader, total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}")
        for images, _, _ in batches:
            encoder(images)  # the method's forward (its own loss would use this output)
            loss = aux.loss(images)  # line 2 (a method adds it: loss = loss + aux.loss(images))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for k in sums:
                sums[k] += float(aux.last[k])
        row = {"epoch": epoch + 1, **{k: v / len(loader) for k, v in sums.items()}}
        history.append(row)
        print(f"epoch {row['epoch']}: l2 {row['l2']:.4f}  lpips {row['lpips']:.4f}  "
              f"total {row['total']:.4f}")
    train_s = time.perf_counter() - t0
    knn_after = knn(encoder, train, test, train_idx, test_idx, args.seed)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = torch.from_numpy(test.images[test_idx[:: max(1, len(test_idx) // 16)][:16]])
    images = images.permute(0, 3, 1, 2).float() / 255
    recon = aux.reconstruct(images)
    grid = torch.stack([images.view(2, 8, 3, 32, 32), recon.view(2, 8, 3, 32, 32)], 1)
    save_image(grid.reshape(32, 3, 32, 32), out / "reconstructions.png", nrow=8, padding=2)
    result = {
        "what": "AlexNet-CIFAR trained with the recon_aux objective alone (autoencoder) on a "
                "balanced CIFAR-10 subset; kNN on pooled conv5 of the same subset",
        "settings": vars(args) | {
            "train_images": len(train_idx), "test_images": len(test_idx),
            "tapped_layer": aux.layer_name, "head": aux.head.extra_repr(),
            "lpips": f"{aux.config.net}, {aux.perceptual.lpips.weights_source}",
        },
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "history": history, "train_seconds": round(train_s, 1),
        "knn_conv5_top1": {"random_init": knn_before, "after_training": knn_after},
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    print(f"kNN (k=200, T=0.1, conv5, {len(train_idx)} train / {len(test_idx)} test images): "
          f"random init {knn_before:.1f}% -> after {args.epochs} epochs {knn_after:.1f}%")
    print(f"trained in {train_s:.0f} s; pictures: {out / 'reconstructions.png'}; "
          f"metrics: {out / 'metrics.json'}")
    return result


if __name__ == "__main__":
    main()
