"""SwAV on CIFAR-10 with lightly's modules, plus the recon-aux objective.

SwAV: Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", NeurIPS 2020. The loop follows lightly's ``examples/pytorch/swav.py``
(SwaVProjectionHead, SwaVPrototypes, SwaVLoss with Sinkhorn, multi-crop SwaVTransform, Adam);
the only additions are the two lines marked ``# recon-aux``. Multi-crop: two 32x32 crops and four
16x16 crops per image; only the two full-size crops are reconstructed (16x16 is below LPIPS-alex's
31-pixel minimum, and the small crops' forwards are released by the backward pass unused).

    python -m examples.lightly_swav --data-root ../shared/data --epochs 10 --lr 0.001
"""

from __future__ import annotations

import sys

import torch
from lightly.loss import SwaVLoss
from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
from lightly.transforms.swav_transform import SwaVTransform
from torch import nn

import recon_aux
from examples.common import NORMALIZE, backbone, finish, log_epoch, parser, train_loader


class SwaV(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = SwaVProjectionHead(backbone.out_dim, 512, 128)
        self.prototypes = SwaVPrototypes(128, n_prototypes=512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(self.projection_head(self.backbone(x)), dim=1, p=2)
        return self.prototypes(x)


def main(argv: list[str] | None = None) -> float | None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.manual_seed(args.seed)
    model = SwaV(backbone(args)).to(args.device)
    loader = train_loader(args, SwaVTransform(
        crop_sizes=(32, 16), crop_counts=(2, 4), crop_min_scales=(0.14, 0.05),
        crop_max_scales=(1.0, 0.14), gaussian_blur=0.0,
    ))
    criterion = SwaVLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    # recon-aux line 1
    aux = recon_aux.attach(model.backbone, optimizer, **NORMALIZE) if args.recon else None

    step = 0
    for epoch in range(args.epochs):
        total, n = 0.0, 0
        for views, _, _ in loader:
            model.prototypes.normalize()
            views = [v.to(args.device) for v in views]
            crops = [model(v) for v in views]
            loss = criterion(crops[:2], crops[2:])
            if aux is not None:
                loss = loss + aux.loss(views[0]) + aux.loss(views[1])  # recon-aux line 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, n, step = total + loss.item(), n + 1, step + 1
            if step == args.max_steps:
                break
        log_epoch(epoch, total, n, aux)
        if step == args.max_steps:
            break
    return finish(model.backbone, aux, views[0], args)


if __name__ == "__main__":
    main(sys.argv[1:])
