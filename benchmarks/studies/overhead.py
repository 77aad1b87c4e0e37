"""Training-step overhead of the auxiliary objective, measured so that the numbers can be trusted.

One run times optimizer steps (forward, loss, backward, SGD step) of three variants built from
the same initial encoder:

- ``base``: the encoder + a 10-way linear head on its output with cross-entropy to fixed labels
  (the shape of a DeepCluster/SeLa pseudo-label step);
- ``+L2``: the same plus ``aux.loss`` with ``lpips_weight=0``;
- ``+L2+LPIPS-alex``: the same plus the default ``aux.loss`` (L2 + LPIPS AlexNet).

Protocol: after the warm-up rounds, each timed round runs every variant once, in a rotating
order (round ``i`` starts with variant ``i mod 3``), so that no variant always runs first and a
burst of machine load hits one round's variants alike. A variant's ratio is computed per round
(its step time / the base step time of the same round); the report gives the median step times,
the min / median / max of the per-round ratios and a bootstrap 95% interval of the median ratio
(rounds resampled with replacement, seeded). The header records the machine (CPU model, cores,
torch threads, torch version, device), the settings (batch, image size, precision, memory format)
and the load average before and after; a line warns when other work kept the CPU busy just
before starting.

On CUDA each variant's table row also gives its step memory: one more step after the timed
rounds, untimed, and the peak of allocated memory in it minus what was allocated before it (the
activations kept for the backward, the new gradients, workspaces), to read beside the
activation table of ``benchmarks.studies.flops``.

The last line is the headline, for the first width given (1.0 by default)::

    recon/base step-time ratio: X.XX [lo, hi] (L2+LPIPS-alex, width W)

Examples::

    python -m benchmarks.studies.overhead            # AlexNet-CIFAR widths 1.0 0.5 0.25, batch 256
    python -m benchmarks.studies.overhead --widths 0.5 --rounds 10
    python -m benchmarks.studies.overhead --backbone resnet18_cifar --widths 0.25 0.125  # simclr
    python -m benchmarks.studies.overhead --write benchmarks/results/overhead-cpu.txt
    python -m benchmarks.studies.overhead --device cuda --precision bf16 --backbone alexnet \\
        --image-size 224 --widths 1.0 --write benchmarks/results/overhead-gpu.txt
    python -m benchmarks.studies.overhead --device cuda --precision bf16 --backbone resnet50

``--compile MODE`` adds the same three variants ``torch.compile``d (inductor, that mode) to the
rounds: the encoder and its linear head in place, and the objective's head and LPIPS network
(``aux.compile``), as ``train.compile`` does in a run. Their ratios are to the eager ``base`` of
the same round, as every ratio is (what compiling buys), and the summary adds the objective's
ratio among the compiled variants; the warm-up rounds (at least one) pay for the compilation.

``--variant KEY=VALUE[,KEY=VALUE]`` adds the headline variant with those ``attach`` settings
(``recon_aux.ReconAuxConfig`` keys, values read as YAML) to the rounds, e.g. ``--variant
head_out_scale=4`` or ``--variant lpips_fraction=0.25,head_norm=none``: what a cost knob buys,
measured in the same rounds as the defaults.

``--profile VARIANT`` then runs a few more steps of that variant under ``torch.profiler`` and
prints its ops by self time (device time on CUDA): where the variant's time goes. The tables are
printed, not written with ``--write``, and the profiled steps are not in the timings.

AlexNet-CIFAR takes 32x32 images only; at 224 px use ``--backbone alexnet`` (the ImageNet
AlexNet, SeLa's CIFAR setting on upsampled images; no width multiplier), ``resnet18_cifar``, or
torchvision's ``resnet18``, ``resnet50`` and ``vit_s16`` (``benchmarks.studies.encoders``, the
encoders of the FLOP table; 224 px by default), where the FLOP table's targets are set.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.profiler import ProfilerActivity, profile

import recon_aux
from adapters.backbones import build_backbone
from adapters.backbones.registry import check_backbone_arguments
from adapters.config import COMPILE_MODES, CUDA_GRAPH_MODES
from adapters.devices import has_cxx_compiler
from recon_aux.head import nhwc_by_default

from .encoders import TORCHVISION

#: The variants and their ``attach`` overrides (None: no auxiliary objective).
VARIANTS: dict[str, dict | None] = {
    "base": None,
    "+L2": {"lpips_weight": 0.0},
    "+L2+LPIPS-alex": {"net": "alex"},
}
HEADLINE = "+L2+LPIPS-alex"
#: ``--precision`` -> the autocast dtype (None: float32, no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16,
}
#: Steps ``--profile`` runs of a variant, after its timed rounds.
PROFILE_STEPS = 5
#: Targets of the issue that asked for this benchmark (width 1.0), printed with the summary.
TARGETS = {"+L2": 1.08, "+L2+LPIPS-alex": 1.15}


def compiled(name: str) -> str:
    """The name of a variant's compiled copy (``--compile``)."""
    return f"{name} (compiled)"


