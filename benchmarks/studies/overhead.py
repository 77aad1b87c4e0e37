"""Training-step overhead of the auxiliary objective on an AlexNet-CIFAR (or CIFAR ResNet-18)
encoder.

One run times optimizer steps (forward, loss, backward, SGD step) of three variants, interleaved
step by step so that machine load hits them alike:

- ``base``: AlexNet-CIFAR + a 10-way linear head on fc7 with cross-entropy to fixed labels (the
  shape of a DeepCluster/SeLa pseudo-label step);
- ``+L2``: the same plus ``aux.loss`` with ``lpips_weight=0``;
- ``+L2+LPIPS-alex``: the same plus the default ``aux.loss`` (L2 + LPIPS AlexNet).

It prints each variant's median step time and the ratios to ``base`` for each width factor (the
headline is width 1.0, the paper's AlexNet widths; 0.5 and 0.25 are for information), and ends
with the line ``recon/base step-time ratio: X.XX (L2+LPIPS-alex)`` for width 1.0.

    python -m benchmarks.studies.overhead            # widths 1.0 0.5 0.25, batch 256
    python -m benchmarks.studies.overhead --widths 0.5 --steps 5
    python -m benchmarks.studies.overhead --backbone resnet18_cifar --widths 0.25 0.125  # simclr
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import recon_aux
from adapters.backbones import build_backbone

VARIANTS = {
    "base": None,
    "+L2": {"lpips_weight": 0.0},
    "+L2+LPIPS-alex": {"net": "alex"},
}


def build(width: float, recon: dict | None, template: nn.Module | None, lpips_weights: str,
          head_width: int | None = None, backbone: str = "alexnet_cifar"):
    encoder = (copy.deepcopy(template) if template is not None
               else build_backbone(backbone, width=width))
    classifier = nn.Linear(encoder.out_dim, 10)
    params = list(encoder.parameters()) + list(classifier.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    aux = None
    if recon is not None:
        aux = recon_aux.attach(encoder, opt, input_shape=(3, 32, 32), lpips_weights=lpips_weights,
                               head_width=head_width, **recon)
    return encoder, classifier, opt, aux


def step(parts, images, labels) -> float:
    encoder, classifier, opt, aux = parts
    t0 = time.perf_counter()
    loss = F.cross_entropy(classifier(encoder(images)), labels)
    if aux is not None:
        loss = loss + aux.loss(images)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def run_width(width: float, args) -> dict[str, float]:
    torch.manual_seed(0)
    template = build_backbone(args.backbone, width=width)
    variants = {name: build(width, recon, template, args.lpips_weights, args.head_width,
                            args.backbone)
                for name, recon in VARIANTS.items()}
    images = torch.rand(args.batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch_size,))
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            dt = step(variants[name], images, labels)
            if i >= args.warmup:
                times[name].append(dt)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    aux = variants["+L2+LPIPS-alex"][3]
    head_params = sum(p.numel() for p in aux.head.parameters())
    enc_params = sum(p.numel() for p in template.parameters())
    print(f"\nwidth {width}: encoder {enc_params / 1e6:.2f} M params, head "
          f"{head_params / 1e6:.3f} M params ({aux.head.extra_repr()}), tapped {aux.layer_name}")
    print(f"  {'variant':<16} {'median step (s)':>16} {'img/s':>8} {'ratio':>6}   (n={args.steps})")
    for name, t in med.items():
        print(f"  {name:<16} {t:>16.3f} {args.batch_size / t:>8.0f} {t / med['base']:>6.2f}")
    for parts in variants.values():
        if parts[3] is not None:
            parts[3].remove()
    return med


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="alexnet_cifar",
                   help="alexnet_cifar (the paper's encoders) or resnet18_cifar")
    p.add_argument("--widths", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=7, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--lpips-weights", default="auto", help="'auto', a path, or 'random'")
    p.add_argument("--head-width", type=int, default=None,
                   help="head_width of ReconAuxConfig (default: sized with the encoder)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"recon-aux overhead benchmark: {args.backbone}, batch {args.batch_size}, 32x32, "
          f"SGD(momentum 0.9), float32, CPU; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"variants interleaved step by step, median of {args.steps} steps after "
          f"{args.warmup} warm-up steps.")
    results = {w: run_width(w, args) for w in args.widths}
    headline = 1.0 if 1.0 in results else args.widths[0]
    med = results[headline]
    print(f"\nsummary (width {headline}): L2-only ratio {med['+L2'] / med['base']:.2f} "
          f"(target <= 1.08), L2+LPIPS-alex ratio {med['+L2+LPIPS-alex'] / med['base']:.2f} "
          "(target <= 1.15)")
    print(f"recon/base step-time ratio: {med['+L2+LPIPS-alex'] / med['base']:.2f} "
          f"(L2+LPIPS-alex)" + ("" if headline == 1.0 else f" [width {headline}]"))


if __name__ == "__main__":
    main()
