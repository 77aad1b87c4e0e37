"""Non-linear probe on frozen features (AET-project CIFAR-10 protocol, the paper's Table 3).

Paper: Zhang et al., "AET vs. AED: Unsupervised Representation Learning by Auto-Encoding
Transformations rather than Data" (CVPR 2019), Sec. 4.1 (CIFAR-10, "AET-project + FC": a
non-linear classifier on the second NIN conv block).
Code: maple-research-lab/AET. Classifier: ``cifar/affine/NonLinearClassifier.py``,
``Classifier(_cls_type='MultLayerFC2')`` (imported by ``cifar/projective/classification.py``,
which builds it with ``_nChannels=192*8*8`` on the ``conv2`` block output). Training recipe:
``cifar/projective/classification.py`` argument defaults plus the README's evaluation command
(``--epochs 200 --schedule 100 150 --gamma 0.1``). What is followed:

- head: Flatten -> Linear(D, min(20 * classes, 2048), bias=False) -> BatchNorm1d -> ReLU ->
  Linear(-> classes); hidden width 200 for CIFAR-10 (2000 for CIFAR-100);
- init as ``Classifier.initilize``: Linear weights ~ N(0, sqrt(2 / out_features)), biases 0,
  BatchNorm weight 1 and bias 0;
- features flattened without pooling (``pool="flatten"``: 192 x 8 x 8 = 12,288 for NIN conv2);
- SGD, lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4, batch size 128, 200 epochs, lr x 0.1
  at epochs 100 and 150 (``milestones=None`` scales these to 50% / 75% of ``epochs``);
- the encoder stays in eval mode (``net.eval()`` in the original's ``train``).

Deviations, and why:

- features are extracted **once** from un-augmented images and cached; the original runs the
  frozen encoder every step on augmented images (RandomCrop 32 with padding 4, horizontal flip).
  At CPU scale one encoder pass instead of ``epochs`` passes is what makes the protocol usable;
- accuracy is reported after the last epoch; the original prints the best test accuracy over all
  epochs, which selects on the test set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _training
from ._common import infer_num_classes, resolve_device
from .features import PoolSpec, evaluate_layers, pool_name
from .linear import _prepare

REFERENCE = (
    "maple-research-lab/AET cifar/affine/NonLinearClassifier.py (MultLayerFC2) + "
    "cifar/projective/classification.py"
)


class NonLinearHead(nn.Sequential):
    """AET's ``MultLayerFC2`` classifier: Linear(no bias) -> BatchNorm1d -> ReLU -> Linear.

    As ``maple-research-lab/AET`` ``cifar/affine/NonLinearClassifier.py`` (Zhang et al., CVPR
    2019), the non-linear probe of AET's CIFAR-10 results.

    Args:
        in_features: Flattened feature size D (12,288 for NIN conv2 on 32 x 32 inputs).
        num_classes: Number of classes.
        hidden: Hidden width; default ``min(20 * num_classes, 2048)`` as in AET (200 for 10
            classes).

    Shapes:
        (B, D) or (B, C, H, W) (flattened) -> (B, num_classes).

    Example:
        >>> head = NonLinearHead(192 * 8 * 8, 10)
        >>> head(torch.randn(4, 192, 8, 8)).shape
        torch.Size([4, 10])
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int | None = None):
        hidden = min(20 * num_classes, 2048) if hidden is None else hidden
        super().__init__(
            nn.Flatten(),
            nn.Linear(in_features, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        self.hidden = hidden
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, (2.0 / module.out_features) ** 0.5)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm1d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def nonlinear_probe(
    train_features: Tensor,
    train_targets: Tensor,
    test_features: Tensor,
    test_targets: Tensor,
    *,
    num_classes: int | None = None,
    pool: PoolSpec = "flatten",
    hidden: int | None = None,
    epochs: int = 200,
    batch_size: int = 128,
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
    milestones: Sequence[int] | None = None,
    gamma: float = 0.1,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    return_classifier: bool = False,
) -> dict[str, Any]:
    """Train AET's non-linear classifier (:class:`NonLinearHead`) on cached frozen features.

    Args:
        train_features: (N_train, C, H, W) or (N_train, D) features.
        train_targets: Int64 labels (N_train,).
        test_features: (N_test, ...) features with the same trailing shape.
        test_targets: Int64 labels (N_test,).
        num_classes: Inferred as max label + 1 when ``None``.
        pool: Reduction before the head; default ``"flatten"`` (AET flattens conv2).
        hidden: Hidden width; default ``min(20 * num_classes, 2048)``.
        epochs: Training epochs (200 in AET).
        batch_size: Mini-batch size (128).
        lr: Initial learning rate (0.1).
        momentum: SGD momentum (0.9).
        nesterov: Nesterov momentum (True).
        weight_decay: Weight decay (5e-4).
        milestones: Epochs at which lr is multiplied by ``gamma``; default 50% and 75% of
            ``epochs`` (= AET's 100, 150 for 200 epochs).
        gamma: Step decay factor (0.1).
        seed: Seeds the head's init and the shuffling (AET draws a random seed).
        device: Where the head trains (default CPU).
        progress: Show a tqdm bar over epochs (``None``: only on a terminal).
        return_classifier: Add the trained head under ``"classifier"``.

    Returns:
        Dict with ``"protocol": "nonlinear"``, the parameters above, ``"feature_dim"``,
        ``"num_train"``, ``"num_test"``, ``"augmentation"``, final-epoch ``"train_loss"`` /
        ``"train_top1"``, and test ``"top1"`` / ``"top5"`` (percent) and ``"test_loss"``.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(600, 16), torch.randint(0, 3, (600,))
        >>> x[:, 0] += 8.0 * y  # separable along one direction
        >>> r = nonlinear_probe(x[:500], y[:500], x[500:], y[500:], epochs=10)
        >>> r["hidden"], r["top1"] > 90
        (60, True)
    """
    if epochs < 1 or batch_size < 2:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {epochs}, {batch_size}.")
    train_x, test_x = _prepare(
        train_features, train_targets, test_features, test_targets, pool, target_dim=9600
    )
    num_classes = infer_num_classes(num_classes, train_targets, test_targets)
    device = resolve_device(device)
    with _training.seeded(seed):
        head = NonLinearHead(train_x.shape[1], num_classes, hidden).to(device)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
    )
    steps = _training.scaled_milestones(epochs, milestones, (0.5, 0.75))
    settings = {
        "protocol": "nonlinear",
        "head": "Linear(no bias)-BatchNorm1d-ReLU-Linear",
        "pool": pool_name(pool),
        "hidden": head.hidden,
        "num_classes": num_classes,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "momentum": momentum,
        "nesterov": nesterov,
        "weight_decay": weight_decay,
        "lr_schedule": "step",
        "milestones": steps,
        "gamma": gamma,
        "seed": seed,
    }
    return _training.fit_and_report(
        head, optimizer, train_x, train_targets.long(), test_x, test_targets.long(), settings,
        reference=REFERENCE, return_classifier=return_classifier, epochs=epochs,
        batch_size=batch_size, lr_at=lambda epoch, _it: _training.step_lr(lr, epoch, steps, gamma),
        seed=seed, device=device, progress=progress, desc="non-linear probe",
    )


