"""SimCLR as an engine method: the modern contrastive baseline, built from lightly's modules.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (google-research/simclr). The projection head and the loss are
lightly's own (``lightly.models.modules.SimCLRProjectionHead``, ``lightly.loss.NTXentLoss``), as
in lightly's ``examples/pytorch/simclr.py`` and its CIFAR-10 benchmark; the two views come from
the engine's batched ``simclr`` augmentation preset (RandomResizedCrop, flip, colour jitter 0.4 x
strength, grayscale 0.2, no blur: lightly's CIFAR-10 setting of ``SimCLRTransform``).
``examples/lightly_simclr.py`` is the same method as a plain loop with lightly's PIL transforms.
"""

from __future__ import annotations

from typing import Any

from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor, nn

from .base import Method, StepOutput


class SimCLR(Method):
    """Two augmented views, a projection MLP, and the NT-Xent (normalised temperature-scaled
    cross-entropy) loss between them; the other images of the batch are the negatives.

    Args:
        backbone: The encoder (its ``out_dim`` sizes the projection head).
        num_samples: Size of the training set (unused by SimCLR; the engine passes it).
        temperature: NT-Xent temperature (SimCLR: 0.5 for CIFAR-10; lightly's default 0.5).
        hidden_dim, out_dim: Projection MLP sizes (lightly's CIFAR-10 benchmark: 512, 128).
        gather_distributed: Gather negatives from every rank under DDP (lightly's option).

    Attributes:
        projection_head: ``SimCLRProjectionHead(backbone.out_dim, hidden_dim, out_dim)``.
        criterion: ``NTXentLoss(temperature, gather_distributed)``.
    """

    name = "simclr"
    views = ("simclr", "simclr")

    def __init__(self, backbone: nn.Module, num_samples: int, temperature: float = 0.5,
                 hidden_dim: int = 512, out_dim: int = 128, gather_distributed: bool = True,
                 **unknown: Any) -> None:
        if unknown:
            raise TypeError(f"SimCLR got unknown hyperparameter(s) {sorted(unknown)}; valid "
                            "ones: temperature, hidden_dim, out_dim, gather_distributed (set "
                            "them in the config's method: section)")
        if not temperature > 0:
            raise ValueError(f"method.temperature={temperature} must be > 0")
        super().__init__(backbone, num_samples, temperature=temperature, hidden_dim=hidden_dim,
                         out_dim=out_dim, gather_distributed=gather_distributed)
        self.projection_head = SimCLRProjectionHead(backbone.out_dim, hidden_dim, out_dim)
        self.criterion = NTXentLoss(temperature=temperature,
                                    gather_distributed=gather_distributed)

    def training_step(self, views: list[Tensor], indices: Tensor) -> StepOutput:
        if len(views) != 2:
            raise ValueError(f"SimCLR needs two views per image, got {len(views)}; set "
                             "data.augment to two presets (e.g. [simclr, simclr]) or leave it "
                             "null")
        x0, x1 = views
        z0 = self.projection_head(self.backbone(x0))
        z1 = self.projection_head(self.backbone(x1))
        return StepOutput(self.criterion(z0, z1), recon_inputs=[x0, x1])


METHOD = SimCLR
