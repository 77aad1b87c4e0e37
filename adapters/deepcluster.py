"""DeepCluster (Caron et al., ECCV 2018) as a method of the shared engine.

Paper: Mathilde Caron, Piotr Bojanowski, Armand Joulin, Matthijs Douze, "Deep Clustering for
Unsupervised Learning of Visual Features", ECCV 2018 (arXiv:1807.05520).
Code followed: ``facebookresearch/deepcluster`` at commit 2d1927e (``main.py``,
``clustering.py``, ``util.py``, ``models/alexnet.py``, ``main.sh``); read, not copied.

Each epoch (:meth:`DeepCluster.on_epoch_start`), as ``main.py``:

1. features of every training image, un-augmented, in eval mode (dropout off, BN running
   statistics), at the output of fc7 *before* its ReLU (``main.py`` removes the classifier's last
   ReLU while computing features): ``layer="fc7.1"``, the ``nn.Linear`` of
   :class:`~recon_aux.models.AlexNet` / :class:`~recon_aux.models.AlexNetCIFAR`, read by a forward
   hook (``ctx.extract``);
2. ``clustering.preprocess_features``: PCA to ``pca_dim=256`` with whitening (each component
   scaled by eigenvalue^-0.5, as ``faiss.PCAMatrix(d, 256, eigen_power=-0.5)``), then
   L2-normalised rows (:func:`adapters.kmeans.preprocess_features`);
3. ``clustering.run_kmeans``: k-means with ``k`` clusters (``main.sh``: 10000 on ImageNet),
   20 iterations, no subsampling, a new seed every epoch, empty clusters re-created during the
   iterations by splitting big ones (faiss' ``split_clusters``), final assignment = nearest
   final centroid (:func:`adapters.kmeans.kmeans`);
4. the assignment becomes the pseudo-labels; NMI against the previous epoch's assignment (and,
   as a diagnostic only, the true labels) is logged;
5. ``top_layer = nn.Linear(fc7_dim, k)`` is re-created with weights ``N(0, 0.01)`` and zero bias;
6. ``util.UnifLabelSampler`` draws the epoch's sample list (:meth:`epoch_indices`): as many
   samples as the training set, ``N // m + 1`` from each of the ``m`` non-empty clusters (with
   replacement when the cluster has at most that many images), shuffled, cut to ``N``.

Each step (:meth:`training_step`) is ``main.train``: cross-entropy of
``top_layer(ReLU(fc7(x)))`` (the backbone's ``forward`` output) against the pseudo-labels, SGD
lr 0.05, momentum 0.9, weight decay 1e-5 (``main.py`` defaults; set in the run config's
``train`` section); the augmented images ``x`` also feed the reconstruction objective.

Deviations, and why:

- Top layer in the shared optimizer. The original trains it with its own optimizer, re-created
  every epoch: ``SGD(top_layer, lr, weight_decay)``, *without momentum*. The engine has one SGD
  optimizer with momentum for everything, so (i) the top layer is re-initialised *in place* and
  its optimizer state is deleted at every epoch start (no momentum carried across epochs), and
  (ii) with ``top_layer_momentum=False`` (default, as the original) its momentum buffer is
  deleted before every step, which makes PyTorch's SGD take a plain ``lr * (grad + wd * w)``
  step for it, exactly the original's update. ``top_layer_momentum=True`` lets it use momentum.
- Pseudo-label ids are the k-means cluster ids (``0..k-1``, empty ones unused). The original
  renumbers the non-empty clusters to ``0..m-1`` (``ReassignedDataset``) but still builds a
  ``k``-way top layer; both leave ``k - m`` outputs without targets, only their order differs.
- Randomness is seeded from ``(ctx.seed, ctx.epoch)`` (k-means init and splits, sampler, top-layer
  init) instead of a global NumPy RNG, so a run resumed after any epoch is exact.
- k-means runs with :func:`adapters.kmeans.kmeans` (``kmeans_backend``): ``"auto"`` is the
  pure-torch implementation, on the training device (GPU when there is one); on the CPU it is
  as fast as faiss-cpu within noise (``benchmarks/kmeans.py``). ``"faiss"`` runs the original's
  faiss k-means on the CPU (optional package). The torch version differs from faiss only in its
  random numbers and a vectorised choice of the cluster to split (see :mod:`adapters.kmeans`).
- Distributed: ``ctx.extract`` gathers every rank's features, every rank runs PCA and k-means
  from the same seed, and rank 0's assignment is broadcast (``ctx.broadcast``) so that ranks
  agree even where floating-point sums differ. The original is single-process.
- ``views`` defaults to ``("crop_flip",)`` (pad-4 random crop + flip, the CIFAR standard) while
  the original's ImageNet training uses ``RandomResizedCrop(224)`` + flip; inputs are in [0, 1]
  without the ImageNet mean/std normalisation (a BatchNorm follows conv1). The original's
  ``--reassign`` (epochs between clusterings, default 1) is fixed to 1 and PIC clustering is
  not implemented.
- A clustering layer with a spatial map (e.g. ``layer="conv5"``) is flattened per image; the
  original clusters fc7 only.

Attributes:
    top_layer: ``nn.Linear(backbone.out_dim, k)``, re-initialised every epoch.
    pseudo_labels: Buffer ``(num_samples,)`` int64, the current epoch's cluster of each training
        image (``-1`` before the first clustering); checkpointed with the method's state dict.
    labels_epoch: Epoch whose clustering ``pseudo_labels`` holds (``-1``: none yet).
    k, layer, pca_dim, kmeans_iters, kmeans_backend, top_layer_momentum: The hyperparameters.

Example:
    >>> from recon_aux.models import AlexNetCIFAR
    >>> backbone = AlexNetCIFAR(width=0.25)
    >>> method = DeepCluster(backbone, num_samples=1000, k=100)
    >>> method.top_layer  # fc7 (1024 at width 0.25) -> k
    Linear(in_features=1024, out_features=100, bias=True)
    >>> # engine: method.on_epoch_start(ctx); order = method.epoch_indices(ctx); then per batch
    >>> # out = method.training_step([x], indices)  # x: (B, 3, 32, 32) in [0, 1]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recon_aux.evaluation import nmi

from .base import EngineContext, Method, StepOutput
from .kmeans import BACKENDS, kmeans, preprocess_features, resolve_backend

__all__ = ["DeepCluster", "METHOD", "uniform_label_sampler", "derive_seed"]

# Streams of random numbers derived from (seed, epoch), one per use.
_KMEANS, _SAMPLER, _TOP_LAYER = 0, 1, 2
_HPARAMS = (
    "k",
    "layer",
    "pca_dim",
    "pca_epsilon",
    "kmeans_iters",
    "kmeans_backend",
    "top_layer_momentum",
    "views",
    "cluster_every",
)


def derive_seed(seed: int, epoch: int, stream: int) -> int:
    """A 31-bit seed that depends only on ``(seed, epoch, stream)`` (``np.random.SeedSequence``)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(stream)]).generate_state(1)
    return int(state[0]) & 0x7FFFFFFF


