"""Reference row ``supervised``: the same backbone trained with the true labels.

Like the *Supervised* rows of the paper's Table 1: an upper bound at the same scale, same data,
same augmentation and the same evaluation as the self-supervised runs. Cross-entropy of a linear
classifier on the backbone's output (``out_dim``) against the training labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..schema import at_least
from .base import EngineContext, Method, MethodConfig, StepOutput, out_dim_of

__all__ = ["Supervised", "SupervisedConfig"]


@dataclass(frozen=True)
class SupervisedConfig(MethodConfig):
    """The supervised reference row's one setting.

    Attributes:
        num_classes: Outputs of the linear classifier (more than the largest label).
    """

    num_classes: int = field(default=10, metadata=at_least(1))


class Supervised(Method):
    """Linear classifier on the backbone, trained with the true labels.

    The paper's *Supervised* rows (Hizioglu 2020, Table 1): an upper bound at the same scale.
    Shapes: ``training_step`` takes one view ``(B, 3, H, W)`` in [0, 1] and ``indices (B,)``
    (the labels are looked up by position); the classifier maps ``(B, out_dim)`` to
    ``(B, num_classes)`` logits.

    Args:
        backbone: The encoder; ``backbone(x)`` returns ``(B, backbone.out_dim)`` features.
        num_samples: Size of the training set (the length of ``labels``).
        config: The hyperparameters (:class:`SupervisedConfig`), or a mapping of its keys.
        **overrides: Hyperparameters that replace those of ``config``.

    Attributes:
        classifier: ``Linear(backbone.out_dim, num_classes)``.
        labels: Buffer (``num_samples``) of true labels, copied from the engine at start.

    Example:
        >>> from adapters.backbones import AlexNetCIFAR
        >>> method = Supervised(AlexNetCIFAR(width=0.25), num_samples=1000, num_classes=10)
        >>> method.classifier  # fc7 (1024 at width 0.25) -> the classes
        Linear(in_features=1024, out_features=10, bias=True)
    """

    name: ClassVar[str] = "supervised"
    views = ("crop_flip",)
    Config: ClassVar[type[MethodConfig]] = SupervisedConfig
    config: SupervisedConfig

    def __init__(self, backbone: nn.Module, num_samples: int,
                 config: SupervisedConfig | dict[str, Any] | None = None,
                 **overrides: Any) -> None:
        super().__init__(backbone, num_samples, config, **overrides)
        self.classifier = nn.Linear(out_dim_of(backbone, "supervised"), self.config.num_classes)
        self.register_buffer("labels", torch.zeros(num_samples, dtype=torch.long))

    def on_train_start(self, ctx: EngineContext) -> None:
        """Copy the training set's labels (``ctx.targets``), refusing more classes than outputs."""
        if int(ctx.targets.max()) >= self.classifier.out_features:
            raise ValueError(f"labels go up to {int(ctx.targets.max())}: set "
                             f"method.num_classes > {int(ctx.targets.max())}.")
        self.labels.copy_(ctx.targets.to(self.labels.device))

    def training_step(self, views: list[Tensor], indices: Tensor) -> StepOutput:
        x = views[0]
        logits = self.classifier(self.backbone(x))
        y = self.labels[indices]
        acc = (logits.argmax(1) == y).float().mean()
        return StepOutput(F.cross_entropy(logits, y), recon_inputs=[x], logs={"train_acc": acc})

