"""Linear probe on frozen features: a standardised probe trained to convergence, or RegLog.

Two recipes, named by ``recipe=``:

- ``"standardized"`` (the default): the features are z-scored with the training features' mean
  and standard deviation per dimension (a frozen :class:`Standardize` in front of the
  ``nn.Linear``; the same role as the ``BatchNorm1d(affine=False)`` of MAE's linear probe,
  He et al. 2022, ``facebookresearch/mae`` ``main_linprobe.py``), so the probe reads the same
  network whatever the scale of its features; SGD trains until the training loss has levelled
  off (:class:`~adapters.evaluation.Plateau`: lr x 0.1 on a plateau, stop at the
  third), and the result reports the final training loss and top-1 and whether it levelled off.
  Trained to convergence, a linear layer on ~1k standardised dims overfits 20k images (train
  60%, test 44% on an untrained AlexNet-CIFAR's conv5), so the weight decay is chosen from
  :data:`WEIGHT_DECAYS` on a held-out 20% of the *training* features, then the probe is
  trained on all of them: the l2 selection on a validation split of SimCLR's linear evaluation
  (Chen et al., ICML 2020, Appendix B.8). The test set is never used to choose anything. On
  CUDA the candidates train at once as one stacked layer (``search=``, :mod:`._search`).
  Why: DeepCluster's recipe, plain SGD on raw features for a fixed number of steps, reads the
  *scale* of the features as much as their content. On an untrained AlexNet-CIFAR it gave 32%
  where the same features standardised give 47%.
- ``"reglog"``: DeepCluster's ``RegLog`` as published, for comparison with its papers. Paper:
  Caron et al., ECCV 2018, Sec. 4.2; code ``facebookresearch/deepcluster`` ``eval_linear.py``
  (``RegLog``, ``train``) and ``util.py`` (``learning_rate_decay``): raw features into one
  ``nn.Linear`` with bias and no BatchNorm; SGD lr 0.01, momentum 0.9, weight decay 1e-4,
  batch 256, 90 epochs, ``lr_t = lr / sqrt(1 + lr * wd * t)`` per iteration, seed 31.

Both recipes pool conv maps as ``RegLog``'s per-layer ``AvgPool2d`` does (about 9-10k dims;
``pool="deepcluster"``, see :func:`~adapters.evaluation.features.pool_features`) and keep the
encoder frozen in eval mode. Deviations from ``eval_linear.py``, in both recipes: features are
extracted once from un-augmented images and cached (the original re-runs the encoder on
augmented crops every step: ``epochs`` encoder passes instead of one at CPU scale); one view per
test image (no ten-crop); the accuracy after the last epoch is reported (the original also logs
the best epoch, which selects on the test set).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _search, _training
from ._common import check_features_targets, infer_num_classes, resolve_device
from .features import PoolSpec, evaluate_layers, pool_features, pool_name

REFERENCES = {
    "standardized": "facebookresearch/mae main_linprobe.py (BatchNorm1d(affine=False) + "
                    "Linear), trained until the training loss levels off",
    "reglog": "facebookresearch/deepcluster eval_linear.py (RegLog) + util.py "
              "learning_rate_decay",
}
LR_SCHEDULES = ("plateau", "deepcluster", "step", "constant")
SEARCHES = ("auto", "batched", "sequential")
WEIGHT_DECAYS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
RECIPES: dict[str, dict[str, Any]] = {
    "standardized": dict(standardize=True, epochs=100, lr=0.05, lr_schedule="plateau",
                         weight_decay=WEIGHT_DECAYS),
    "reglog": dict(standardize=False, epochs=90, lr=0.01, lr_schedule="deepcluster",
                   weight_decay=1e-4),
}


class Standardize(nn.Module):
    """Frozen per-dimension z-scoring: ``(x - mean) / std`` with statistics given once.

    The role of the ``BatchNorm1d(affine=False)`` in front of MAE's linear probe (He et al.,
    CVPR 2022, ``facebookresearch/mae`` ``main_linprobe.py``), with the statistics of all the
    training features, fixed before the probe trains. Dimensions whose standard deviation is 0
    (constant features, e.g. dead ReLUs) are divided by 1, so they map to 0 instead of NaN.

    Attributes:
        mean, std: Buffers of shape (D,).

    Example:
        >>> x = torch.randn(100, 3) * torch.tensor([1e-3, 1.0, 1e3])
        >>> z = Standardize.fit(x)(x)
        >>> torch.allclose(z.std(0), torch.ones(3), atol=1e-5)
        True
    """

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", torch.where(std > 0, std, torch.ones_like(std)))

    @classmethod
    def fit(cls, x: Tensor) -> Standardize:
        """Statistics of ``x`` (N, D), computed in float64."""
        x64 = x.double()
        return cls(x64.mean(0).to(x.dtype), x64.std(0).to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """``(N, D) -> (N, D)``, z-scored."""
        return (x - self.mean) / self.std


def _prepare(
    train_features: Tensor,
    train_targets: Tensor,
    test_features: Tensor,
    test_targets: Tensor,
    pool: PoolSpec,
    target_dim: int,
) -> tuple[Tensor, Tensor]:
    check_features_targets(train_features, train_targets, "train")
    check_features_targets(test_features, test_targets, "test")
    train_x = pool_features(train_features, pool, target_dim=target_dim).flatten(1).float()
    test_x = pool_features(test_features, pool, target_dim=target_dim).flatten(1).float()
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train features have dimension {train_x.shape[1]} but test features "
            f"{test_x.shape[1]}; extract both from the same layer with the same pooling."
        )
    if not (torch.isfinite(train_x).all() and torch.isfinite(test_x).all()):
        raise ValueError("features contain NaN or inf; check the encoder's outputs.")
    return train_x, test_x


def linear_probe(
    train_features: Tensor,
    train_targets: Tensor,
    test_features: Tensor,
    test_targets: Tensor,
    *,
    recipe: str = "standardized",
    num_classes: int | None = None,
    pool: PoolSpec = "deepcluster",
    target_dim: int = 9600,
    standardize: bool | None = None,
    epochs: int | None = None,
    batch_size: int = 256,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float | Sequence[float] | None = None,
    lr_schedule: str | None = None,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    plateau: _training.Plateau | None = None,
    val_fraction: float = 0.2,
    seed: int = 31,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    return_classifier: bool = False,
    search: str = "auto",
) -> dict[str, Any]:
    """Train a linear classifier on cached frozen features and report test accuracy.

    Args:
        train_features: Train features, (N_train, C, H, W) conv maps or (N_train, D).
        train_targets: Int64 labels (N_train,).
        test_features: Test features with the same trailing shape, (N_test, ...).
        test_targets: Int64 labels (N_test,).
        recipe: ``"standardized"`` (default) or ``"reglog"`` (see the module docstring); it
            fills the arguments below that are left as ``None``.
        num_classes: Inferred as max label + 1 when ``None``.
        pool: Reduction of conv maps (default DeepCluster-style pooling to <= ``target_dim``
            dims; 2-D features pass through). See :func:`pool_features`.
        target_dim: Dimension budget of ``pool="deepcluster"`` (9600 as in ``RegLog``).
        standardize: z-score the inputs with the training statistics (standardized: True).
        epochs: Epochs (reglog: 90), or at most this many with ``lr_schedule="plateau"``
            (standardized: 100).
        batch_size: Mini-batch size (256).
        lr: Initial learning rate (standardized 0.05, reglog 0.01).
        momentum: SGD momentum (0.9).
        weight_decay: SGD weight decay (reglog: 1e-4, DeepCluster's ``--weight_decay -4``), or
            a list of them to choose from on a held-out ``val_fraction`` of the training
            features (standardized: :data:`WEIGHT_DECAYS`).
        lr_schedule: ``"plateau"`` (train until the loss levels off, see ``plateau``),
            ``"deepcluster"`` (lr / sqrt(1 + lr * wd * iteration)), ``"step"`` (x ``gamma`` at
            each epoch in ``milestones``) or ``"constant"``.
        milestones: Epochs for ``"step"``; default 50% and 75% of ``epochs``.
        gamma: Step decay factor.
        plateau: The levelling-off rule of ``"plateau"`` (default :class:`Plateau()`).
        val_fraction: Share of the training features held out (seeded) to choose the weight
            decay when several are given.
        seed: Seeds the classifier's init and the shuffling (31, DeepCluster's default).
        device: Where the classifier trains (default CPU).
        progress: Show a tqdm bar over epochs (``None``: only on a terminal).
        return_classifier: Add the trained classifier (``Standardize`` + ``nn.Linear`` when
            standardised) under ``"classifier"``.
        search: How several weight decays are tried: ``"sequential"`` (one probe after the
            other), ``"batched"`` (all at once as one stacked layer: the same function with
            other floating-point operations, see :mod:`adapters.evaluation._search`) or
            ``"auto"`` (batched on CUDA, where a probe step is bound by the host, else
            sequential).

    Returns:
        Dict with ``"protocol": "linear"``, the recipe and every parameter above,
        ``"feature_dim"``, ``"num_train"``, ``"num_test"``, ``"augmentation"``, the last epoch's
        ``"train_loss"``/``"train_top1"``, ``"epochs_run"``, ``"levelled_off"`` (None without a
        plateau rule), ``"loss_curve"`` (per epoch), test ``"top1"``/``"top5"`` (percent) and
        ``"test_loss"``; with a weight-decay choice, ``"weight_decay"`` is the chosen value and
        ``"val_top1"`` and ``"val_epochs"`` map each candidate to its held-out top-1 and the
        epochs it trained, and ``"weight_decay_search"`` says how they were trained.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(512, 32), torch.randint(0, 4, (512,))
        >>> x[torch.arange(512), y] += 4.0  # linearly separable
        >>> r = linear_probe(x[:384], y[:384], x[384:], y[384:])
        >>> r["top1"] > 90, r["levelled_off"]
        (True, True)
    """
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}.")
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}.")
    given = dict(standardize=standardize, epochs=epochs, lr=lr, lr_schedule=lr_schedule,
                 weight_decay=weight_decay)
    filled = {k: RECIPES[recipe][k] if v is None else v for k, v in given.items()}
    standardize, epochs, lr, lr_schedule, weight_decay = (filled[k] for k in given)
    _check_schedule(lr_schedule, epochs, batch_size, lr, plateau)
    if isinstance(weight_decay, Sequence):
        candidates = [float(wd) for wd in weight_decay]
        if not candidates or any(not wd >= 0 for wd in candidates):
            raise ValueError(f"weight_decay must be >= 0 or a non-empty list of such values, got "
                             f"{weight_decay!r}.")
        if len(candidates) > 1:
            return _choose_weight_decay(
                candidates, train_features, train_targets, test_features, test_targets,
                val_fraction=val_fraction, recipe=recipe, num_classes=num_classes, pool=pool,
                target_dim=target_dim, standardize=standardize, epochs=epochs,
                batch_size=batch_size, lr=lr, momentum=momentum, lr_schedule=lr_schedule,
                milestones=milestones, gamma=gamma, plateau=plateau, seed=seed, device=device,
                progress=progress, return_classifier=return_classifier, search=search)
        weight_decay = candidates[0]
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    train_x, test_x = _prepare(
        train_features, train_targets, test_features, test_targets, pool, target_dim
    )
    num_classes = infer_num_classes(num_classes, train_targets, test_targets)
    device = resolve_device(device)
    train_y, test_y = train_targets.long(), test_targets.long()

    with _training.seeded(seed):
        linear = nn.Linear(train_x.shape[1], num_classes)
    classifier = nn.Sequential(Standardize.fit(train_x), linear) if standardize else linear
    classifier = classifier.to(device)
    optimizer = torch.optim.SGD(
        linear.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    steps, plateau, schedule = _schedule(lr_schedule, lr, epochs, milestones, gamma, plateau)

    def lr_at(epoch: int, iteration: int) -> float:
        return schedule(epoch, iteration, weight_decay)

    settings = {
        "protocol": "linear",
        "recipe": recipe,
        "standardize": standardize,
        "pool": pool_name(pool),
        "target_dim": target_dim,
        "num_classes": num_classes,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
        "lr_schedule": lr_schedule,
        "milestones": steps,
        "gamma": gamma if lr_schedule == "step" else None,
        "plateau": dataclasses.asdict(plateau) if plateau is not None else None,
        "seed": seed,
    }
    return _training.fit_and_report(
        classifier, optimizer, train_x, train_y, test_x, test_y, settings,
        reference=REFERENCES[recipe], return_classifier=return_classifier, epochs=epochs,
        batch_size=batch_size, lr_at=lr_at, seed=seed, device=device, progress=progress,
        desc="linear probe", plateau=plateau,
    )


def _check_schedule(lr_schedule: str, epochs: int, batch_size: int, lr: float,
                    plateau: _training.Plateau | None) -> None:
    """Refuse a schedule the probe cannot train with, before any features are touched."""
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}.")
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {epochs}, {batch_size}.")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}.")
    if plateau is not None and lr_schedule != "plateau":
        raise ValueError(f"plateau= is used only with lr_schedule='plateau', not {lr_schedule!r}.")


def _schedule(lr_schedule: str, lr: float, epochs: int, milestones: Sequence[int] | None,
              gamma: float, plateau: _training.Plateau | None
              ) -> tuple[list[int] | None, _training.Plateau | None,
                         Callable[[int, int, float], float]]:
    """(the step milestones or None, the plateau rule or None, ``(epoch, iteration,
    weight_decay) -> lr``) of a checked schedule."""
    steps = None
    if lr_schedule == "step":
        steps = _training.scaled_milestones(epochs, milestones, (0.5, 0.75))
    if lr_schedule == "plateau":
        plateau = plateau or _training.Plateau()

    def lr_at(epoch: int, iteration: int, weight_decay: float) -> float:
        if lr_schedule == "deepcluster":
            return _training.inverse_sqrt_lr(lr, iteration, weight_decay)
        if lr_schedule == "step":
            return _training.step_lr(lr, epoch, steps, gamma)
        return lr

    return steps, plateau, lr_at


def _choose_weight_decay(candidates: list[float], train_features: Tensor, train_targets: Tensor,
                         test_features: Tensor, test_targets: Tensor, *, val_fraction: float,
                         **kwargs: Any) -> dict[str, Any]:
    """Pick the weight decay with the best top-1 on a held-out split of the training features,
    then train on all of them with it."""
    n = train_features.shape[0]
    held = round(val_fraction * n)
    if not 0 < val_fraction < 1 or held < 1 or held >= n:
        raise ValueError(f"val_fraction={val_fraction!r} leaves no validation or no training "
                         f"sample out of {n}; use a value in (0, 1) and more samples.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(kwargs["seed"]))
    val, fit = order[:held], order[held:]
    num_classes = infer_num_classes(kwargs.pop("num_classes"), train_targets, test_targets)
    final_kwargs = dict(kwargs)
    kwargs["return_classifier"] = False
    device = resolve_device(kwargs["device"])
    search = kwargs["search"]
    if search == "auto":
        search = "batched" if device.type == "cuda" else "sequential"
    if search == "batched":
        scores, epochs = _batched_scores(
            candidates, train_features[fit], train_targets[fit], train_features[val],
            train_targets[val], num_classes=num_classes, **{**kwargs, "device": device})
    else:
        scores, epochs = {}, {}
        for wd in candidates:
            res = linear_probe(train_features[fit], train_targets[fit], train_features[val],
                               train_targets[val], weight_decay=wd, num_classes=num_classes,
                               **kwargs)
            scores[wd], epochs[wd] = res["top1"], res["epochs_run"]
    best = max(candidates, key=lambda wd: scores[wd])  # the first (smallest) among ties
    result = linear_probe(train_features, train_targets, test_features, test_targets,
                          weight_decay=best, num_classes=num_classes, **final_kwargs)
    result.update(val_top1=scores, val_epochs=epochs, val_fraction=val_fraction,
                  weight_decay=best, weight_decay_search=search)
    return result


def _batched_scores(candidates: list[float], fit_x: Tensor, fit_y: Tensor, val_x: Tensor,
                    val_y: Tensor, *, num_classes: int, device: torch.device, pool: PoolSpec,
                    target_dim: int, standardize: bool, epochs: int, batch_size: int, lr: float,
                    momentum: float, lr_schedule: str, milestones: Sequence[int] | None,
                    gamma: float, plateau: _training.Plateau | None, seed: int,
                    progress: bool | None, **_: Any) -> tuple[dict, dict]:
    """The held-out top-1 and epochs of every candidate, trained at once
    (:func:`_search.val_scores`) from what :func:`linear_probe` would build for each: the same
    features, initialisation and schedule."""
    train_x, held_x = _prepare(fit_x, fit_y, val_x, val_y, pool, target_dim)
    _, plateau, lr_at = _schedule(lr_schedule, lr, epochs, milestones, gamma, plateau)
    with _training.seeded(seed):
        init = nn.Linear(train_x.shape[1], num_classes)
    return _search.val_scores(
        candidates, train_x, fit_y, held_x, val_y, init,
        standardize=Standardize.fit(train_x) if standardize else None, epochs=epochs,
        batch_size=batch_size, momentum=momentum, lr_at=lr_at, plateau=plateau, seed=seed,
        device=device, progress=progress)


def linear_probe_eval(
    model: nn.Module,
    train_batches: Iterable[Any],
    test_batches: Iterable[Any],
    layer: str | Sequence[str],
    device: str | torch.device | None = None,
    *,
    pool: PoolSpec = "deepcluster",
    target_dim: int = 9600,
    progress: bool | None = None,
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Extract frozen features of ``layer`` once, then run :func:`linear_probe` on them.

    Pooling is applied per batch during extraction, so only the pooled features are cached
    (e.g. 50,000 x 9,216 floats = 1.8 GB for a full ImageNet-style conv5; for CIFAR-size maps
    much less).

    Args:
        model: Encoder (a recon-aux backbone or any ``nn.Module``; see :func:`extract_features`).
        train_batches: Un-augmented ``(images, targets[, indices])`` train batches.
        test_batches: ``(images, targets[, indices])`` test batches.
        layer: Probe point / module name, or a list of them (e.g. ``["conv3", "conv4",
            "conv5"]`` for Table 2; features of all are extracted in one pass).
        device: Device of the forward pass and of probe training (default: the model's).
        pool: As in :func:`linear_probe`.
        target_dim: As in :func:`linear_probe`.
        progress: As in :func:`linear_probe`.
        **probe_kwargs: Passed to :func:`linear_probe` (``epochs``, ``lr``, ...).

    Returns:
        The :func:`linear_probe` result with ``"feature"`` (the layer); for a list of layers,
        ``{layer: result}``.

    Example:
        >>> linear_probe_eval(backbone, train_loader, test_loader, "conv5", epochs=10)
        ... # doctest: +SKIP
    """
    def probe(train_x, train_y, test_x, test_y, dev):
        return linear_probe(train_x, train_y, test_x, test_y, pool="none",
                            target_dim=target_dim, device=dev, progress=progress, **probe_kwargs)

    return evaluate_layers("linear", probe, model, train_batches, test_batches, layer, device,
                           pool, progress, target_dim=target_dim)
