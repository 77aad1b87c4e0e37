"""DINO with a small Vision Transformer on CIFAR-10 (lightly's modules), plus the recon-aux loss.

DINO: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021. The
loop follows lightly's ``examples/pytorch/dino.py`` (DINOProjectionHead, DINOLoss, DINOTransform,
a momentum teacher made with ``copy.deepcopy`` and ``update_momentum``, the last layer's gradient
cancelled in the first epoch) with the ViT backbone the paper uses, scaled to 32 px: torchvision's
``VisionTransformer`` with 4x4 patches (8x8 tokens and a class token), wrapped in lightly's
``MaskedVisionTransformerTorchvision`` so that the 16 px local crops run too (it interpolates the
position embedding). Multi-crop: two 32 px global crops and four 16 px local crops per image.

The only additions are the two lines marked ``# recon-aux``. ``attach`` taps the ViT's last
block after its final norm (``layer=None`` picks ``vit.vit.encoder.ln``: never the patch
embedding), turns its 64 patch tokens into an 8x8 map (the class token dropped), and the head
decodes that back to 32x32. The two
global crops are reconstructed; the local crops' forwards are released by the backward pass
unused, and the teacher, a copy made before ``attach``, is never captured.

    python -m examples.lightly_vit_dino --data-root ../shared/data --epochs 10
    python -m examples.lightly_vit_dino --data-root ../shared/data --epochs 10 --no-recon
"""

from __future__ import annotations

import copy
import sys

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTorchvision
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms.dino_transform import DINOTransform
from lightly.utils.scheduler import cosine_schedule
from torch import Tensor, nn
from torchvision.models import VisionTransformer

import recon_aux
from examples.common import NORMALIZE, finish, log_epoch, parser, train_loader


class ViT(nn.Module):
    """A ViT for 32 px images whose output is the class token (``out_dim`` wide).

    ``probe_points`` and ``forward_features`` let ``common.knn_report`` read that output.
    """

    probe_points = ("cls",)

    def __init__(self, dim: int, depth: int, heads: int, patch: int = 4) -> None:
        super().__init__()
        vit = VisionTransformer(image_size=32, patch_size=patch, num_layers=depth,
                                num_heads=heads, hidden_dim=dim, mlp_dim=4 * dim)
        self.vit = MaskedVisionTransformerTorchvision(vit=vit)
        self.out_dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return self.vit(x)

    def forward_features(self, x: Tensor, layers) -> dict[str, Tensor]:
        return {"cls": self(x)}


def backbone(args) -> ViT:
    heads = args.heads
    width = 1.0 if args.width is None else args.width
    dim = max(heads, round(192 * width / heads) * heads)  # ViT-Tiny's 192 at width 1
    return ViT(dim, args.depth, heads)


class DINO(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.student_backbone = backbone
        self.student_head = DINOProjectionHead(backbone.out_dim, 512, 64, 2048,
                                               freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = DINOProjectionHead(backbone.out_dim, 512, 64, 2048)
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, x: Tensor) -> Tensor:
        return self.student_head(self.student_backbone(x))

    def forward_teacher(self, x: Tensor) -> Tensor:
        return self.teacher_head(self.teacher_backbone(x))


def main(argv: list[str] | None = None) -> float | None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=6, help="transformer blocks")
    p.add_argument("--heads", type=int, default=3, help="attention heads")
    p.add_argument("--local-views", type=int, default=4, help="16 px local crops per image")
    p.set_defaults(lr=5e-4)  # AdamW (DINO: 5e-4 x batch / 256)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model = DINO(backbone(args)).to(args.device)
    loader = train_loader(args, DINOTransform(
        global_crop_size=32, local_crop_size=16, n_local_views=args.local_views,
        gaussian_blur=(0.0, 0.0, 0.0), solarization_prob=0.0,
    ))
    criterion = DINOLoss(output_dim=2048, warmup_teacher_temp_epochs=min(5, args.epochs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.04)

    # recon-aux line 1: the student backbone; the teacher is a copy made before, never captured.
    aux = recon_aux.attach(model.student_backbone, optimizer, **NORMALIZE) if args.recon else None

    step = 0
    for epoch in range(args.epochs):
        momentum = cosine_schedule(epoch, args.epochs, 0.996, 1)
        total, n = 0.0, 0
        for views, _, _ in loader:
            update_momentum(model.student_backbone, model.teacher_backbone, m=momentum)
            update_momentum(model.student_head, model.teacher_head, m=momentum)
            views = [v.to(args.device) for v in views]
            global_views = views[:2]
            teacher_out = [model.forward_teacher(v) for v in global_views]
            student_out = [model(v) for v in views]
            loss = criterion(teacher_out, student_out, epoch=epoch)
            if aux is not None:
                loss = loss + aux.loss(views[0]) + aux.loss(views[1])  # recon-aux line 2
            optimizer.zero_grad()
            loss.backward()
            model.student_head.cancel_last_layer_gradients(current_epoch=epoch)
            optimizer.step()
            total, n, step = total + loss.item(), n + 1, step + 1
            if step == args.max_steps:
                break
        log_epoch(epoch, total, n, aux)
        if step == args.max_steps:
            break
    if aux is not None:
        print(f"recon-aux tapped {aux.layer_name} ({aux.head.in_channels} x "
              f"{aux.head.in_size[0]} x {aux.head.in_size[1]} map)")
    return finish(model.student_backbone, aux, views[0], args)


if __name__ == "__main__":
    main(sys.argv[1:])