class OverheadError(ValueError):
    """A setting the benchmark refuses (the message says what to change)."""


@dataclass
class Variant:
    """One variant's model, optimizer and (for +recon) auxiliary objective.

    Attributes:
        encoder: The backbone (a copy of the shared initial one).
        classifier: The 10-way linear head on the encoder's output.
        optimizer: SGD (momentum 0.9, weight decay 5e-4) over both (and the recon head).
        aux: The attached objective, or None for ``base``.
        scaler: The fp16 gradient scaler (CUDA only), or None.
        compile: The ``torch.compile`` mode its modules were compiled with, or None (eager).
    """

    encoder: nn.Module
    classifier: nn.Module
    optimizer: torch.optim.Optimizer
    aux: recon_aux.ReconAux | None
    scaler: torch.amp.GradScaler | None = None
    compile: str | None = None


@dataclass
class RatioStats:
    """Per-round ratios of one variant to ``base``.

    Attributes:
        median, low, high: The median ratio and the min / max over the rounds.
        ci: Bootstrap 95% interval of the median ratio.
    """

    median: float
    low: float
    high: float
    ci: tuple[float, float]


@dataclass
class WidthResult:
    """What one width's rounds gave.

    Attributes:
        width: The width factor.
        times: Variant -> its step times (seconds), one per timed round.
        step: Variant -> its median step time (seconds).
        ratios: Variant -> its :class:`RatioStats` (``base`` included: all ones).
        memory: On CUDA, variant -> what one step adds to the memory allocated before it, at
            its peak (bytes; :func:`step_memory`); None elsewhere.
    """

    width: float
    times: dict[str, list[float]]
    step: dict[str, float]
    ratios: dict[str, RatioStats]
    memory: dict[str, int] | None = None


@dataclass
class Report:
    """The printed report, kept for ``--write`` and for callers.

    Attributes:
        lines: Every line printed, in order.
        results: Width -> its :class:`WidthResult`.
        busy: Whether the machine was busy before starting (see :func:`machine_busy`).
        echo: Print each line as it is added.
    """

    lines: list[str] = field(default_factory=list)
    results: dict[float, WidthResult] = field(default_factory=dict)
    busy: bool = False
    echo: bool = True

    def add(self, text: str = "") -> None:
        """Record (and print) one or more lines."""
        self.lines.extend(text.split("\n"))
        if self.echo:
            print(text, flush=True)

    @property
    def text(self) -> str:
        """The whole report, one string ending with a newline."""
        return "\n".join(self.lines) + "\n"