def uniform_label_sampler(labels: Tensor | np.ndarray, size: int, seed: int) -> np.ndarray:
    """DeepCluster's ``UnifLabelSampler``: ``size`` positions, equally many per non-empty label.

    Draws ``size // m + 1`` positions from each of the ``m`` labels that occur in ``labels``
    (with replacement when a label has at most that many positions, as the original), shuffles
    them and keeps the first ``size``. Labels with no position (empty k-means clusters) are
    never drawn from (``choice`` on an empty cluster is what crashes a sampler that does not
    skip them; the original at 2d1927e skips them the same way).

    Args:
        labels: ``(N,)`` integer label of each position (negative values are refused).
        size: Number of positions to return.
        seed: Seed of the draw.

    Returns:
        ``(size,)`` int64 positions in ``[0, N)``.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).reshape(-1)
    if labels.size == 0 or size < 1:
        raise ValueError(f"need at least one label and size >= 1, got {labels.size} and {size}")
    if labels.min() < 0:
        raise ValueError("labels contain negative values: cluster the data before sampling")
    order = np.argsort(labels, kind="stable")
    present, starts = np.unique(labels[order], return_index=True)
    groups = np.split(order, starts[1:])
    per_label = size // len(present) + 1
    rng = np.random.default_rng(seed)
    picks = [rng.choice(group, per_label, replace=len(group) <= per_label) for group in groups]
    out = np.concatenate(picks)
    rng.shuffle(out)
    return out[:size].astype(np.int64)


class DeepCluster(Method):
    """DeepCluster: k-means pseudo-labels of fc7 features, re-computed every epoch.

    See the module docstring for what follows the original and the deviations.

    Args:
        backbone: The encoder; ``forward`` gives the features the top layer classifies (fc7
            after ReLU for the AlexNets) and must have an ``out_dim`` attribute.
        num_samples: Size of the training set.
        k: Number of k-means clusters (original: 10000 on ImageNet). Needs ``k < num_samples``.
        layer: What to cluster: a submodule name of the backbone (``"fc7.1"``: the fc7 Linear,
            i.e. fc7 before ReLU, as the original) or one of its probe points.
        pca_dim: PCA-whitening output dimension (original: 256). Needs ``pca_dim < num_samples``
            and at most the clustered layer's dimension.
        pca_epsilon: Whitening regulariser as a fraction of the top eigenvalue (original: 0,
            faiss' default). With 0, features that span fewer than ``pca_dim`` directions (dead
            fc units, a partial collapse) are an error; > 0 clusters them anyway without
            amplifying their degenerate directions.
        kmeans_iters: Lloyd iterations (original: 20).
        kmeans_backend: ``"auto"``, ``"torch"`` or ``"faiss"`` (see :mod:`adapters.kmeans`).
        top_layer_momentum: False (original): plain SGD steps for the top layer; True: the
            optimizer's momentum applies to it too (within an epoch).
        views: Augmentation presets of the training view (one), default ``("crop_flip",)``.
        cluster_every: Cluster (and re-draw the top layer) every this many epochs (original: 1).
            The original's epoch is an ImageNet epoch: ~5,000 steps between re-assignments.
            At 20k images an epoch is ~150 steps, too few for a fresh top layer to fit the new
            clusters before the next re-assignment; ``cluster_every=k`` restores a number of
            steps per assignment closer to the original's.
    """

    name = "deepcluster"
    views: tuple[str, ...] = ("crop_flip",)

    def __init__(
        self,
        backbone: nn.Module,
        num_samples: int,
        k: int = 10000,
        layer: str = "fc7.1",
        pca_dim: int = 256,
        pca_epsilon: float = 0.0,
        kmeans_iters: int = 20,
        kmeans_backend: str = "auto",
        top_layer_momentum: bool = False,
        views: Sequence[str] | None = None,
        cluster_every: int = 1,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise TypeError(
                f"DeepCluster got unknown hyperparameter(s) {sorted(unknown)}; valid ones: "
                f"{', '.join(_HPARAMS)} (set them in the config's method: section)"
            )
        super().__init__(
            backbone,
            num_samples,
            k=k,
            layer=layer,
            pca_dim=pca_dim,
            pca_epsilon=pca_epsilon,
            kmeans_iters=kmeans_iters,
            kmeans_backend=kmeans_backend,
            top_layer_momentum=top_layer_momentum,
            views=views,
            cluster_every=cluster_every,
        )
        self.num_samples = _positive_int(num_samples, "num_samples")
        self.k = _positive_int(k, "method.k")
        if self.k < 2 or self.k >= self.num_samples:
            raise ValueError(
                f"method.k={k} clusters for {num_samples} training images: need "
                f"2 <= k < {num_samples}; lower method.k or use more images"
            )
        self.pca_dim = _positive_int(pca_dim, "method.pca_dim")
        if isinstance(pca_epsilon, bool) or not isinstance(pca_epsilon, (int, float)) \
                or not 0 <= pca_epsilon < 1:
            raise ValueError(f"method.pca_epsilon={pca_epsilon!r} must be a number in [0, 1) "
                             "(a fraction of the top eigenvalue; 0 is the original)")
        self.pca_epsilon = float(pca_epsilon)
        if self.pca_dim >= self.num_samples:
            raise ValueError(
                f"method.pca_dim={pca_dim} needs more than {pca_dim} training images, got "
                f"{num_samples}; lower method.pca_dim"
            )
        self.kmeans_iters = _positive_int(kmeans_iters, "method.kmeans_iters")
        if kmeans_backend not in BACKENDS:
            raise ValueError(
                f"method.kmeans_backend must be one of {BACKENDS}, got {kmeans_backend!r}"
            )
        if kmeans_backend == "faiss":
            resolve_backend("faiss")  # raises with the install hint
        self.kmeans_backend = kmeans_backend
        self.top_layer_momentum = bool(top_layer_momentum)
        self.cluster_every = _positive_int(cluster_every, "method.cluster_every")
        if views is not None:
            views = tuple(views) if not isinstance(views, str) else (views,)
            if len(views) != 1:
                raise ValueError(
                    f"DeepCluster trains on one augmented view, got views={list(views)}; "
                    "give one preset, e.g. [crop_flip]"
                )
            self.views = views
        self.layer = str(layer)
        layer_dim = _check_layer(backbone, self.layer)
        if layer_dim is not None and layer_dim < self.pca_dim:
            raise ValueError(
                f"layer {self.layer!r} has {layer_dim} features, fewer than "
                f"method.pca_dim={self.pca_dim}; lower method.pca_dim to at most {layer_dim}"
            )
        out_dim = getattr(backbone, "out_dim", None)
        if not isinstance(out_dim, int) or out_dim < 1:
            raise TypeError(
                f"{type(backbone).__name__} has no positive int out_dim (the size of its "
                "forward output), needed to build the top layer; use a recon_aux backbone"
            )
        self.top_layer = nn.Linear(out_dim, self.k)
        self._init_top_layer(torch.Generator().manual_seed(0))
        self.register_buffer("pseudo_labels", torch.full((self.num_samples,), -1, dtype=torch.long))
        self.labels_epoch = -1

    # -- hooks -----------------------------------------------------------------------------------
    def on_train_start(self, ctx: EngineContext) -> None:
        """Checks that the optimizer trains the top layer the way it is meant to."""
        if ctx.num_samples != self.num_samples:
            raise ValueError(
                f"the engine reports {ctx.num_samples} training images but DeepCluster was built "
                f"for num_samples={self.num_samples}; build it with the training set's size"
            )
        groups = _groups_of(ctx.optimizer, list(self.top_layer.parameters()))
        if groups is None:
            raise ValueError(
                "the optimizer does not hold DeepCluster's top-layer parameters; optimise "
                "list(backbone.parameters()) + list(method.parameters())"
            )
        if not self.top_layer_momentum:
            for group in groups:
                if not isinstance(ctx.optimizer, torch.optim.SGD) or group.get("nesterov"):
                    raise ValueError(
                        "top_layer_momentum=False emulates the original's momentum-free top-layer "
                        "SGD by dropping its momentum buffer before each step, which needs "
                        "torch.optim.SGD without Nesterov; set train.nesterov=false or "
                        "method.top_layer_momentum=true"
                    )

    def _clustering_epoch(self, epoch: int) -> int:
        return epoch - epoch % self.cluster_every

    def on_epoch_start(self, ctx: EngineContext) -> None:
        """Cluster the features, re-assign the pseudo-labels, re-initialise the top layer (on
        every ``cluster_every``-th epoch; the labels of the last clustering otherwise)."""
        if self.labels_epoch >= 0 and self.labels_epoch == self._clustering_epoch(ctx.epoch):
            return
        t0 = time.perf_counter()
        features = self._features(ctx)
        t_features = time.perf_counter() - t0
        backend = resolve_backend(self.kmeans_backend)
        work = ctx.device if backend == "torch" else torch.device("cpu")
        points = preprocess_features(features, self.pca_dim, device=work,
                                     epsilon=self.pca_epsilon)
        result = kmeans(
            points,
            self.k,
            niter=self.kmeans_iters,
            seed=derive_seed(ctx.seed, ctx.epoch, _KMEANS),
            backend=backend,
        )
        labels = ctx.broadcast(result.assignments.to(ctx.device, torch.long).contiguous())
        if labels.shape != (self.num_samples,) or labels.min() < 0 or labels.max() >= self.k:
            raise RuntimeError(
                f"clustering returned labels of shape {tuple(labels.shape)} in "
                f"[{int(labels.min())}, {int(labels.max())}]; expected ({self.num_samples},) in "
                f"[0, {self.k})"
            )
        previous = self.pseudo_labels.clone() if self.labels_epoch >= 0 else None
        self.pseudo_labels.copy_(labels.to(self.pseudo_labels.device))
        self.labels_epoch = self._clustering_epoch(int(ctx.epoch))
        self.reset_top_layer(ctx)

        sizes = torch.bincount(labels.cpu(), minlength=self.k)
        logs: dict[str, float] = {
            "kmeans_loss": result.objective[-1],
            "kmeans_iters": float(len(result.objective)),
            "kmeans_splits": float(result.splits),
            "clusters_nonempty": float((sizes > 0).sum()),
            "cluster_max_frac": float(sizes.max()) / self.num_samples,
            "features_s": t_features,
            "clustering_s": time.perf_counter() - t0 - t_features,
        }
        if previous is not None:
            logs["nmi_prev"] = nmi(labels.cpu(), previous.cpu())
        if ctx.targets is not None:
            targets = torch.as_tensor(ctx.targets).cpu()
            if targets.shape != (self.num_samples,):
                raise ValueError(
                    f"ctx.targets has shape {tuple(targets.shape)}, expected "
                    f"({self.num_samples},): one true label per training image"
                )
            logs["nmi_true"] = nmi(labels.cpu(), targets)
        ctx.log(logs)

    def epoch_indices(self, ctx: EngineContext) -> np.ndarray:
        """This epoch's sample list: ``num_samples`` positions, uniform over non-empty clusters."""
        if self.labels_epoch != self._clustering_epoch(ctx.epoch):
            raise RuntimeError(
                f"DeepCluster.epoch_indices(epoch={ctx.epoch}) was called but the pseudo-labels "
                f"are from epoch {self.labels_epoch}; call on_epoch_start(ctx) first"
            )
        return uniform_label_sampler(
            self.pseudo_labels, self.num_samples, derive_seed(ctx.seed, ctx.epoch, _SAMPLER)
        )

    def before_step(self, ctx: EngineContext) -> None:
        """Without top-layer momentum: drop its momentum buffer, so SGD steps it plainly."""
        if self.top_layer_momentum:
            return
        for p in self.top_layer.parameters():
            state = ctx.optimizer.state.get(p)
            if state:
                state.pop("momentum_buffer", None)

    def training_step(self, views: list[Tensor], indices: Tensor) -> StepOutput:
        """Cross-entropy of ``top_layer(backbone(x))`` against the pseudo-labels of ``indices``.

        Args:
            views: One ``(B, 3, H, W)`` batch in [0, 1].
            indices: ``(B,)`` positions of the images in the training set.

        Returns:
            :class:`StepOutput` with the loss, ``recon_inputs=[x]`` and logs ``ce`` (the loss)
            and ``pseudo_acc`` (fraction of the batch whose pseudo-label is the argmax).
        """
        if len(views) != 1:
            raise ValueError(
                f"DeepCluster trains on one view per image, got {len(views)}; set data.augment "
                "to a single preset, e.g. [crop_flip]"
            )
        if self.labels_epoch < 0:
            raise RuntimeError(
                "DeepCluster has no pseudo-labels yet: on_epoch_start(ctx) must cluster the "
                "data before the first training_step"
            )
        x = views[0]
        indices = torch.as_tensor(indices, device=self.pseudo_labels.device).long()
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise IndexError(
                f"indices must be training-set positions in [0, {self.num_samples}), got "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        targets = self.pseudo_labels[indices].to(x.device)
        logits = self.top_layer(self.backbone(x))
        loss = F.cross_entropy(logits, targets)
        with torch.no_grad():
            accuracy = (logits.argmax(1) == targets).float().mean()
        return StepOutput(
            loss, recon_inputs=[x], logs={"ce": loss.detach(), "pseudo_acc": accuracy}
        )

    # -- state -----------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """``labels_epoch`` (the pseudo-labels themselves are the ``pseudo_labels`` buffer)."""
        return {"labels_epoch": int(self.labels_epoch)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state` (after ``load_state_dict`` restored the labels)."""
        if "labels_epoch" not in state:
            raise KeyError(
                f"DeepCluster extra state lacks 'labels_epoch' (got keys {sorted(state)}); was "
                "the checkpoint written by another method?"
            )
        self.labels_epoch = int(state["labels_epoch"])

    # -- pieces ----------------------------------------------------------------------------------
    def reset_top_layer(self, ctx: EngineContext) -> None:
        """Re-draw the top layer in place (``N(0, 0.01)``, zero bias) and drop its optimizer
        state, seeded by ``(ctx.seed, ctx.epoch)``."""
        self._init_top_layer(
            torch.Generator().manual_seed(derive_seed(ctx.seed, ctx.epoch, _TOP_LAYER))
        )
        for p in self.top_layer.parameters():
            ctx.optimizer.state.pop(p, None)

    def _init_top_layer(self, generator: torch.Generator) -> None:
        weight = self.top_layer.weight
        with torch.no_grad():
            draw = torch.empty(weight.shape, dtype=weight.dtype)
            weight.copy_(draw.normal_(0.0, 0.01, generator=generator).to(weight.device))
            self.top_layer.bias.zero_()

    def _features(self, ctx: EngineContext) -> Tensor:
        """``(num_samples, D)`` features of the training set, rows in position order."""
        features, indices = ctx.extract(self.layer)
        features = features.detach()
        if features.ndim > 2:
            features = features.flatten(1)
        indices = torch.as_tensor(indices).long()
        expected = torch.arange(self.num_samples, device=indices.device)
        if features.shape[0] != indices.numel():
            raise RuntimeError(
                f"ctx.extract returned {features.shape[0]} feature rows but {indices.numel()} "
                "indices; they must match row for row"
            )
        if not torch.equal(indices, expected):
            order = torch.argsort(indices)
            if not torch.equal(indices[order], expected):
                raise RuntimeError(
                    f"ctx.extract must return each of the {self.num_samples} training positions "
                    f"exactly once, got {indices.numel()} indices covering "
                    f"{int(torch.unique(indices).numel())} positions"
                )
            features = features[order.to(features.device)]
        if features.shape[1] < self.pca_dim:
            raise ValueError(
                f"layer {self.layer!r} gives {features.shape[1]} features, fewer than "
                f"method.pca_dim={self.pca_dim}; lower method.pca_dim"
            )
        return features


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _check_layer(backbone: nn.Module, layer: str) -> int | None:
    """Validate ``layer``; return its feature dimension when it is known without a forward."""
    modules = dict(backbone.named_modules())
    if layer and layer in modules:
        module = modules[layer]
        return module.out_features if isinstance(module, nn.Linear) else None
    probe_points = tuple(getattr(backbone, "probe_points", ()))
    if layer in probe_points:
        feature_dim = getattr(backbone, "feature_dim", None)
        return int(feature_dim(layer)) if callable(feature_dim) else None
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    raise ValueError(
        f"method.layer={layer!r} is neither a submodule nor a probe point of "
        f"{type(backbone).__name__}; DeepCluster clusters fc7 before its ReLU: 'fc7.1' on the "
        f"AlexNets. Linear submodules: {linears or 'none'}; probe points: {list(probe_points)}"
    )


def _groups_of(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> list[dict] | None:
    """The optimizer's param groups that hold ``params`` (None if some are missing)."""
    groups, found = [], set()
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        hit = {id(p) for p in params} & ids
        if hit:
            groups.append(group)
            found |= hit
    return groups if len(found) == len(params) else None


METHOD = DeepCluster
