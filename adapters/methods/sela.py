"""SeLa (self-labelling via simultaneous clustering and representation learning) for the engine.

Paper: Asano, Rupprecht and Vedaldi, "Self-labelling via simultaneous clustering and
representation learning", ICLR 2020 (https://openreview.net/forum?id=Hyx-jyBFPr), Sec. 3:
pseudo-labels are the solution of an optimal-transport problem that asks for an equipartition of
the ``N`` training images into ``K`` clusters, solved approximately with Sinkhorn-Knopp on
``softmax(logits) ** lambda``; the network is trained with cross-entropy against these labels, and
the two steps alternate ``nopts`` times over training.

Code followed (read, not copied): ``yukimasano/self-label`` at commit ``3891e37`` (HEAD of the
stored snapshot; the files below are unchanged since their dates):

- ``cifar.py`` (``da412d7``, 2020-06-03) and ``scripts/cifar.sh`` (``aacfb17``): the CIFAR
  experiment: ``optimize_L_sk`` (the Sinkhorn-Knopp solver), ``opt_sk`` (which head is updated),
  the label init, the ``optimize_times`` schedule and the training loop;
- ``sinkhornknopp.py`` (``90e14c3``) and ``main.py`` (``7275df2``): the ImageNet variant, for the
  differences listed below;
- ``models/alexnet.py`` (``7700246``): the heads ``top_layer{i} = nn.Linear(4096, K)`` and their
  init (``N(0, 0.01)`` weights, zero bias).

What this module does, as ``cifar.py`` does:

- Labels: ``hc`` heads, each a ``Linear(backbone.out_dim, k)`` with its own ``(N,)`` labels,
  initialised to a random equipartition (``i % k``, shuffled per head).
- Loss: cross-entropy of each head against its own labels, averaged over the heads.
- Label step: the head's logits over the whole training set, in float64 (``feats @ W.T + b``,
  then softmax), are raised to the power ``lamb`` (= 1/epsilon) and balanced by Sinkhorn-Knopp
  (:func:`sela_sinkhorn`: ``r = (1/K) / (P c)``, ``c = (1/N) / (P^T r)``, starting from
  ``c = 1/N``, convergence checked every 10 iterations as ``sum |c / c_new - 1| <= tol`` with
  ``tol = 1e-2``); the new labels are the argmax over clusters of the transport plan
  ``diag(c) P diag(r)``. The plan is an equipartition (every cluster gets ``N/K`` of mass);
  its argmax is not exactly one: with a near-uniform ``P`` (randomly initialised heads, the
  update before step 0) the hard clusters can range from 0 to ~20x ``N/K``. The original has the
  same property; the logs show it (``sk_cluster_min`` / ``sk_cluster_max``).
- Which heads: ``cifar.py`` updates ONE head per label step, head ``epoch % hc`` (``opt_sk``:
  ``nh = epoch % args.hc``). ``main.py`` (ImageNet, ``sinkhornknopp.cpu_sk``/``gpu_sk``) instead
  updates ALL heads at every label step. ``head_schedule="epoch"`` (default) follows cifar.py,
  ``"all"`` follows main.py, ``"cycle"`` updates head ``update_index % hc`` (the same as
  ``"epoch"`` whenever there is at most one update per epoch, as in the paper setting; it differs
  when several updates fall in one epoch, where ``"epoch"`` updates the same head repeatedly and
  leaves others at their random init: a warning says so).
- When: ``nopts`` label steps at the times ``(epochs + 1.0001) * linspace(0, 1, nopts)`` epochs,
  i.e. linearly spaced, the first one before the first optimizer step, the last one after the end
  of training (so ``nopts - 1`` or fewer actually run); a step runs before the first batch whose
  sample count ``step * N / steps_per_epoch`` reaches the time, at most one per batch (a time that
  falls in a batch that already had an update waits for the next batch, as in cifar.py, which
  pops one time per batch). :func:`label_update_steps` computes the list of optimizer steps; it
  is a pure function of ``(nopts, epochs, steps_per_epoch)``, and the checkpoint stores how many
  of its entries are done, so a resumed run makes exactly the same updates.
- Defaults: ``scripts/cifar.sh`` and ``cifar.py``'s argparse defaults (hc=10, K=128, lamb=10,
  nopts=400; the script does not set ``--lamb``, so CIFAR used 10, not main.py's 25).
- Augmentation: cifar.py trains on ``Resize(256), RandomResizedCrop(224, scale=(0.2, 1)),
  ColorJitter(0.4, 0.4, 0.4, 0.4), RandomGrayscale(0.2), RandomHorizontalFlip``. Of the recon_aux
  presets the closest is ``"simclr"`` (RandomResizedCrop scale (0.08, 1), flip, jitter
  (0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale 0.2); ``"crop_flip"`` has no colour augmentation at
  all, which cifar.py has at full strength. So ``views = ("simclr",)``.

Deviations (and why):

- The label step reads features from ``ctx.extract``: un-augmented images, network in eval mode
  (BatchNorm running statistics, no dropout). cifar.py (and main.py) compute them with the
  training loader (augmented images) while the network is still in train mode (batch statistics,
  dropout 0.5 before fc6/fc7). The engine's interface only offers the clean pass, and the paper
  defines the assignment on the images, not on augmentations of them.
- The update time is counted in ``step * N / steps_per_epoch`` samples; cifar.py counts
  ``step * batch_size`` (the engine drops the last partial batch and does not tell methods the
  batch size; the two differ by less than one batch per epoch).
- Convergence: cifar.py loops until converged with no bound; here ``max_sk_iters`` (default
  100,000) bounds it with an error. A cluster whose ``p ** lamb`` underflows to 0 on every image
  makes cifar.py produce NaN; here it is an error that says to lower ``lamb``.
- Float64 Sinkhorn runs on the features' device (cifar.py: numpy on the CPU), on the CPU for MPS
  (no float64 there); every rank computes it and rank 0's labels are broadcast.
- Input normalisation: cifar.py normalises images with the CIFAR mean/std; engine views are in
  [0, 1] (the engine's choice, the same for every method).

Not from lightly: ``lightly.loss.swav_loss.sinkhorn`` balances the same matrix (``exp(out / eps)``
with ``out = log p``, ``eps = 1 / lamb``) with the same row-then-column updates, so run for the
same number of iterations in float64 it gives the same labels (``tests/test_sela.py`` checks
this), but it runs a fixed number of iterations (default 3) with no convergence test, in the
input's dtype (float32 underflows for ``p ** 25``), and returns SwAV's soft codes. SeLa needs the
tolerance-controlled, float64 run, so :func:`sela_sinkhorn` is its own.

Example:
    >>> from adapters.backbones import AlexNetCIFAR
    >>> backbone = AlexNetCIFAR(width=0.25)
    >>> method = SeLa(backbone, num_samples=1000, hc=2, k=10)
    >>> method.labels.shape, [tuple(h.weight.shape) for h in method.heads]
    (torch.Size([2, 1000]), [(10, 1024), (10, 1024)])
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.evaluation import nmi

from .base import EngineContext, Method, StepOutput

__all__ = ["SeLa", "SinkhornResult", "sela_sinkhorn", "label_update_steps", "METHOD"]

HEAD_SCHEDULES = ("epoch", "cycle", "all")
LABEL_PASSES = ("clean", "augmented")


# ---------------------------------------------------------------------------------------------
# Sinkhorn-Knopp


@dataclass
class SinkhornResult:
    """What :func:`sela_sinkhorn` returns.

    Attributes:
        labels: ``(N,)`` int64, argmax over clusters of the transport plan.
        r: ``(K,)`` float64 cluster scaling.
        c: ``(N,)`` float64 sample scaling; the plan is ``c[:, None] * probs**lamb * r[None]``.
        iterations: Sinkhorn iterations run (``1 + check_every * m``).
        error: ``sum |c / c_new - 1|`` at the last check (``<= tol``).
        cost: ``-mean(log probs[n, labels[n]])``, the cost cifar.py prints.
        plan: The ``(N, K)`` float64 transport plan (rows sum to ``1/N``, columns to about
            ``1/K``) when asked for with ``return_plan=True``, else None.
    """

    labels: Tensor
    r: Tensor
    c: Tensor
    iterations: int
    error: float
    cost: float
    plan: Tensor | None = None


@torch.no_grad()
def sela_sinkhorn(
    probs: Tensor,
    lamb: float,
    tol: float = 1e-2,
    check_every: int = 10,
    max_iters: int = 100_000,
    return_plan: bool = False,
) -> SinkhornResult:
    """SeLa's Sinkhorn-Knopp: equipartitioned pseudo-labels from class probabilities.

    Solves ``max_Q <Q, log P>`` + entropy over transport plans with uniform marginals
    (``N`` samples, ``K`` clusters, each cluster ``N/K`` samples) by scaling ``P ** lamb`` as
    ``yukimasano/self-label`` ``cifar.py`` ``optimize_L_sk`` does, in float64::

        c = 1/N;  repeat: r = (1/K) / (P^T c);  c_new = (1/N) / (P r)
        every check_every-th iteration (the 1st, 11th, ...): err = sum |c / c_new - 1|
        stop when err <= tol;  labels = argmax_k c_n P_nk r_k

    Args:
        probs: ``(N, K)`` non-negative probabilities (softmax of the head's logits); converted
            to float64 first (pass float64 to keep the precision of the softmax).
        lamb: The power ``lambda = 1 / epsilon`` (cifar.py default 10, main.py 25).
        tol: Convergence tolerance on ``sum |c / c_new - 1|`` (cifar.py 1e-2, main.py 1e-1).
        check_every: Iterations between convergence checks (10 in the original).
        max_iters: Raise if not converged after this many iterations.
        return_plan: Also return the ``(N, K)`` transport plan.

    Returns:
        :class:`SinkhornResult` (labels on ``probs.device``).

    Raises:
        ValueError: Bad shapes/values, or a cluster whose ``p ** lamb`` underflows to 0 for
            every sample (lower ``lamb``).
        RuntimeError: No convergence within ``max_iters``.

    Example:
        >>> probs = torch.softmax(torch.randn(100, 10, dtype=torch.float64), 1)
        >>> res = sela_sinkhorn(probs, lamb=25)
        >>> res.labels.shape, res.error <= 1e-2
        (torch.Size([100]), True)
    """
    if probs.ndim != 2 or min(probs.shape) < 1:
        raise ValueError(f"probs must be a non-empty (N, K) matrix, got shape {tuple(probs.shape)}")
    if not (lamb > 0 and math.isfinite(lamb)):
        raise ValueError(f"lamb must be a positive finite number (e.g. 10 or 25), got {lamb!r}")
    if not tol > 0 or check_every < 1 or max_iters < 1:
        raise ValueError(
            f"need tol > 0, check_every >= 1, max_iters >= 1; got {tol}, {check_every}, "
            f"{max_iters}"
        )
    n, k = probs.shape
    p = probs.to(torch.float64, copy=True)
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError(
            "probs has negative or non-finite entries; pass softmax probabilities (check the "
            "features and head weights for NaN/inf)"
        )
    p.pow_(lamb)  # P ** lambda, (N, K)
    dead = (p.sum(0) == 0).nonzero().flatten()
    if dead.numel():
        raise ValueError(
            f"{dead.numel()} of {k} clusters have p ** lamb == 0 (float64 underflow) for every "
            f"sample, e.g. cluster {int(dead[0])}; Sinkhorn-Knopp cannot give them mass. Lower "
            f"lamb (now {lamb}) or check the head for collapse."
        )
    if (p.sum(1) == 0).any():
        raise ValueError(
            f"some samples have p ** lamb == 0 for every cluster (float64 underflow); lower lamb "
            f"(now {lamb})"
        )
    inv_k, inv_n = 1.0 / k, 1.0 / n
    c = torch.full((n,), inv_n, dtype=torch.float64, device=p.device)
    err = math.inf
    iterations = 0
    while err > tol:
        if iterations >= max_iters:
            raise RuntimeError(
                f"Sinkhorn-Knopp did not converge in {max_iters} iterations (error {err:.3g} > "
                f"tol {tol}); raise max_sk_iters or tol, or lower lamb ({lamb})"
            )
        r = inv_k / (p.T @ c)
        c_new = inv_n / (p @ r)
        if iterations % check_every == 0:
            err = float((c / c_new - 1).abs().sum())
            if not math.isfinite(err):
                raise ValueError(
                    f"Sinkhorn-Knopp diverged to a non-finite error at iteration {iterations + 1}"
                    f" (lamb {lamb}); lower lamb"
                )
        c = c_new
        iterations += 1
    labels = torch.argmax(p * r, dim=1)  # c_n is constant along a row: same argmax as the plan
    chosen = probs.to(torch.float64).gather(1, labels[:, None]).squeeze(1)
    cost = float(-chosen.log().mean())
    plan = p.mul_(r).mul_(c[:, None]) if return_plan else None
    return SinkhornResult(labels, r, c, iterations, err, cost, plan)


def label_update_steps(nopts: int, epochs: int, steps_per_epoch: int) -> list[int]:
    """Optimizer steps before which SeLa updates labels (cifar.py's ``optimize_times``).

    The times are ``(epochs + 1.0001) * linspace(0, 1, nopts)`` epochs; update ``j`` runs before
    the first step ``s`` with ``s >= time_j * steps_per_epoch`` and after the step of update
    ``j - 1`` (one update per step); times at or after the end of training never run.

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

    Follows Asano et al., ICLR 2020, and ``yukimasano/self-label`` ``cifar.py`` (see the module
    docstring for the commit, what is followed and every deviation).

    Shapes: ``training_step`` takes one view ``(B, 3, H, W)`` and ``indices (B,)``; each head maps
    ``backbone(x)`` ``(B, out_dim)`` to ``(B, k)`` logits; ``labels`` is ``(hc, num_samples)``.

    Attributes:
        heads: ``hc`` ``nn.Linear(backbone.out_dim, k)`` (init ``N(0, 0.01)``, zero bias).
        labels: Buffer ``(hc, num_samples)`` int64, the current pseudo-labels of every head.
        update_steps: Optimizer steps with a label update (set in ``on_train_start``).
        updates_done: How many entries of ``update_steps`` have run.
        feature_layer: What ``ctx.extract`` reads for the label step (the layer feeding the heads).

    Args:
        backbone: Encoder whose ``forward`` returns ``(B, out_dim)`` (``out_dim`` attribute).
        num_samples: Training-set size ``N``.
        hc: Number of heads (cifar.sh 10).
        k: Clusters per head (cifar.sh 128).
        lamb: Sinkhorn power ``1/epsilon`` (cifar.py 10; main.py 25).
        nopts: Label optimisations in the schedule (cifar.sh 400), see
            :func:`label_update_steps`.
        tol: Sinkhorn tolerance (cifar.py 1e-2).
        head_schedule: ``"epoch"`` (cifar.py: head ``epoch % hc``), ``"cycle"`` (head
            ``update_index % hc``) or ``"all"`` (main.py: every head at every update).
        feature_layer: Layer name for ``ctx.extract``; default: the backbone's last stage (e.g.
            ``"fc7"``), which must be its ``forward`` output.
        max_sk_iters: Bound on Sinkhorn iterations (error beyond).
        label_pass: Images the label step reads: ``"clean"`` (un-augmented, eval mode) or
            ``"augmented"`` (the training augmentation, train mode: ``cifar.py``'s ``opt_sk``
            iterates the training loader inside ``train()``, after ``model.train()``).

    Example:
        >>> from adapters.backbones import AlexNetCIFAR
        >>> method = SeLa(AlexNetCIFAR(width=0.25), num_samples=200, hc=2, k=10)
        >>> out = method.training_step([torch.rand(4, 3, 32, 32)], torch.arange(4))
        >>> out.loss.shape, len(out.recon_inputs)
        (torch.Size([]), 1)
    """

    name = "sela"
    views = ("simclr",)

    def __init__(
        self,
        backbone: nn.Module,
        num_samples: int,
        hc: int = 10,
        k: int = 128,
        lamb: float = 10.0,
        nopts: int = 400,
        tol: float = 1e-2,
        head_schedule: str = "epoch",
        feature_layer: str | None = None,
        max_sk_iters: int = 100_000,
        label_pass: str = "clean",
        **unknown: Any,
    ) -> None:
        if unknown:
            raise TypeError(
                f"SeLa got unknown hyperparameter(s) {sorted(unknown)}; valid: hc, k, lamb, nopts, "
                "tol, head_schedule, feature_layer, max_sk_iters, label_pass"
            )
        hparams = dict(hc=hc, k=k, lamb=lamb, nopts=nopts, tol=tol, head_schedule=head_schedule,
                       feature_layer=feature_layer, max_sk_iters=max_sk_iters,
                       label_pass=label_pass)
        super().__init__(backbone, num_samples, **hparams)
        for name, value, low in (("hc", hc, 1), ("k", k, 2), ("nopts", nopts, 0),
                                 ("num_samples", num_samples, 1), ("max_sk_iters", max_sk_iters,
                                                                   1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SeLa: {name} must be an int >= {low}, got {value!r}")
        if k > num_samples:
            raise ValueError(
                f"SeLa: k={k} clusters for {num_samples} samples leaves clusters empty; use "
                f"k <= num_samples"
            )
        if isinstance(lamb, bool) or not isinstance(lamb, int | float) or not (
            0 < lamb < math.inf
        ):
            raise ValueError(f"SeLa: lamb must be a positive number (cifar.py: 10), got {lamb!r}")
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol > 0:
            raise ValueError(f"SeLa: tol must be a positive number (cifar.py: 1e-2), got {tol!r}")
        if label_pass not in LABEL_PASSES:
            raise ValueError(f"SeLa: label_pass must be one of {LABEL_PASSES}, got {label_pass!r}")
        if head_schedule not in HEAD_SCHEDULES:
            raise ValueError(
                f"SeLa: head_schedule must be one of {HEAD_SCHEDULES}, got {head_schedule!r}"
            )
        out_dim = getattr(backbone, "out_dim", None)
        if not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(
                f"SeLa needs a backbone with an int out_dim attribute (its forward output size); "
                f"{type(backbone).__name__} has out_dim={out_dim!r}"
            )
        if feature_layer is None:
            stages = getattr(backbone, "_stage_names", ())
            if not stages:
                raise ValueError(
                    f"SeLa cannot tell which layer of {type(backbone).__name__} feeds the heads; "
                    "pass feature_layer=<the module/probe point whose output is forward()'s>"
                )
            feature_layer = stages[-1]
        self.hc, self.k, self.lamb, self.nopts = hc, k, float(lamb), nopts
        self.tol, self.head_schedule, self.max_sk_iters = float(tol), head_schedule, max_sk_iters
        self.feature_layer = feature_layer
        self.label_pass = label_pass

        self.heads = nn.ModuleList(nn.Linear(out_dim, k) for _ in range(hc))
        for head in self.heads:  # models/alexnet.py _initialize_weights: N(0, 0.01), zero bias
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)
        self.register_buffer("labels", torch.zeros(hc, num_samples, dtype=torch.long))
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
            if self.head_schedule == "all":
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
            res = sela_sinkhorn(probs, self.lamb, self.tol, max_iters=self.max_sk_iters)
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


METHOD = SeLa