# -- settings ---------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.overhead",
                                description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="alexnet_cifar",
                   help="alexnet_cifar (the paper's CIFAR encoders), alexnet (224 px), "
                        "resnet18_cifar, ... (adapters.backbones), or torchvision's "
                        f"{', '.join(TORCHVISION)} at 224 px (benchmarks.studies.encoders)")
    p.add_argument("--widths", type=float, nargs="+", default=None,
                   help="width factors (default 1.0 0.5 0.25; 1.0 for a backbone without one)")
    p.add_argument("--batch-size", "--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=None,
                   help="image side in pixels (default: the backbone's, 32 for the CIFAR ones)")
    p.add_argument("--rounds", "--steps", type=int, default=30,
                   help="timed rounds; each runs every variant once")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="autocast dtype around forward and losses (fp16: CUDA only, with a "
                        "GradScaler)")
    p.add_argument("--channels-last", action="store_true",
                   help="models and images in channels-last memory format")
    p.add_argument("--compile", default=None, choices=list(COMPILE_MODES), metavar="MODE",
                   help="also time each variant torch.compile'd with this inductor mode (one of "
                        f"{list(COMPILE_MODES)})")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--lpips-weights", default="auto", help="'auto', a path, or 'random'")
    p.add_argument("--head-width", type=int, default=None,
                   help="head_width of ReconAuxConfig (default: sized with the encoder)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="seeds the models, data and bootstrap")
    p.add_argument("--write", type=Path, default=None, metavar="PATH",
                   help="also write the report to PATH (e.g. benchmarks/results/overhead-cpu.txt)")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help=f"also time {HEADLINE} with these attach settings (ReconAuxConfig keys, "
                        "values as YAML), e.g. head_out_scale=4; repeatable")
    names = [*VARIANTS, *map(compiled, VARIANTS)]
    p.add_argument("--profile", action="append", default=[], metavar="VARIANT",
                   help="after the timing, profile PROFILE_STEPS steps of this variant and "
                        f"print its ops by self time (one of {names}, a compiled one with "
                        "--compile, or a --variant's name)")
    return p.parse_args(argv)


def extra_variants(specs: Sequence[str]) -> dict[str, dict]:
    """``--variant`` specs -> {name: attach overrides}: the headline's settings and the spec's,
    each checked as ``ReconAuxConfig`` checks them (unknown keys and bad values refused)."""
    out: dict[str, dict] = {}
    for spec in specs:
        pairs = [item.partition("=") for item in spec.split(",")]
        if not spec or any(not key.strip() or not eq for key, eq, _ in pairs):
            raise OverheadError(f"--variant {spec!r}: give KEY=VALUE[,KEY=VALUE] with "
                                f"ReconAuxConfig keys, e.g. head_out_scale=4. "
                                f"{recon_aux.ReconAuxConfig.valid_keys_text()}")
        try:
            settings = {key.strip(): yaml.safe_load(value) for key, _, value in pairs}
            recon = {**VARIANTS[HEADLINE], **settings}
            recon_aux.ReconAuxConfig.from_any(recon)
        except (yaml.YAMLError, recon_aux.ConfigError) as exc:
            raise OverheadError(f"--variant {spec!r}: {exc}") from None
        name = f"{HEADLINE}, " + ",".join(f"{k}={settings[k]}" for k in settings)
        if name in out:
            raise OverheadError(f"--variant {spec!r} is given twice")
        out[name] = recon
    return out


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot give a measurement; fill ``widths`` and ``image_size``.

    Raises:
        OverheadError: What is wrong and what to pass instead.
    """
    for name in ("batch_size", "rounds", "resamples"):
        if getattr(args, name) < 1:
            raise OverheadError(f"--{name.replace('_', '-')} must be at least 1, "
                                f"got {getattr(args, name)}")
    if args.warmup < 0:
        raise OverheadError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise OverheadError("--device cuda needs a CUDA GPU and torch.cuda.is_available() is "
                            "False here; use --device cpu")
    if args.precision == "fp16" and args.device != "cuda":
        raise OverheadError("--precision fp16 needs --device cuda (float16 autocast with a "
                            "GradScaler); on CPU use --precision bf16 or fp32")
    args.variants = {**VARIANTS, **extra_variants(args.variant)}
    known = [*args.variants, *map(compiled, args.variants)]
    unknown = [name for name in args.profile if name not in known]
    if unknown:
        raise OverheadError(f"--profile {unknown[0]!r}: no such variant; one of {known}")
    late = [name for name in args.profile if name not in args.variants and args.compile is None]
    if late:
        raise OverheadError(f"--profile {late[0]!r} is a compiled variant: add --compile MODE")
    if args.compile is not None:
        if args.warmup < 1:
            raise OverheadError(f"--compile {args.compile} compiles in the first step of each "
                                "variant: give --warmup 1 or more so that no timed round pays "
                                "for it")
        if args.device == "cpu" and not has_cxx_compiler():
            raise OverheadError(f"--compile {args.compile} on the CPU needs a C++ compiler for "
                                "inductor (g++, c++ or clang++ on the PATH, or $CXX), and none "
                                "was found; install one, or leave --compile out")
    if args.widths is None:
        args.widths = [1.0, 0.5, 0.25] if _takes_width(args.backbone) else [1.0]
    for width in args.widths:
        backbone_kwargs(args.backbone, width)
    template = build_template(args.backbone, args.widths[0])
    if args.image_size is None:
        args.image_size = template.input_size
    check_image_size(template, args.backbone, args.image_size)


def build_template(backbone: str, width: float) -> nn.Module:
    """The untrained encoder every variant copies: a backbone of ``adapters.backbones`` at
    ``width``, or one of torchvision's (:data:`~benchmarks.studies.encoders.TORCHVISION`)."""
    kwargs = backbone_kwargs(backbone, width)  # refuses a width the backbone has not
    if backbone in TORCHVISION:
        return TORCHVISION[backbone].encoder()
    return build_backbone(backbone, **kwargs)


