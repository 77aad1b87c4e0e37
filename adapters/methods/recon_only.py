"""Reference row ``recon-only``: the auxiliary objective alone (an autoencoder).

Without this row a reader cannot tell "the reconstruction objective upgrades the method" from
"the reconstruction objective alone is better than the method". The method loss is zero; the
run must have a ``recon:`` block, whose loss is then the only training signal (same head, same
loss, same data as the +recon runs).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from .base import EngineContext, Method, StepOutput

__all__ = ["ReconOnly"]


class ReconOnly(Method):
    """No loss of its own: ``recon_aux`` trains the encoder through its head.

    The run's ``recon:`` block supplies the only loss: every view the loader yields is encoded
    (``(B, 3, H, W)`` in [0, 1]) and handed to the objective; the method's loss is a zero that
    keeps the backbone in the graph. It has no hyperparameters and no state.

    Args:
        backbone: The encoder.
        num_samples: Size of the training set (unused; part of the engine's interface).

    Example:
        >>> import torch
        >>> from adapters.backbones import AlexNetCIFAR
        >>> method = ReconOnly(AlexNetCIFAR(width=0.25), num_samples=1000)
        >>> x = torch.rand(4, 3, 32, 32)
        >>> out = method.training_step([x], torch.arange(4))
        >>> out.loss.item(), out.recon_inputs[0] is x
        (0.0, True)
    """

    name: ClassVar[str] = "recon_only"
    views = ("crop_flip",)

    def on_train_start(self, ctx: EngineContext) -> None:
        """Refuse a run without a ``recon:`` block (it would have no loss at all)."""
        if not any(True for _ in ctx.optimizer.param_groups[1:]):
            raise ValueError("method recon_only needs a recon: block (the reconstruction "
                             "objective is its only loss); got recon: null.")

    def training_step(self, views: list[Tensor], indices: Tensor) -> StepOutput:
        # Every view the loader yields is encoded and reconstructed, so that in a table of a
        # two-view method (SimCLR) the recon-only row gets as many reconstructions per step as
        # the +recon row.
        zero = sum((self.backbone(x) * 0).sum() for x in views)
        return StepOutput(zero, recon_inputs=list(views))

