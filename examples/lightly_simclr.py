"""SimCLR on CIFAR-10 with lightly's modules, plus the recon-aux objective.

SimCLR: Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
ICML 2020. The loop follows lightly's ``examples/pytorch/simclr.py`` (SimCLRProjectionHead,
NTXentLoss, SimCLRTransform); the only additions are the two lines marked ``# recon-aux``.

    python -m examples.lightly_simclr --data-root ../shared/data --epochs 10
    python -m examples.lightly_simclr --data-root ../shared/data --epochs 10 --no-recon
"""

from __future__ import annotations

import sys

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from torch import nn

import recon_aux
from examples.common import NORMALIZE, backbone, finish, log_epoch, parser, train_loader


class SimCLR(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(backbone.out_dim, 512, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x))


def main(argv: list[str] | None = None) -> float | None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.manual_seed(args.seed)
    model = SimCLR(backbone(args)).to(args.device)
    # lightly's CIFAR-10 setting: 32x32 crops, no Gaussian blur.
    loader = train_loader(args, SimCLRTransform(input_size=32, gaussian_blur=0.0))
    criterion = NTXentLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    # recon-aux line 1: hook the backbone's last residual conv (layer4.1.conv2); tell it
    # lightly's normalisation.
    aux = recon_aux.attach(model.backbone, optimizer, **NORMALIZE) if args.recon else None

    step = 0
    for epoch in range(args.epochs):
        total, n = 0.0, 0
        for (x0, x1), _, _ in loader:
            x0, x1 = x0.to(args.device), x1.to(args.device)
            z0, z1 = model(x0), model(x1)
            loss = criterion(z0, z1)
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