def _takes_width(backbone: str) -> bool:
    if backbone in TORCHVISION:
        return False
    try:
        check_backbone_arguments(backbone, {"width": 1.0})
    except TypeError:
        return False
    except ValueError as exc:  # an unknown name (the message lists the valid ones)
        raise OverheadError(f"--backbone {backbone}: {exc}") from None
    return True


def backbone_kwargs(backbone: str, width: float) -> dict[str, float]:
    """``build_backbone`` keywords for ``width`` (none for a backbone without a width factor).

    Raises:
        OverheadError: A width other than 1.0 for a backbone without a width factor.
    """
    if _takes_width(backbone):
        if width <= 0:
            raise OverheadError(f"--widths must be positive (e.g. 1.0 0.5), got {width}")
        return {"width": width}
    if width != 1.0:
        raise OverheadError(f"--backbone {backbone} has no width factor; pass --widths 1.0")
    return {}


def check_image_size(template: nn.Module, backbone: str, size: int) -> None:
    """Refuse an image size the backbone cannot take.

    Raises:
        OverheadError: The size and the backbones to use for it.
    """
    try:
        if hasattr(template, "feature_shape"):
            template.feature_shape("out", input_size=size)
        else:  # a torchvision encoder: one image through it
            with torch.no_grad():
                template.eval()(torch.zeros(1, 3, size, size))
            template.train()
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise OverheadError(
            f"--image-size {size}: --backbone {backbone} cannot take it ({exc}); at 224 px use "
            "--backbone alexnet (224 only, the ImageNet AlexNet), resnet18_cifar (any size "
            "from 8), or torchvision's resnet18 / resnet50 (any size from 32) or vit_s16 (224 "
            "only)") from None


# -- the machine ------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` when present, else ``platform.processor()``)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str) -> str:
    """``CPU`` or the CUDA device's name."""
    if device == "cuda":
        return f"CUDA {torch.cuda.get_device_name()}"
    return "CPU"


def load_average() -> tuple[float, float, float] | None:
    """``os.getloadavg()`` (1, 5, 15 minutes), or None where the OS has none."""
    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None


