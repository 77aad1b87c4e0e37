"""Reference row ``supervised``: the same backbone trained with the true labels.

Like the *Supervised* rows of the paper's Table 1: an upper bound at the same scale, same data,
same augmentation and the same evaluation as the self-supervised runs. Cross-entropy of a linear
classifier on the backbone's output (``out_dim``) against the training labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import EngineContext, Method, StepOutput


class Supervised(Method):
    """Linear classifier on the backbone, trained with the true labels.

    Attributes:
        classifier: ``Linear(backbone.out_dim, num_classes)``.
        labels: Buffer (``num_samples``) of true labels, copied from the engine at start.
    """

    name = "supervised"
    views = ("crop_flip",)

    def __init__(self, backbone: nn.Module, num_samples: int, num_classes: int = 10) -> None:
        super().__init__(backbone, num_samples)
        self.classifier = nn.Linear(backbone.out_dim, num_classes)
        self.register_buffer("labels", torch.zeros(num_samples, dtype=torch.long))

    def on_train_start(self, ctx: EngineContext) -> None:
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


METHOD = Supervised
