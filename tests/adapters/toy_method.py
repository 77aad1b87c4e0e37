"""A small real method for engine tests: rotation prediction (Gidaris et al., ICLR 2018).

It is not in the registry: a test registers it for its own duration with the ``toy_method``
fixture (``tests/conftest.py``). Run as a script it registers itself and runs the harness's
command line, which is how ``torchrun`` launches it::

    torchrun --nproc_per_node=2 tests/adapters/toy_method.py train CONFIG [key=value ...]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.methods import METHODS, EngineContext, Method, MethodConfig, StepOutput


@dataclass(frozen=True)
class RotationConfig(MethodConfig):
    """nan_at_step: make the loss NaN at this step (to test the engine's non-finite stop)."""

    nan_at_step: int | None = None


class Rotation(Method):
    """Predict which of 4 rotations (0/90/180/270 degrees) was applied; a buffer of per-sample
    'pseudo-labels' (random, re-drawn per epoch from a seeded generator) exercises checkpoints."""

    name: ClassVar[str] = "rotation"
    views = ("crop_flip",)
    Config: ClassVar[type[MethodConfig]] = RotationConfig

    def __init__(self, backbone: nn.Module, num_samples: int, config=None, **overrides) -> None:
        super().__init__(backbone, num_samples, config, **overrides)
        self.nan_at_step, self.steps = self.config.nan_at_step, 0
        self.head = nn.Linear(backbone.out_dim, 4)
        self.register_buffer("labels", torch.zeros(num_samples, dtype=torch.long))
        self.updates = 0

    def on_epoch_start(self, ctx: EngineContext) -> None:
        g = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.epoch)
        feats, idx = ctx.extract("conv5")
        assert feats.shape[0] == ctx.num_samples and torch.equal(idx.cpu(), torch.arange(len(idx)))
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



if __name__ == "__main__":
    from benchmarks.cli import main

    METHODS[Rotation.name] = Rotation
    sys.exit(main(sys.argv[1:]))