def cpu_in_use(seconds: float = 2.0) -> float | None:
    """Cores kept busy by every process over the next ``seconds`` (from ``/proc/stat``: busy
    jiffies over all jiffies, times the core count), or None where there is no ``/proc/stat``.
    Unlike the load average, which decays over minutes, this says what runs right now."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)


def machine_busy(in_use: float | None) -> bool:
    """Whether other work competes with the benchmark: more than a quarter of a core in use
    just before it starts (see :func:`cpu_in_use`)."""
    return in_use is not None and in_use > 0.25


def _load_text(load: tuple[float, float, float] | None) -> str:
    if load is None:
        return "not available on this OS"
    return " ".join(f"{v:.2f}" for v in load) + " (1, 5, 15 min)"


def header(args: argparse.Namespace, load: tuple[float, float, float] | None,
           in_use: float | None = None) -> list[str]:
    """The report's header lines: machine, settings, protocol, load before starting
    (``in_use``: cores busy just before, :func:`cpu_in_use`)."""
    cores = os.cpu_count()
    threads = torch.get_num_threads()
    dtype = PRECISIONS[args.precision]
    precision = ("fp32 (float32, no autocast)" if dtype is None else
                 f"{args.precision} (autocast {str(dtype).removeprefix('torch.')} around forward "
                 "and losses; weights and SGD float32"
                 + ("; GradScaler)" if args.precision == "fp16" else ")"))
    lines = [
        "recon-aux overhead benchmark (python -m benchmarks.studies.overhead)",
        f"machine: CPU {cpu_model()}, {_count(cores, 'core')}, {_count(threads, 'torch thread')}, "
        f"torch {torch.__version__}, Python {platform.python_version()}",
        f"device: {device_name(args.device)}",
        f"model: {args.backbone}, widths {' '.join(map(str, args.widths))}, batch "
        f"{args.batch_size}, image {args.image_size}x{args.image_size}, SGD(momentum 0.9)",
        f"precision: {precision}; memory format "
        f"{'channels-last' if args.channels_last else 'contiguous (NCHW)'}"
        + ("" if args.channels_last or args.device != "cuda"
           else "; the head decodes " + ("channels-last" if nhwc_by_default(
               True, autocast=args.precision != "fp32") else "NCHW")
           + " (its default on CUDA: channels-last under autocast or TF32)"),
        "compile: " + ("off (eager)" if args.compile is None else
                       f"each variant also torch.compile'd, mode {args.compile} (inductor): "
                       "encoder, linear head, the objective's head and LPIPS network"),
        f"protocol: {_count(args.rounds, 'timed round')} after "
        f"{_count(args.warmup, 'warm-up round')}; each round "
        "runs every variant once, in a rotating order; ratio = variant step / base step of the "
        f"same round; 95% interval = bootstrap of the median ratio ({args.resamples} resamples, "
        f"seed {args.seed})",
        f"load average before: {_load_text(load)}",
        "CPU in use just before starting (2 s, /proc/stat): "
        + ("not available" if in_use is None else f"{in_use:.2f} of {_count(cores, 'core')}"),
    ]
    if machine_busy(in_use):
        lines.append(f"WARNING: the machine is busy ({in_use:.2f} cores in use by other work "
                     f"before starting, {_count(threads, 'torch thread')} here): ratios are not "
                     "overhead measurements")
    return lines


def _count(n: int | None, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# -- one width --------------------------------------------------------------------------------
def build_variant(template: nn.Module, recon: dict | None, args: argparse.Namespace,
                  mode: str | None = None) -> Variant:
    """A variant on ``args.device``: a copy of ``template``, the linear head, SGD, and the
    objective (``recon``: its ``attach`` overrides; None: no objective); compiled with
    ``torch.compile`` mode ``mode`` unless it is None."""
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    encoder = copy.deepcopy(template).to(args.device, memory_format=memory)
    classifier = nn.Linear(encoder.out_dim, 10).to(args.device)
    params = list(encoder.parameters()) + list(classifier.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    aux = None
    if recon is not None:
        shape = (3, args.image_size, args.image_size)
        # the flags --lpips-weights / --head-width, then the variant's own settings over them
        knobs = {"lpips_weights": args.lpips_weights, "head_width": args.head_width, **recon}
        aux = recon_aux.attach(encoder, opt, input_shape=shape, **knobs)
        aux.head.to(memory_format=memory)
    if mode is not None:  # in place, after attach: the objective's hooks stay
        encoder.compile(mode=mode)
        classifier.compile(mode=mode)
        if aux is not None:
            aux.compile(mode=mode)
    scaler = _grad_scaler() if args.precision == "fp16" else None
    return Variant(encoder, classifier, opt, aux, scaler, mode)


def _grad_scaler() -> torch.amp.GradScaler:
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda")
    return torch.cuda.amp.GradScaler()  # pragma: no cover - older torch


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step(v: Variant, images: torch.Tensor, labels: torch.Tensor,
         args: argparse.Namespace) -> float:
    """One timed optimizer step of ``v`` (seconds; CUDA work is waited for at both ends)."""
    dtype = PRECISIONS[args.precision]
    _synchronize(args.device)
    t0 = time.perf_counter()
    if v.compile in CUDA_GRAPH_MODES:  # the previous step's graph outputs are not read again
        torch.compiler.cudagraph_mark_step_begin()
    with torch.autocast(args.device, dtype=dtype, enabled=dtype is not None):
        loss = F.cross_entropy(v.classifier(v.encoder(images)), labels)
        if v.aux is not None:
            loss = loss + v.aux.loss(images)
    v.optimizer.zero_grad(set_to_none=True)
    if v.scaler is not None:
        v.scaler.scale(loss).backward()
        v.scaler.step(v.optimizer)
        v.scaler.update()
    else:
        loss.backward()
        v.optimizer.step()
    _synchronize(args.device)
    return time.perf_counter() - t0


def rotations(names: Sequence[str], rounds: int) -> Iterator[list[str]]:
    """The order of each round: ``names`` rotated by the round's index."""
    n = len(names)
    for i in range(rounds):
        yield [names[(i + j) % n] for j in range(n)]


