"""A small real method for engine tests: rotation prediction (Gidaris et al., ICLR 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.methods.base import EngineContext, Method, StepOutput


class Rotation(Method):
    """Predict which of 4 rotations (0/90/180/270 degrees) was applied; a buffer of per-sample
    'pseudo-labels' (random, re-drawn per epoch from a seeded generator) exercises checkpoints."""

    name = "rotation"
    views = ("crop_flip",)

    def __init__(self, backbone: nn.Module, num_samples: int, nan_at_step: int | None = None):
        super().__init__(backbone, num_samples)
        self.nan_at_step, self.steps = nan_at_step, 0
        self.head = nn.Linear(backbone.out_dim, 4)
        self.register_buffer("labels", torch.zeros(num_samples, dtype=torch.long))
        self.updates = 0

    def on_epoch_start(self, ctx: EngineContext) -> None:
        g = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.epoch)
        feats, idx = ctx.extract("conv5")
        assert feats.shape[0] == ctx.num_samples and torch.equal(idx, torch.arange(len(idx)))
        self.labels.copy_(ctx.broadcast(torch.randint(0, 4, (ctx.num_samples,), generator=g)))
        self.updates += 1
        ctx.log({"updates": self.updates})

    def training_step(self, views: list[Tensor], indices: Tensor) -> StepOutput:
        x = views[0]
        k = self.labels[indices]
        xr = torch.stack([torch.rot90(img, int(r), dims=(1, 2)) for img, r in zip(x, k)])
        loss = F.cross_entropy(self.head(self.backbone(xr)), k)
        self.steps += 1
        if self.steps == self.nan_at_step:
            loss = loss * float("nan")
        return StepOutput(loss, recon_inputs=[xr], logs={"acc": (self.head.weight.sum() * 0)})

    def extra_state(self) -> dict:
        return {"updates": self.updates}

    def load_extra_state(self, state: dict) -> None:
        self.updates = state["updates"]


METHOD = Rotation
