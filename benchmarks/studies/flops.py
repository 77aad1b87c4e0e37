"""FLOPs and activation memory of one training step, base vs +recon: the cost of the
objective on any hardware.

A GPU user can read this table before trying: wall-time ratios depend on the machine (LPIPS is a
fixed cost that a small encoder on a CPU feels more than a ResNet-50 on a GPU), FLOP ratios do
not. One "training step" is what the encoder pays in a self-supervised loop: the encoder's
forward on a batch, a linear head with cross-entropy (the shape of a pseudo-label step), the
backward pass; ``+recon`` adds ``aux.loss(images)`` (head, L2, LPIPS on the reconstruction and
the target) to the same loss. Counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmul
and convolution FLOPs, forward and backward; element-wise ops, norms and pooling are not
counted, which favours neither side much: they are a few percent of either step).

FLOPs miss what slows a GPU step whose maps are large and thin, as the head's are at full
resolution: memory traffic. The second table counts a proxy for it, the activations the forward
saves for the backward (the bytes of every distinct tensor storage that autograd keeps, weights
and buffers left out, float32), which the backward reads again and which bound the batch that
fits. On an H200 at 224 px (bf16) the ImageNet AlexNet's +L2 step took 2.56x the base step and
+L2+LPIPS-alex 3.09x (``gpu-check/device-run.md``): between their FLOP ratios (1.36x, 1.67x)
and their saved-activation ratios (4.66x, 5.38x).

    python -m benchmarks.studies.flops                       # the committed tables (batch 8, CPU)
    python -m benchmarks.studies.flops --models resnet50 --variants base +L2+LPIPS-alex
    python -m benchmarks.studies.flops --write benchmarks/results/flops.md

FLOPs and saved bytes per image do not depend on the batch size (BatchNorm aside), so a batch of
8 is enough.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import recon_aux

from .encoders import MODELS, Model

VARIANTS: dict[str, dict | None] = {
    "base": None,
    "+L2": {"lpips_weight": 0.0},
    "+L2+LPIPS-alex": {"net": "alex"},
    "+L2+LPIPS-vgg": {"net": "vgg"},
    # The defaults before lpips_crop and head_max_width existed: whole-image LPIPS, head <= 512.
    "+L2+LPIPS-alex (0.1.0)": {"net": "alex", "lpips_crop": None, "head_max_width": 512},
    "+L2+LPIPS-alex, half batch": {"net": "alex", "lpips_fraction": 0.5},
    # the head's cost knobs that the overhead study times (make gpu-check)
    "+L2+LPIPS-alex, head_out_scale=4": {"net": "alex", "head_out_scale": 4},
    "+L2+LPIPS-alex, head_norm=none": {"net": "alex", "head_norm": "none"},
    "+L2+LPIPS-alex, head_width=32": {"net": "alex", "head_width": 32},
}


@dataclass(frozen=True)
class StepCost:
    """What one training step costs, whatever the machine.

    Attributes:
        flops: Matmul and convolution FLOPs, forward and backward.
        saved_bytes: Bytes of the tensors the forward saved for the backward (each storage
            once; parameters and buffers, the frozen LPIPS network's included, left out).
    """

    flops: int
    saved_bytes: int


def step_cost(model: Model, recon: dict | None, batch: int) -> StepCost:
    """FLOPs and saved activations of one forward + backward of (encoder + linear CE head
    [+ aux.loss]) on ``batch`` random images, float32."""
    torch.manual_seed(0)
    encoder = model.encoder()
    images = torch.rand(batch, 3, model.size, model.size)
    classifier = nn.Linear(encoder.out_dim, 10)
    opt = torch.optim.SGD([*encoder.parameters(), *classifier.parameters()], lr=0.01)
    modules = [encoder, classifier]
    aux = None
    if recon is not None:
        aux = recon_aux.attach(encoder, opt, input_shape=(3, model.size, model.size), **recon)
        modules.append(aux)
        if aux.perceptual.lpips is not None:  # held outside the module tree (not trained)
            modules.append(aux.perceptual.lpips)
    weights = {t.untyped_storage().data_ptr()
               for m in modules for t in (*m.parameters(), *m.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    labels = torch.randint(0, 10, (batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(classifier(encoder(images).flatten(1)), labels)
            if aux is not None:
                loss = loss + aux.loss(images)
        loss.backward()
    if aux is not None:
        aux.remove()
    return StepCost(counter.get_total_flops(), sum(saved.values()))


def lpips_layer_flops(net: str, size: int) -> list[tuple[str, tuple[int, int], float]]:
    """Forward FLOPs per image pair of each LPIPS layer at ``size`` px, with its map's h x w.

    Where the cost of LPIPS goes, and what skipping layers whose maps are 1 x 1 would save.
    """
    from recon_aux.perceptual import build_lpips

    lpips = build_lpips(net)
    shapes: dict[str, tuple[int, int]] = {}
    slices = [n for n, _ in lpips.net.named_children() if n.startswith("slice")]
    hooks = [getattr(lpips.net, n).register_forward_hook(
        lambda module, args, out, n=n: shapes.__setitem__(n, tuple(out.shape[-2:])))
        for n in slices]
    images = torch.rand(2, 3, size, size) * 2 - 1
    counter = FlopCounterMode(display=False, depth=3)
    with counter, torch.no_grad():
        lpips(images[:1], images[1:])
    for hook in hooks:
        hook.remove()
    counts = counter.get_flop_counts()
    prefix = f"{type(lpips).__name__}.net"  # FlopCounterMode names modules from the root's class
    return [(n, shapes[n], sum(counts.get(f"{prefix}.{n}", {}).values())) for n in slices]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lpips-sizes", nargs="*", type=int, default=[32, 64, 128, 224],
                        help="input sizes of the LPIPS per-layer table")
    parser.add_argument("--write", type=Path, default=None,
                        help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    if "base" not in args.variants:
        parser.error("--variants must include base: the other variants are ratios to it")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    costs: dict[str, dict[str, StepCost]] = {}
    for name in args.models:
        model = MODELS[name]
        costs[name] = {v: step_cost(model, VARIANTS[v], args.batch_size) for v in args.variants}
        print(f"{name}: counted {len(args.variants)} variant(s)", flush=True)
    header = ["variant", *[f"{name}, {MODELS[name].size} px" for name in args.models]]

    def table(per_image: Callable[[StepCost], float], unit: str, digits: int) -> list[str]:
        """Variants as rows, models as columns: the base in ``unit`` per image, the others as
        ratios to it."""
        rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for v in args.variants:
            base = [per_image(costs[name]["base"]) for name in args.models]
            if v == "base":
                cells = [f"base ({unit} per image)", *[f"{b:.{digits}f}" for b in base]]
            else:
                cells = [f"{v} / base", *[f"{per_image(costs[name][v]) / b:.3f}x"
                                          for name, b in zip(args.models, base, strict=True)]]
            rows.append("| " + " | ".join(cells) + " |")
        return rows

    flop_lines = table(lambda c: c.flops / args.batch_size / 1e9, "GFLOPs", 3)
    saved_lines = table(lambda c: c.saved_bytes / args.batch_size / 2**20, "MiB", 2)
    lpips_rows = []
    for size in args.lpips_sizes:
        layers = lpips_layer_flops("alex", size)
        total = sum(f for _, _, f in layers)
        cells = [f"{h}x{w}, {f / total:.0%}" for _, (h, w), f in layers]
        one = sum(f for _, hw, f in layers if hw == (1, 1)) / total
        lpips_rows.append(f"| {size} px | " + " | ".join(cells) + f" | {one:.0%} |")
        print(lpips_rows[-1], flush=True)
    width = len(layers) if args.lpips_sizes else 0  # the header follows the layers counted
    lpips_lines = ["| input | " + " | ".join(f"layer {i + 1}: map, share" for i in range(width))
                   + " | 1 x 1 maps: share |", "|" + "---|" * (width + 2), *lpips_rows]
    text = "\n".join([
        "What one training step costs per image (forward + backward; encoder + linear CE "
        "head; +recon adds aux.loss with the default head and tap), float32, batch "
        f"{args.batch_size}, torch {torch.__version__}, on random images. Written by "
        "`python -m benchmarks.studies.flops --write benchmarks/results/flops.md`.", "",
        "Variants: `+L2` is lpips_weight=0; `+L2+LPIPS-*` the defaults (LPIPS on one 128-px "
        "window per image above 128 px, head width <= 128); `(0.1.0)` the former defaults "
        "(whole-image LPIPS, head width <= 512); `half batch` lpips_fraction=0.5; the last "
        "three change one knob of the head each (the ones the overhead study times).", "",
        "FLOPs, counted with torch.utils.flop_counter.FlopCounterMode (matmul and convolution "
        "FLOPs only):", "",
        *flop_lines, "",
        "Activations saved for the backward (every distinct tensor storage autograd keeps, "
        "weights and buffers left out): what the backward reads again, and what bounds the "
        "batch that fits. A step whose maps are large and thin, as the head's full-resolution "
        "maps are at 224 px, pays for memory traffic that FLOPs do not count: on an H200 "
        "(bf16) the ImageNet AlexNet's +L2 and +L2+LPIPS-alex steps took 2.56x and 3.09x the "
        "base step, between their FLOP and saved-activation ratios "
        "(benchmarks/results/gpu-check/device-run.md).", "",
        *saved_lines, "",
        "Where LPIPS-alex's forward FLOPs go (the five AlexNet layers it compares; the 1x1 "
        "linear weights are negligible), with each layer's map size. Skipping layers whose "
        "maps are 1 x 1 would save the last column, but it drops terms from the loss (at 32 px "
        "three of the five), so it is not an option here: `lpips_fraction` cuts cost without "
        "changing what the loss estimates.", "",
        *lpips_lines, ""])
    if args.write:
        args.write.write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