def time_rounds(variants: dict[str, Variant], images: torch.Tensor, labels: torch.Tensor,
                args: argparse.Namespace) -> dict[str, list[float]]:
    """Warm-up rounds, then ``args.rounds`` timed rounds; variant -> its step times."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i, order in enumerate(rotations(list(variants), args.warmup + args.rounds)):
        for name in order:
            dt = step(variants[name], images, labels, args)
            if i >= args.warmup:
                times[name].append(dt)
    return times


def step_memory(variants: dict[str, Variant], images: torch.Tensor, labels: torch.Tensor,
                args: argparse.Namespace) -> dict[str, int] | None:
    """On CUDA, one more step of each variant, untimed, after the timed rounds: its peak of
    allocated memory minus what was allocated before it (bytes; the activations kept for the
    backward, the new gradients, workspaces). A variant replayed as CUDA graphs keeps its
    memory in the graphs' pool, taken when they were captured, so it reads near 0 here. None on
    the CPU, whose allocator torch does not count."""
    if args.device != "cuda":
        return None
    out = {}
    for name, v in variants.items():
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(v, images, labels, args)
        out[name] = torch.cuda.max_memory_allocated() - before
    return out


def bootstrap_median(values: Sequence[float], resamples: int, seed: int) -> tuple[float, float]:
    """The 2.5% and 97.5% percentiles of the median over ``resamples`` resamples of
    ``values`` drawn with replacement (seeded)."""
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    medians = np.median(data[rng.integers(0, len(data), (resamples, len(data)))], axis=1)
    low, high = np.percentile(medians, [2.5, 97.5])
    return float(low), float(high)


def ratio_stats(times: dict[str, list[float]], resamples: int, seed: int,
                reference: str = "base") -> dict[str, RatioStats]:
    """Variant -> the statistics of its per-round ratios to ``reference``."""
    stats = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[reference], strict=True)]
        stats[name] = RatioStats(statistics.median(ratios), min(ratios), max(ratios),
                                 bootstrap_median(ratios, resamples, seed))
    return stats


def run_width(width: float, args: argparse.Namespace, report: Report) -> WidthResult:
    """Build the variants at ``width``, time them, add the width's table to ``report``."""
    torch.manual_seed(args.seed)
    template = build_template(args.backbone, width)
    variants = {name: build_variant(template, recon, args)
                for name, recon in args.variants.items()}
    if args.compile is not None:
        variants.update({compiled(name): build_variant(template, recon, args, args.compile)
                         for name, recon in args.variants.items()})
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    images = torch.rand(shape, device=args.device).contiguous(memory_format=memory)
    labels = torch.randint(0, 10, (args.batch_size,), device=args.device)
    times = time_rounds(variants, images, labels, args)
    result = WidthResult(width, times, {n: statistics.median(ts) for n, ts in times.items()},
                         ratio_stats(times, args.resamples, args.seed),
                         step_memory(variants, images, labels, args))
    report.add(width_table(result, template, variants[HEADLINE].aux, args))
    for name in args.profile:
        table = profile_variant(variants[name], images, labels, args)
        if report.echo:
            print(f"\nprofile of {name}, width {width}, {PROFILE_STEPS} steps after the timed "
                  f"rounds:\n{table}", flush=True)
    for v in variants.values():
        if v.aux is not None:
            v.aux.remove()
    return result


def profile_variant(v: Variant, images: torch.Tensor, labels: torch.Tensor,
                    args: argparse.Namespace) -> str:
    """``PROFILE_STEPS`` steps of ``v`` under ``torch.profiler``: the table of its ops, sorted by
    self device time on CUDA (kernels; the table ends with their total) and by self CPU time on
    the CPU."""
    on_cuda = args.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(PROFILE_STEPS):
            step(v, images, labels, args)
    sort = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=25)