def nonlinear_probe_eval(
    model: nn.Module,
    train_batches: Iterable[Any],
    test_batches: Iterable[Any],
    layer: str | Sequence[str],
    device: str | torch.device | None = None,
    *,
    pool: PoolSpec = "flatten",
    progress: bool | None = None,
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Extract frozen features of ``layer`` once, then run :func:`nonlinear_probe` on them.

    Args:
        model: Encoder (a recon-aux backbone or any ``nn.Module``; see :func:`extract_features`).
        train_batches: Un-augmented ``(images, targets[, indices])`` train batches.
        test_batches: ``(images, targets[, indices])`` test batches.
        layer: Probe point / module name (AET: the NIN ``conv2`` block), or a list of them.
        device: Device of the forward pass and of probe training (default: the model's).
        pool: As in :func:`nonlinear_probe`.
        progress: As in :func:`nonlinear_probe`.
        **probe_kwargs: Passed to :func:`nonlinear_probe` (``epochs``, ``lr``, ...).

    Returns:
        The :func:`nonlinear_probe` result with ``"feature"``; for a list, ``{layer: result}``.

    Example:
        >>> nonlinear_probe_eval(nin, train_loader, test_loader, "conv2", epochs=20)
        ... # doctest: +SKIP
    """
    def probe(train_x, train_y, test_x, test_y, dev):
        return nonlinear_probe(train_x, train_y, test_x, test_y, pool="none", device=dev,
                               progress=progress, **probe_kwargs)

    return evaluate_layers("nonlinear", probe, model, train_batches, test_batches, layer,
                           device, pool, progress)
