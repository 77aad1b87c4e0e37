"""SimCLR (Chen et al., ICML 2020) as an engine method, built from lightly's modules.

The provenance is in ``docs/methods/simclr.md``; ``examples/lightly_simclr.py`` is the same
method as a plain loop with lightly's PIL transforms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import Tensor, nn

from ..schema import above, at_least
from .base import Method, MethodConfig, StepOutput, out_dim_of

__all__ = ["SimCLR", "SimCLRConfig"]


@dataclass(frozen=True)
class SimCLRConfig(MethodConfig):
    """SimCLR's hyperparameters.

    Attributes:
        temperature: NT-Xent temperature (SimCLR: 0.5 for CIFAR-10; lightly's default 0.5).
        hidden_dim, out_dim: Projection MLP sizes (lightly's CIFAR-10 benchmark: 512, 128).
        gather_distributed: Gather negatives from every rank under DDP (lightly's option).
    """

    temperature: float = field(default=0.5, metadata=above(0))
    hidden_dim: int = field(default=512, metadata=at_least(1))
    out_dim: int = field(default=128, metadata=at_least(1))
    gather_distributed: bool = True


class SimCLR(Method):
    """Two augmented views, a projection MLP, and the NT-Xent (normalised temperature-scaled
    cross-entropy) loss between them; the other images of the batch are the negatives.

    Paper: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of
    Visual Representations", ICML 2020 (``google-research/simclr``). Code: lightly's
    ``SimCLRProjectionHead`` and ``NTXentLoss`` (``lightly-ai/lightly``), used as they are
    (``docs/methods/simclr.md``).

    Shapes: ``training_step`` takes two views ``(B, 3, H, W)`` in [0, 1] of the same images;
    each is projected ``(B, out_dim of the backbone) -> (B, out_dim)``.

    Args:
        backbone: The encoder (its ``out_dim`` sizes the projection head).
        num_samples: Size of the training set (unused by SimCLR; the engine passes it).
        config: The hyperparameters (:class:`SimCLRConfig`), or a mapping of its keys.
        **overrides: Hyperparameters that replace those of ``config``.

    Attributes:
        projection_head: ``SimCLRProjectionHead(backbone.out_dim, hidden_dim, out_dim)``.
        criterion: ``NTXentLoss(temperature, gather_distributed)``.

    Example:
        >>> import torch
        >>> from adapters.backbones import AlexNetCIFAR
        >>> method = SimCLR(AlexNetCIFAR(width=0.25), num_samples=1000)
        >>> x0, x1 = torch.rand(2, 8, 3, 32, 32)  # two views of 8 images
        >>> out = method.training_step([x0, x1], torch.arange(8))
        >>> out.loss.shape, len(out.recon_inputs)  # both views are reconstructed with +recon
        (torch.Size([]), 2)
    """

    name: ClassVar[str] = "simclr"
    views = ("simclr", "simclr")
    Config: ClassVar[type[MethodConfig]] = SimCLRConfig
    config: SimCLRConfig

    def __init__(self, backbone: nn.Module, num_samples: int,
                 config: SimCLRConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(backbone, num_samples, config, **overrides)
        c = self.config
        self.projection_head = SimCLRProjectionHead(out_dim_of(backbone, "SimCLR"),
                                                    c.hidden_dim, c.out_dim)
        self.criterion = NTXentLoss(temperature=c.temperature,
                                    gather_distributed=c.gather_distributed)

    def training_step(self, views: list[Tensor], indices: Tensor) -> StepOutput:
        if len(views) != 2:
            raise ValueError(f"SimCLR needs two views per image, got {len(views)}; set "
                             "data.augment to two presets (e.g. [simclr, simclr]) or leave it "
                             "null")
        x0, x1 = views
        z0 = self.projection_head(self.backbone(x0))
        z1 = self.projection_head(self.backbone(x1))
        return StepOutput(self.criterion(z0, z1), recon_inputs=[x0, x1])

