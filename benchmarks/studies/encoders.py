"""The encoders the cost studies count and time at ImageNet scale, beside this repo's own.

torchvision's ResNet-18, ResNet-50 and AlexNet and a ViT-S/16, untrained, their classifier
removed so that the output is the representation; and AlexNet-CIFAR width 1.0 from
``adapters.backbones``. ``flops`` counts a training step of each; ``overhead`` times the
torchvision ones (``--backbone resnet50``) next to the backbones of ``adapters.backbones``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision
from torch import nn


@dataclass(frozen=True)
class Model:
    """An encoder to count or time: how to build it, its input size and what it is.

    Attributes:
        build: Makes a fresh, untrained encoder (its output: the representation).
        size: Input side in pixels.
        note: What it is, for a table.
    """

    build: Callable[[], nn.Module]
    size: int
    note: str

    def encoder(self) -> nn.Module:
        """A fresh encoder with ``out_dim`` (its flattened output width, from one forward at
        ``size`` px) and ``input_size`` set, as ``adapters.backbones`` encoders have them."""
        model = self.build()
        was_training = model.training
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, 3, self.size, self.size))
        model.out_dim = out.flatten(1).shape[1]
        model.train(was_training)
        model.input_size = self.size
        return model


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = getattr(torchvision.models, name)(weights=None, **kwargs)
        for attr in ("fc", "heads", "classifier"):
            if hasattr(model, attr):
                setattr(model, attr, nn.Identity())  # the encoder's representation as output
        return model

    return build


def _vit_small() -> nn.Module:
    # ViT-S/16 (Touvron et al., DeiT-S; timm ``vit_small_patch16_224``): 12 blocks, width 384.
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=6,
                              hidden_dim=384, mlp_dim=1536)
    model.heads = nn.Identity()
    return model


def _alexnet_cifar() -> nn.Module:
    from adapters.backbones import AlexNetCIFAR

    return AlexNetCIFAR(width=1.0)


MODELS: dict[str, Model] = {
    "resnet18": Model(_torchvision("resnet18"), 224, "torchvision resnet18"),
    "resnet50": Model(_torchvision("resnet50"), 224, "torchvision resnet50"),
    "vit_s16": Model(_vit_small, 224, "ViT-S/16 (torchvision VisionTransformer, DeiT-S dims)"),
    "alexnet": Model(_torchvision("alexnet"), 224, "torchvision alexnet (no BatchNorm)"),
    "alexnet_cifar": Model(_alexnet_cifar, 32, "AlexNet-CIFAR width 1.0 (this repo)"),
}
# The ones whose names ``adapters.backbones`` does not use (its ``alexnet`` has BatchNorm).
TORCHVISION: dict[str, Model] = {k: MODELS[k] for k in ("resnet18", "resnet50", "vit_s16")}
