"""Linear probe on frozen features (DeepCluster ``eval_linear`` protocol).

Paper: Caron et al., "Deep Clustering for Unsupervised Learning of Visual Features" (ECCV 2018),
Sec. 4.2 / Table 1 ("linear classifiers on top of frozen convolutional layers"); used for the
"Linear Classifier / conv5" rows of Table 1 and the c3/c4/c5 columns of Table 2 in the paper.
Code: facebookresearch/deepcluster, ``eval_linear.py`` (``RegLog``, ``train``, ``main``) and
``util.py`` (``learning_rate_decay``). What is followed:

- the encoder is frozen and kept in eval mode, so its BatchNorm layers use running statistics
  ("freeze also batch norm layers");
- the conv map of the probed layer is average-pooled to about 9-10k dims
  (``RegLog``'s per-layer ``AvgPool2d``: 9216 or 9600 dims; here generalised as
  ``pool="deepcluster"``, see :func:`~recon_aux.evaluation.features.pool_features`), flattened,
  and fed to a single ``nn.Linear`` **with bias and without BatchNorm** (``RegLog`` has none);
- SGD, lr 0.01, momentum 0.9, weight decay 10**-4, batch size 256, 90 epochs, seed 31;
- the learning rate follows DeepCluster's per-iteration schedule
  ``lr_t = lr / sqrt(1 + lr * weight_decay * t)`` (``lr_schedule="deepcluster"``). The original
  does *not* use step decay; ``lr_schedule="step"`` (x ``gamma`` at ``milestones``) and
  ``"constant"`` are offered as options.

Deviations, and why:

- features are extracted **once** from un-augmented images and cached; the probe then trains on
  the cached tensors. The original re-runs the frozen network every step on augmented crops
  (Resize 256, RandomCrop 224, horizontal flip) - at CPU scale on 32x32 images that would cost
  ``epochs`` forward passes of the encoder instead of one;
- no ten-crop testing (``--tencrops``), a single view per test image;
- accuracy is reported after the last epoch (the original also logs the best epoch on the
  validation set, which selects on the test data).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _training
from ._common import check_features_targets, infer_num_classes, resolve_device
from .features import PoolSpec, evaluate_layers, pool_features, pool_name

REFERENCE = "facebookresearch/deepcluster eval_linear.py (RegLog) + util.py learning_rate_decay"
LR_SCHEDULES = ("deepcluster", "step", "constant")


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
    num_classes: int | None = None,
    pool: PoolSpec = "deepcluster",
    target_dim: int = 9600,
    epochs: int = 90,
    batch_size: int = 256,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    lr_schedule: str = "deepcluster",
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    seed: int = 31,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    return_classifier: bool = False,
) -> dict[str, Any]:
    """Train a linear classifier on cached frozen features and report test accuracy.

    Args:
        train_features: Train features, (N_train, C, H, W) conv maps or (N_train, D).
        train_targets: Int64 labels (N_train,).
        test_features: Test features with the same trailing shape, (N_test, ...).
        test_targets: Int64 labels (N_test,).
        num_classes: Inferred as max label + 1 when ``None``.
        pool: Reduction of conv maps (default DeepCluster-style pooling to <= ``target_dim``
            dims; 2-D features pass through). See :func:`pool_features`.
        target_dim: Dimension budget of ``pool="deepcluster"`` (9600 as in ``RegLog``).
        epochs: Training epochs (90 in DeepCluster; use a few at CPU scale).
        batch_size: Mini-batch size (256).
        lr: Initial learning rate (0.01).
        momentum: SGD momentum (0.9).
        weight_decay: SGD weight decay (1e-4, DeepCluster's ``--weight_decay -4``).
        lr_schedule: ``"deepcluster"`` (lr / sqrt(1 + lr * wd * iteration), the original),
            ``"step"`` (x ``gamma`` at each epoch in ``milestones``) or ``"constant"``.
        milestones: Epochs for ``"step"``; default 50% and 75% of ``epochs``.
        gamma: Step decay factor.
        seed: Seeds the classifier's init and the shuffling (31, DeepCluster's default).
        device: Where the classifier trains (default CPU).
        progress: Show a tqdm bar over epochs (``None``: only on a terminal).
        return_classifier: Add the trained ``nn.Linear`` under ``"classifier"``.

    Returns:
        Dict with ``"protocol": "linear"``, every parameter above, ``"feature_dim"``,
        ``"num_train"``, ``"num_test"``, ``"augmentation": "none (cached features)"``, final-epoch
        ``"train_loss"``/``"train_top1"``, and test ``"top1"``/``"top5"`` (percent) and
        ``"test_loss"``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(512, 32), torch.randint(0, 4, (512,))
        >>> x[torch.arange(512), y] += 4.0  # linearly separable
        >>> linear_probe(x[:384], y[:384], x[384:], y[384:], epochs=20, lr=0.1)["top1"] > 90
        True
    """
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}.")
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {epochs}, {batch_size}.")
    train_x, test_x = _prepare(
        train_features, train_targets, test_features, test_targets, pool, target_dim
    )
    num_classes = infer_num_classes(num_classes, train_targets, test_targets)
    device = resolve_device(device)
    train_y, test_y = train_targets.long(), test_targets.long()

    with _training.seeded(seed):
        classifier = nn.Linear(train_x.shape[1], num_classes).to(device)
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    steps = None
    if lr_schedule == "step":
        steps = _training.scaled_milestones(epochs, milestones, (0.5, 0.75))

    def lr_at(epoch: int, iteration: int) -> float:
        if lr_schedule == "deepcluster":
            return _training.inverse_sqrt_lr(lr, iteration, weight_decay)
        if lr_schedule == "step":
            return _training.step_lr(lr, epoch, steps, gamma)
        return lr

    settings = {
        "protocol": "linear",
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
        "seed": seed,
    }
    return _training.fit_and_report(
        classifier, optimizer, train_x, train_y, test_x, test_y, settings,
        reference=REFERENCE, return_classifier=return_classifier, epochs=epochs,
        batch_size=batch_size, lr_at=lr_at, seed=seed, device=device, progress=progress,
        desc="linear probe",
    )


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
        pool, target_dim, progress: As in :func:`linear_probe`.
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
