"""DeepCluster (Caron et al., ECCV 2018): k-means pseudo-labels of fc7, re-computed every epoch.

Follows ``facebookresearch/deepcluster``; the provenance (paper, repository, commit, what is
followed) is in ``docs/methods/deepcluster.md``, and each deviation is a comment at the code it
concerns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.kmeans import BACKENDS, kmeans, preprocess_features, resolve_backend
from ..ops.nmi import nmi
from ..schema import SchemaError, at_least, one_of
from .base import EngineContext, Method, MethodConfig, StepOutput, out_dim_of

__all__ = ["DeepCluster", "DeepClusterConfig", "uniform_label_sampler", "derive_seed"]

# Streams of random numbers derived from (seed, epoch), one per use. Deviation: the original
# draws from a global NumPy RNG; seeding each use from (seed, epoch) makes a resume exact.
_KMEANS, _SAMPLER, _TOP_LAYER = 0, 1, 2


@dataclass(frozen=True)
class DeepClusterConfig(MethodConfig):
    """DeepCluster's hyperparameters (defaults: ``main.py`` / ``main.sh``).

    Attributes:
        k: Number of k-means clusters (original: 10000 on ImageNet); ``k < num_samples``.
        layer: What to cluster: a submodule name of the backbone (``"fc7.1"``: the fc7 Linear,
            i.e. fc7 before ReLU, as the original) or one of its probe points.
        pca_dim: PCA-whitening output dimension (original: 256); less than the number of
            training images and at most the clustered layer's dimension.
        pca_epsilon: Whitening regulariser as a fraction of the top eigenvalue, in [0, 1)
            (original: 0, faiss' default). With 0, features that span fewer than ``pca_dim``
            directions (dead fc units, a partial collapse) are an error; > 0 clusters them
            anyway without amplifying their degenerate directions.
        kmeans_iters: Lloyd iterations (original: 20).
        kmeans_backend: ``"auto"``, ``"torch"`` or ``"faiss"`` (see
            :mod:`adapters.ops.kmeans`).
        top_layer_momentum: False (original): plain SGD steps for the top layer; True: the
            optimizer's momentum applies to it too (within an epoch).
        views: Augmentation preset of the one training view (default the class's
            ``("crop_flip",)``); a single name is read as a one-element list.
        reassign: Epochs of training between two clusterings (the original's ``--reassign``,
            default 1); the top layer is re-drawn at each clustering. The original's epoch is an
            ImageNet epoch, ~5,000 steps; a 20k-image epoch is ~150, too few for a fresh top
            layer to fit its clusters, so CPU-scale recipes may re-assign less often.
    """

    k: int = field(default=10000, metadata=at_least(2))
    layer: str = "fc7.1"
    pca_dim: int = field(default=256, metadata=at_least(1))
    pca_epsilon: float = field(default=0.0, metadata=at_least(0))
    kmeans_iters: int = field(default=20, metadata=at_least(1))
    kmeans_backend: str = field(default="auto", metadata=one_of(*BACKENDS))
    top_layer_momentum: bool = False
    views: tuple[str, ...] | str | None = None
    reassign: int = field(default=1, metadata=at_least(1))

    def check(self) -> None:
        if not self.pca_epsilon < 1:
            raise SchemaError(f"method.pca_epsilon={self.pca_epsilon!r} must be in [0, 1) (a "
                              "fraction of the top eigenvalue; 0 is the original)")
        if isinstance(self.views, str):
            object.__setattr__(self, "views", (self.views,))
        if self.views is not None and len(self.views) != 1:
            raise SchemaError(
                f"DeepCluster trains on one augmented view, got views={list(self.views)}; "
                "give one preset, e.g. [crop_flip]"
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

    Paper: Caron, Bojanowski, Joulin, Douze, "Deep Clustering for Unsupervised Learning of
    Visual Features", ECCV 2018. Code followed: ``facebookresearch/deepcluster`` (``main.py``,
    ``clustering.py``, ``util.py``; ``docs/methods/deepcluster.md``).

    Shapes: ``training_step`` takes one view ``(B, 3, H, W)`` in [0, 1] and ``indices (B,)``;
    ``top_layer`` maps ``backbone(x)`` ``(B, out_dim)`` to ``(B, k)`` logits.

    Args:
        backbone: The encoder; ``forward`` gives the features the top layer classifies (fc7
            after ReLU for the AlexNets) and must have an ``out_dim`` attribute.
        num_samples: Size of the training set.
        config: The hyperparameters (:class:`DeepClusterConfig`), or a mapping of its keys.
        **overrides: Hyperparameters that replace those of ``config``.

    Attributes:
        top_layer: ``nn.Linear(backbone.out_dim, k)``, re-initialised every epoch.
        pseudo_labels: Buffer ``(num_samples,)`` int64, the current epoch's cluster of each
            training image (``-1`` before the first clustering); checkpointed with the
            method's state dict.
        labels_epoch: Epoch whose clustering ``pseudo_labels`` holds (``-1``: none yet).
        k: The number of clusters in force; ``layer``, ``pca_dim``, ``pca_epsilon``,
            ``kmeans_iters``, ``kmeans_backend``, ``top_layer_momentum`` and ``reassign`` are
            the other hyperparameters in force, as attributes too.

    Example:
        The engine calls ``on_epoch_start(ctx)``, which clusters, then ``epoch_indices`` for the
        epoch's order, then ``training_step`` per batch.

        >>> from adapters.backbones import AlexNetCIFAR
        >>> method = DeepCluster(AlexNetCIFAR(width=0.25), num_samples=1000, k=100)
        >>> method.top_layer  # fc7 (1024 at width 0.25) -> k
        Linear(in_features=1024, out_features=100, bias=True)
        >>> method.pseudo_labels[:3]  # -1 until the first clustering
        tensor([-1, -1, -1])
    """

    name: ClassVar[str] = "deepcluster"
    # Deviation: pad-4 random crop + flip (the CIFAR standard) where the original's ImageNet
    # training uses RandomResizedCrop(224) + flip; inputs in [0, 1] without the ImageNet
    # mean/std (a BatchNorm follows conv1). The original's PIC clustering is not implemented.
    views: tuple[str, ...] = ("crop_flip",)
    Config: ClassVar[type[MethodConfig]] = DeepClusterConfig
    config: DeepClusterConfig

    def __init__(self, backbone: nn.Module, num_samples: int,
                 config: DeepClusterConfig | dict[str, Any] | None = None,
                 **overrides: Any) -> None:
        super().__init__(backbone, num_samples, config, **overrides)
        c = self.config
        self.num_samples = _positive_int(num_samples, "num_samples")
        if c.k >= self.num_samples:
            raise SchemaError(
                f"method.k={c.k} clusters for {num_samples} training images: need "
                f"2 <= k < {num_samples}; lower method.k or use more images"
            )
        if c.pca_dim >= self.num_samples:
            raise SchemaError(
                f"method.pca_dim={c.pca_dim} needs more than {c.pca_dim} training images, got "
                f"{num_samples}; lower method.pca_dim"
            )
        if c.kmeans_backend == "faiss":
            resolve_backend("faiss")  # raises with the install hint
        self.k, self.layer, self.pca_dim = c.k, c.layer, c.pca_dim
        self.pca_epsilon, self.kmeans_iters = c.pca_epsilon, c.kmeans_iters
        self.kmeans_backend, self.top_layer_momentum = c.kmeans_backend, c.top_layer_momentum
        self.reassign = c.reassign
        if c.views is not None:
            self.views = c.views
        layer_dim = _check_layer(backbone, self.layer)
        if layer_dim is not None and layer_dim < self.pca_dim:
            raise SchemaError(
                f"layer {self.layer!r} has {layer_dim} features, fewer than "
                f"method.pca_dim={self.pca_dim}; lower method.pca_dim to at most {layer_dim}"
            )
        self.top_layer = nn.Linear(out_dim_of(backbone, "DeepCluster"), self.k)
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
        return epoch - epoch % self.reassign

    def on_epoch_start(self, ctx: EngineContext) -> None:
        """Cluster the features, re-assign the pseudo-labels, re-initialise the top layer (on
        every ``reassign``-th epoch; the labels of the last clustering stay otherwise)."""
        if self.labels_epoch >= 0 and self.labels_epoch == self._clustering_epoch(ctx.epoch):
            return
        t0 = time.perf_counter()
        features = self._features(ctx)
        t_features = time.perf_counter() - t0
        # Deviation: "auto" is the pure-torch k-means on the training device (on the CPU as fast
        # as faiss-cpu within noise, benchmarks/studies/kmeans.py); "faiss" is the original's
        # faiss k-means on the CPU. They differ only in their random numbers and a vectorised
        # choice of the cluster to split (adapters/ops/kmeans.py).
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
        # Deviation (the original is single-process): every rank clusters the gathered features
        # from the same seed and rank 0's assignment is broadcast, so ranks agree even where
        # floating-point sums differ. The ids are k-means' own (0..k-1, empty ones unused); the
        # original renumbers the non-empty clusters to 0..m-1 but also keeps a k-way top layer.
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
        """Without top-layer momentum: drop its momentum buffer, so SGD steps it plainly.

        Deviation: the original trains the top layer with its own momentum-free
        ``SGD(top_layer, lr, weight_decay)``, re-created every epoch; the engine has one SGD
        with momentum for everything. Dropping the buffer before each step makes PyTorch's SGD
        take the plain ``lr * (grad + wd * w)`` step, exactly the original's update.
        """
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
        if features.ndim > 2:  # a spatial map (layer="conv5") is flattened; the original: fc7
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