def width_table(result: WidthResult, template: nn.Module, aux: recon_aux.ReconAux,
                args: argparse.Namespace) -> str:
    """One width's lines: the model sizes, then a row per variant."""
    head_params = sum(p.numel() for p in aux.head.parameters())
    enc_params = sum(p.numel() for p in template.parameters())
    names = max(16, *map(len, result.step))  # the variant column's width
    lines = [
        "",
        f"width {result.width}: encoder {enc_params / 1e6:.2f} M params, head "
        f"{head_params / 1e6:.3f} M params ({aux.head.extra_repr()}), tapped {aux.layer_name}",
        f"  {'variant':<{names}} {'median step (s)':>16} {'img/s':>8}   {'ratio: median':>13} "
        f"{'[95% interval]':>16} {'min':>6} {'max':>6}   (n={args.rounds} rounds)"
        + ("" if result.memory is None else f"   {'step memory (MiB)':>17}"),
    ]
    for name, t in result.step.items():
        r = result.ratios[name]
        lines.append(f"  {name:<{names}} {t:>16.4f} {args.batch_size / t:>8.0f}   "
                     f"{r.median:>13.3f} {_interval(r):>16} {r.low:>6.3f} {r.high:>6.3f}"
                     + ("" if result.memory is None
                        else f"   {result.memory[name] / 2**20:>17.0f}"))
    return "\n".join(lines)


def _interval(r: RatioStats, digits: int = 3) -> str:
    return f"[{r.ci[0]:.{digits}f}, {r.ci[1]:.{digits}f}]"


# -- the whole run ----------------------------------------------------------------------------
def summary(report: Report, args: argparse.Namespace) -> None:
    """The load after, the summary of the first width and the headline line."""
    report.add(f"\nload average after: {_load_text(load_average())} (includes this benchmark)")
    width = args.widths[0]
    stats = report.results[width].ratios
    parts = [f"{name} ratio {stats[name].median:.2f} {_interval(stats[name], 2)}"
             + (f" (target <= {target:.2f})" if width == 1.0 else "")
             for name, target in TARGETS.items()]
    report.add(f"summary (width {width}): " + ", ".join(parts))
    if report.busy:
        report.add("WARNING: the machine was busy before starting: ratios are not overhead "
                   "measurements")
    if args.compile is not None:
        result = report.results[width]
        among = ratio_stats(result.times, args.resamples, args.seed, compiled("base"))
        base_c, head_c = stats[compiled("base")], among[compiled(HEADLINE)]
        report.add(f"compiled ({args.compile}, width {width}): base step {base_c.median:.2f} "
                   f"{_interval(base_c, 2)} of the eager base step; {HEADLINE} / base, both "
                   f"compiled: {head_c.median:.2f} {_interval(head_c, 2)}")
    head = stats[HEADLINE]
    report.add(f"recon/base step-time ratio: {head.median:.2f} {_interval(head, 2)} "
               f"({HEADLINE.lstrip('+')}, width {width})")


def run_benchmark(args: argparse.Namespace, echo: bool = True) -> Report:
    """Check the settings, time every width, and write the report if ``args.write``.

    Args:
        args: The parsed command line (:func:`parse_args`).
        echo: Print the report as it is made.

    Raises:
        OverheadError: A setting the benchmark refuses.
    """
    if args.threads is not None:
        if args.threads < 1:
            raise OverheadError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    check_args(args)
    load, in_use = load_average(), cpu_in_use()
    report = Report(echo=echo)
    report.busy = machine_busy(in_use)
    report.add("\n".join(header(args, load, in_use)))
    # The variants are one encoder class with and without the objective's hooks, timed in turn:
    # compiled, each needs graphs of its own, and torch.compile does not guard on hooks unless
    # told to.
    guards = (torch._dynamo.config.patch(skip_nnmodule_hook_guards=False)
              if args.compile is not None else contextlib.nullcontext())
    with guards:
        for width in args.widths:
            report.results[width] = run_width(width, args, report)
    summary(report, args)
    if args.write is not None:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(report.text)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2: a refused setting, on stderr)."""
    try:
        run_benchmark(parse_args(argv))
    except OverheadError as exc:
        print(f"overhead: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
