"""SeLa (Asano et al., ICLR 2020): classify into Sinkhorn-Knopp equipartitioned pseudo-labels.

Follows ``yukimasano/self-label`` ``cifar.py``; the provenance (paper, repository, commit, what
is followed) is in ``docs/methods/sela.md``, and each deviation is a comment at the code it
concerns.

Example:
    >>> from adapters.backbones import AlexNetCIFAR
    >>> method = SeLa(AlexNetCIFAR(width=0.25), num_samples=1000, hc=2, k=10)
    >>> method.labels.shape, [tuple(h.weight.shape) for h in method.heads]
    (torch.Size([2, 1000]), [(10, 1024), (10, 1024)])
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.nmi import nmi
from ..ops.sinkhorn import sela_sinkhorn
from ..schema import SchemaError, above, at_least, one_of
from .base import EngineContext, Method, MethodConfig, StepOutput, out_dim_of

__all__ = ["SeLa", "SeLaConfig", "label_update_steps"]

HEAD_SCHEDULES = ("epoch", "cycle", "all")
LABEL_PASSES = ("clean", "augmented")


@dataclass(frozen=True)
class SeLaConfig(MethodConfig):
    """SeLa's hyperparameters (defaults: ``scripts/cifar.sh`` and ``cifar.py``'s argparse).

    Attributes:
        hc: Number of heads (cifar.sh 10).
        k: Clusters per head (cifar.sh 128); at most the number of training images.
        lamb: Sinkhorn power ``1/epsilon`` (cifar.py 10; main.py 25).
        nopts: Label optimisations in the schedule (cifar.sh 400), see
            :func:`label_update_steps`.
        tol: Sinkhorn tolerance (cifar.py 1e-2).
        head_schedule: ``"epoch"`` (cifar.py: head ``epoch % hc``), ``"cycle"`` (head
            ``update_index % hc``) or ``"all"`` (main.py: every head at every update).
        feature_layer: Layer name for ``ctx.extract``; default: the backbone's
            ``output_layer`` (e.g. ``"fc7"``), whose output ``forward`` returns.
        max_sk_iters: Bound on Sinkhorn iterations (an error beyond).
        label_pass: Images the label step reads: ``"clean"`` (un-augmented, eval mode) or
            ``"augmented"`` (the training augmentation, train mode, as cifar.py's ``opt_sk``).
    """

    hc: int = field(default=10, metadata=at_least(1))
    k: int = field(default=128, metadata=at_least(2))
    lamb: float = field(default=10.0, metadata=above(0))
    nopts: int = field(default=400, metadata=at_least(0))
    tol: float = field(default=1e-2, metadata=above(0))
    head_schedule: str = field(default="epoch", metadata=one_of(*HEAD_SCHEDULES))
    feature_layer: str | None = None
    max_sk_iters: int = field(default=100_000, metadata=at_least(1))
    label_pass: str = field(default="clean", metadata=one_of(*LABEL_PASSES))


def label_update_steps(nopts: int, epochs: int, steps_per_epoch: int) -> list[int]:
    """Optimizer steps before which SeLa updates labels (cifar.py's ``optimize_times``).

    The times are ``(epochs + 1.0001) * linspace(0, 1, nopts)`` epochs; update ``j`` runs before
    the first step ``s`` with ``s >= time_j * steps_per_epoch`` and after the step of update
    ``j - 1`` (one update per step, as cifar.py pops one time per batch); times at or after
    the end of training never run. A pure function of its arguments: a resumed run plans the
    same steps.

    Deviation: time is counted in ``step * N / steps_per_epoch`` samples, where cifar.py counts
    ``step * batch_size`` (the engine drops the last partial batch; the two differ by less than
    one batch per epoch).

    Args:
        nopts: Number of label optimisations in the schedule (``--nopts``).
        epochs: Training epochs.
        steps_per_epoch: Optimizer steps per epoch.

    Returns:
        Strictly increasing steps in ``[0, epochs * steps_per_epoch)``.

    Example:
        >>> label_update_steps(nopts=4, epochs=1, steps_per_epoch=7)  # times 0, .67, 1.33, 2
        [0, 5]
    """
    for name, value in (("nopts", nopts), ("epochs", epochs), ("steps_per_epoch",
                                                              steps_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    total = epochs * steps_per_epoch
    steps: list[int] = []
    for t in ((epochs + 1.0001) * np.linspace(0, 1, nopts)).tolist():
        s = max(math.ceil(t * steps_per_epoch), steps[-1] + 1 if steps else 0)
        if s >= total:
            break
        steps.append(int(s))
    return steps


# ---------------------------------------------------------------------------------------------
# the method


class SeLa(Method):
    """SeLa: multi-head classification against Sinkhorn-Knopp equipartitioned pseudo-labels.

    Paper: Asano, Rupprecht, Vedaldi, "Self-labelling via simultaneous clustering and
    representation learning", ICLR 2020. Code followed: ``yukimasano/self-label``
    (``cifar.py``, ``sinkhornknopp.py``; ``docs/methods/sela.md``).

    Shapes: ``training_step`` takes one view ``(B, 3, H, W)`` and ``indices (B,)``; each head maps
    ``backbone(x)`` ``(B, out_dim)`` to ``(B, k)`` logits; ``labels`` is ``(hc, num_samples)``.

    Args:
        backbone: Encoder whose ``forward`` returns ``(B, out_dim)`` (``out_dim`` attribute).
        num_samples: Training-set size ``N``.
        config: The hyperparameters (:class:`SeLaConfig`), or a mapping of its keys.
        **overrides: Hyperparameters that replace those of ``config``.

    Attributes:
        heads: ``hc`` ``nn.Linear(backbone.out_dim, k)`` (init ``N(0, 0.01)``, zero bias, as
            ``models/alexnet.py``'s ``_initialize_weights``).
        labels: Buffer ``(hc, num_samples)`` int64, the current pseudo-labels of every head.
        update_steps: Optimizer steps with a label update (set in ``on_train_start``).
        updates_done: How many entries of ``update_steps`` have run.
        feature_layer: What ``ctx.extract`` reads for the label step (the layer feeding the heads).

    Example:
        >>> from adapters.backbones import AlexNetCIFAR
        >>> method = SeLa(AlexNetCIFAR(width=0.25), num_samples=200, hc=2, k=10)
        >>> out = method.training_step([torch.rand(4, 3, 32, 32)], torch.arange(4))
        >>> out.loss.shape, len(out.recon_inputs)
        (torch.Size([]), 1)
    """

    name: ClassVar[str] = "sela"
    views = ("simclr",)  # cifar.py's crop + colour jitter + grayscale: the closest engine preset
    Config: ClassVar[type[MethodConfig]] = SeLaConfig
    config: SeLaConfig

    def __init__(self, backbone: nn.Module, num_samples: int,
                 config: SeLaConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(backbone, num_samples, config, **overrides)
        c = self.config
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise SchemaError(f"SeLa: num_samples must be an int >= 1, got {num_samples!r}")
        if c.k > num_samples:
            raise SchemaError(
                f"SeLa: k={c.k} clusters for {num_samples} samples leaves clusters empty; use "
                f"k <= num_samples"
            )
        out_dim = out_dim_of(backbone, "SeLa")
        self.feature_layer = c.feature_layer or _output_layer(backbone)
        self.hc, self.k, self.lamb, self.nopts = c.hc, c.k, c.lamb, c.nopts
        self.head_schedule, self.label_pass = c.head_schedule, c.label_pass

        self.heads = nn.ModuleList(nn.Linear(out_dim, c.k) for _ in range(c.hc))
        for head in self.heads:  # models/alexnet.py _initialize_weights: N(0, 0.01), zero bias
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)
        self.register_buffer("labels", torch.zeros(c.hc, num_samples, dtype=torch.long))
        self.update_steps: list[int] | None = None
        self.updates_done = 0
        self._labels_initialized = False
        self._saved_steps: list[int] | None = None

    # -- hooks -------------------------------------------------------------------------------------
    def on_train_start(self, ctx: EngineContext) -> None:
        """Plans the label updates; on a fresh start draws the random equipartitions."""
        if ctx.num_samples != self.num_samples:
            raise ValueError(
                f"SeLa was built for {self.num_samples} samples but the engine trains on "
                f"{ctx.num_samples}; build it with num_samples=len(train_set)"
            )
        steps = label_update_steps(self.nopts, ctx.epochs, ctx.steps_per_epoch)
        if self._labels_initialized:  # resumed: the schedule and position must line up
            if self._saved_steps is not None and self._saved_steps != steps:
                raise RuntimeError(
                    "SeLa: the checkpoint's label-update schedule differs from this run's "
                    f"(nopts={self.nopts}, epochs={ctx.epochs}, steps_per_epoch="
                    f"{ctx.steps_per_epoch}); resume with the same config and number of ranks"
                )
            expected = sum(s < ctx.step for s in steps)
            if self.updates_done != expected:
                raise RuntimeError(
                    f"SeLa: checkpoint has {self.updates_done} label updates done but "
                    f"{expected} are scheduled before step {ctx.step}; the checkpoint does not "
                    "match this run"
                )
        else:
            self.labels.copy_(ctx.broadcast(self._random_labels(ctx.seed).to(self.labels.device)))
            self._labels_initialized = True
            self.updates_done = 0
        self.update_steps = steps
        # "epoch" is cifar.py's rule (head epoch % hc); with several updates in one epoch it
        # updates the same head repeatedly and leaves others at their random init: warn.
        if self.head_schedule == "epoch" and self.hc > 1:
            never = sorted(set(range(self.hc)) - {
                (s // ctx.steps_per_epoch) % self.hc for s in steps})
            if never and ctx.rank == 0:
                warnings.warn(
                    f"SeLa head_schedule='epoch' (cifar.py: head = epoch % hc) never updates "
                    f"head(s) {never} with {len(steps)} label updates over {ctx.epochs} epoch(s); "
                    "they train on their random labels. Use head_schedule='cycle' or 'all', or a "
                    "schedule with one update per epoch.",
                    stacklevel=2,
                )

    def before_step(self, ctx: EngineContext) -> None:
        """Runs the scheduled label update, if one is due before this step."""
        if self.update_steps is None:
            raise RuntimeError("SeLa.before_step before on_train_start; call on_train_start first")
        if self.updates_done < len(self.update_steps) and (
            ctx.step >= self.update_steps[self.updates_done]
        ):
            if self.head_schedule == "all":  # main.py (ImageNet): every head at every update
                heads = list(range(self.hc))
            elif self.head_schedule == "cycle":
                heads = [self.updates_done % self.hc]
            else:
                heads = [ctx.epoch % self.hc]
            self.update_labels(ctx, heads)
            self.updates_done += 1

    def training_step(self, views: list[Tensor], indices: Tensor) -> StepOutput:
        """Mean over heads of ``CE(head_h(backbone(x)), labels[h, indices])``."""
        if len(views) != 1:
            raise ValueError(
                f"SeLa trains on one view per batch, got {len(views)}; set data.augment to one "
                "preset (e.g. [simclr])"
            )
        x = views[0]
        feats = self.backbone(x)
        if feats.ndim != 2 or feats.shape[1] != self.heads[0].in_features:
            raise ValueError(
                f"backbone output has shape {tuple(feats.shape)}, the heads expect "
                f"(B, {self.heads[0].in_features})"
            )
        targets = self.labels[:, indices.to(self.labels.device)]
        losses, correct = [], []
        for h, head in enumerate(self.heads):
            logits = head(feats)
            losses.append(F.cross_entropy(logits, targets[h]))
            correct.append((logits.detach().argmax(1) == targets[h]).float().mean())
        loss = torch.stack(losses).mean()
        logs = {"ce": loss.detach(), "label_acc": torch.stack(correct).mean()}
        return StepOutput(loss, recon_inputs=[x], logs=logs)

    # -- label step --------------------------------------------------------------------------------
    def _random_labels(self, seed: int) -> Tensor:
        """``(hc, N)``: per head, ``arange(N) % k`` shuffled (cifar.py's random init)."""
        g = torch.Generator().manual_seed(int(seed))
        base = torch.arange(self.num_samples) % self.k
        return torch.stack([base[torch.randperm(self.num_samples, generator=g)]
                            for _ in range(self.hc)])

    @torch.no_grad()
    def update_labels(self, ctx: EngineContext, heads: list[int]) -> None:
        """Recomputes the labels of ``heads`` from the whole training set (one extract)."""
        t0 = time.perf_counter()
        # Deviation (default label_pass="clean"): the features of un-augmented images with the
        # network in eval mode (BatchNorm running statistics, no dropout); the paper defines the
        # assignment on the images. cifar.py (and main.py) read the training loader (augmented
        # images) in train mode (batch statistics, dropout 0.5 before fc6/fc7), which is
        # label_pass="augmented". Measured at CPU scale (seed 0, 20k images, 20 epochs, crops
        # 0.2-1; benchmarks/configs/cifar10-cpu.yaml's header): "augmented" ends kNN conv3 +2.7 /
        # conv5 -2.0 over the untrained network, "clean" +6.7 / +0.6.
        if self.label_pass == "augmented":
            feats, idx = ctx.extract(self.feature_layer, augmented=True)
        else:
            feats, idx = ctx.extract(self.feature_layer)
        n = self.num_samples
        if feats.ndim != 2 or feats.shape != (n, self.heads[0].in_features):
            raise ValueError(
                f"ctx.extract({self.feature_layer!r}) gave features of shape "
                f"{tuple(feats.shape)}; SeLa needs ({n}, {self.heads[0].in_features}), one row "
                "per training image of the layer that feeds the heads (set feature_layer)"
            )
        idx = idx.to(torch.long)
        if idx.shape != (n,) or not torch.equal(
            torch.sort(idx.cpu()).values, torch.arange(n)
        ):
            raise ValueError(
                f"ctx.extract returned indices that are not a permutation of 0..{n - 1}; the "
                "label step needs every training image exactly once"
            )
        # Deviation: float64 Sinkhorn on the features' device (cifar.py: numpy on the CPU), on
        # the CPU for MPS (no float64 there); every rank computes it and rank 0's labels are
        # broadcast, so ranks agree where floating-point sums differ.
        device = feats.device if feats.device.type != "mps" else torch.device("cpu")
        feats = feats.to(device)
        idx = idx.to(device)
        stats: dict[str, list[float]] = {}
        for h in heads:
            head = self.heads[h]
            w = head.weight.detach().to(device, torch.float64)
            b = head.bias.detach().to(device, torch.float64)
            logits = torch.cat([f.to(torch.float64) @ w.T + b for f in feats.split(8192)])
            probs = torch.softmax(logits, dim=1)
            del logits
            res = sela_sinkhorn(probs, self.lamb, self.config.tol,
                                max_iters=self.config.max_sk_iters)
            del probs
            new = torch.empty(n, dtype=torch.long, device=device)
            new[idx] = res.labels
            new = ctx.broadcast(new.to(self.labels.device))
            previous = self.labels[h].clone()
            self.labels[h].copy_(new)
            sizes = torch.bincount(new, minlength=self.k)
            for key, value in (
                ("sk_nmi_prev", nmi(new, previous)),
                ("sk_nmi_true", nmi(new, ctx.targets)),
                ("sk_cluster_min", float(sizes.min())),
                ("sk_cluster_max", float(sizes.max())),
                ("sk_iters", float(res.iterations)),
                ("sk_err", res.error),
                ("sk_cost", res.cost),
            ):
                stats.setdefault(key, []).append(value)
        logs = {key: (min(v) if key == "sk_cluster_min" else max(v) if key == "sk_cluster_max"
                      else sum(v) / len(v)) for key, v in stats.items()}
        logs.update(sk_updates=float(self.updates_done + 1), sk_head=float(heads[0]),
                    sk_seconds=time.perf_counter() - t0)
        ctx.log(logs)

    # -- checkpoint --------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """Schedule position (the labels themselves are the ``labels`` buffer, in state_dict)."""
        return {
            "labels_initialized": int(self._labels_initialized),
            "updates_done": int(self.updates_done),
            "update_steps": list(self.update_steps) if self.update_steps is not None else None,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restores :meth:`extra_state`; call after ``load_state_dict`` (which has the labels)."""
        missing = {"labels_initialized", "updates_done", "update_steps"} - set(state)
        if missing:
            raise KeyError(f"SeLa extra state lacks {sorted(missing)}; was it written by SeLa?")
        self._labels_initialized = bool(state["labels_initialized"])
        self.updates_done = int(state["updates_done"])
        steps = state["update_steps"]
        self._saved_steps = None if steps is None else [int(s) for s in steps]



def _output_layer(backbone: nn.Module) -> str:
    """The layer whose output ``backbone.forward`` returns (a Backbone's ``output_layer``)."""
    layer = getattr(backbone, "output_layer", None)
    if not isinstance(layer, str):
        raise SchemaError(
            f"SeLa cannot tell which layer of {type(backbone).__name__} feeds the heads; "
            "pass feature_layer=<the module/probe point whose output is forward()'s>"
        )
    return layer
