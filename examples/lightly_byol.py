"""BYOL on CIFAR-10 with lightly's modules, plus the recon-aux objective.

BYOL: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020. The loop follows lightly's ``examples/pytorch/byol.py`` (BYOL projection and
prediction heads, a momentum copy of backbone and projector made with ``copy.deepcopy``,
NegativeCosineSimilarity, BYOLTransform); the only additions are the two lines marked
``# recon-aux``. The momentum backbone is a deep copy made before ``attach``: it carries no hooks
and is never reconstructed (the same holds for a copy made after ``attach``).

    python -m examples.lightly_byol --data-root ../shared/data --epochs 10
"""

from __future__ import annotations

import copy
import sys

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms.byol_transform import (
    BYOLTransform,
    BYOLView1Transform,
    BYOLView2Transform,
)
from lightly.utils.scheduler import cosine_schedule
from torch import nn

import recon_aux
from examples.common import NORMALIZE, backbone, finish, log_epoch, parser, train_loader


class BYOL(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(backbone.out_dim, 1024, 256)
        self.prediction_head = BYOLPredictionHead(256, 1024, 256)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x)))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x)).detach()


def main(argv: list[str] | None = None) -> float | None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.manual_seed(args.seed)
    model = BYOL(backbone(args)).to(args.device)
    loader = train_loader(args, BYOLTransform(
        view_1_transform=BYOLView1Transform(input_size=32, gaussian_blur=0.0),
        view_2_transform=BYOLView2Transform(input_size=32, gaussian_blur=0.0),
    ))
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    # recon-aux line 1: the online backbone only; the momentum copy stays untouched.
    aux = recon_aux.attach(model.backbone, optimizer, **NORMALIZE) if args.recon else None

    step = 0
    for epoch in range(args.epochs):
        momentum = cosine_schedule(epoch, args.epochs, 0.996, 1)
        total, n = 0.0, 0
        for (x0, x1), _, _ in loader:
            update_momentum(model.backbone, model.backbone_momentum, m=momentum)
            update_momentum(model.projection_head, model.projection_head_momentum, m=momentum)
            x0, x1 = x0.to(args.device), x1.to(args.device)
            p0, z0 = model(x0), model.forward_momentum(x0)
            p1, z1 = model(x1), model.forward_momentum(x1)
            loss = 0.5 * (criterion(p0, z1) + criterion(p1, z0))
            if aux is not None:
                loss = loss + aux.loss(x0) + aux.loss(x1)  # recon-aux line 2: both views
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, n, step = total + loss.item(), n + 1, step + 1
            if step == args.max_steps:
                break
        log_epoch(epoch, total, n, aux)
        if step == args.max_steps:
            break
    return finish(model.backbone, aux, x0, args)


if __name__ == "__main__":
    main(sys.argv[1:])
