"""What the reconstruction head's memory format and norm cost on a GPU.

Times optimizer steps of the overhead study's ``base`` and ``+L2`` variants
(:mod:`benchmarks.studies.overhead`) with the head decoding in NCHW or channels-last
(``ReconstructionHead.channels_last``) and with each ``head_norm``, plus ``+L2+LPIPS-alex`` in
both formats. The encoder and images stay NCHW. Rounds are interleaved as in the overhead study
(every variant once per round, after warm-up rounds); a ratio is per round, to the same round's
base step; the table gives the median step, the median ratio and its min / max.

Example (the measurement in ``benchmarks/results/gpu-check/head-memory-format.txt``)::

    python -m benchmarks.studies.head_memory_format --device cuda --precision bf16 \\
        --backbone alexnet --image-size 224 \\
        --write benchmarks/results/gpu-check/head-memory-format.txt
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.studies import overhead as ov

#: name -> (attach overrides, head.channels_last); None: the base step (no objective).
VARIANTS: dict[str, tuple[dict | None, bool]] = {
    "base": (None, False),
    "+L2 batch, NCHW": ({"lpips_weight": 0.0}, False),
    "+L2 batch, NHWC": ({"lpips_weight": 0.0}, True),
    "+L2 group, NCHW": ({"lpips_weight": 0.0, "head_norm": "group"}, False),
    "+L2 group, NHWC": ({"lpips_weight": 0.0, "head_norm": "group"}, True),
    "+L2 none, NCHW": ({"lpips_weight": 0.0, "head_norm": "none"}, False),
    "+L2 none, NHWC": ({"lpips_weight": 0.0, "head_norm": "none"}, True),
    "+L2+LPIPS-alex batch, NCHW": ({"net": "alex"}, False),
    "+L2+LPIPS-alex batch, NHWC": ({"net": "alex"}, True),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.head_memory_format",
                                description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="bf16", choices=list(ov.PRECISIONS))
    p.add_argument("--backbone", default="alexnet")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--write", type=Path, default=None, metavar="PATH")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    a = parse_args(argv)
    args = ov.parse_args(["--device", a.device, "--precision", a.precision, "--backbone",
                          a.backbone, "--image-size", str(a.image_size), "--batch-size",
                          str(a.batch_size), "--rounds", str(a.rounds), "--warmup", str(a.warmup),
                          "--widths", "1.0"])
    ov.check_args(args)
    torch.manual_seed(0)
    template = ov.build_backbone(a.backbone, **ov.backbone_kwargs(a.backbone, 1.0))
    variants = {}
    for name, (recon, nhwc) in VARIANTS.items():
        variants[name] = ov.build_variant(template, recon, args)
        if variants[name].aux is not None:
            variants[name].aux.head.channels_last = nhwc
    x = torch.rand(a.batch_size, 3, args.image_size, args.image_size, device=a.device)
    y = torch.randint(0, 10, (a.batch_size,), device=a.device)
    times = ov.time_rounds(variants, x, y, args)
    lines = [f"{ov.device_name(a.device)}, torch {torch.__version__}; {a.backbone} at "
             f"{args.image_size} px, batch {a.batch_size}, {a.precision}; encoder and images "
             f"NCHW; {a.rounds} interleaved rounds after {a.warmup} warm-up",
             f"{'variant':30s} {'median step':>12s}   ratio median  [min, max]"]
    for name, r in ov.ratio_stats(times, args.resamples, args.seed).items():
        lines.append(f"{name:30s} {statistics.median(times[name]) * 1e3:9.2f} ms   "
                     f"{r.median:5.2f}  [{r.low:.2f}, {r.high:.2f}]")
    for v in variants.values():
        if v.aux is not None:
            v.aux.remove()
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if a.write is not None:
        a.write.parent.mkdir(parents=True, exist_ok=True)
        a.write.write_text(text)
    return text


if __name__ == "__main__":
    main()
