"""Backbones of the papers recon-aux builds on: AlexNet (DeepCluster/SeLa), AlexNetCIFAR, NIN
(AET), and the CIFAR ResNet-18 and a small ViT for the modern-method benchmarks.

Every backbone is a :class:`Backbone`: ``forward(x)`` returns the final representation
``(N, out_dim)``, ``forward_features(x, layers)`` the activations at named ``probe_points``,
``feature_shape(name)`` / ``feature_dim(name)`` their sizes, and ``last_conv`` the ``nn.Conv2d``
that runs last (whose output the reconstruction head decodes). Classifier and pseudo-label heads
are not part of the backbones. Build one by name with :func:`build_backbone`.
"""

from .alexnet import AlexNet, AlexNetCIFAR, SobelFilter
from .base import Backbone, count_parameters
from .nin import NIN
from .registry import BACKBONES, backbone_class, build_backbone, check_backbone_arguments
from .resnet import ResNet18CIFAR
from .vit import ViTCIFAR

__all__ = [
    "BACKBONES",
    "NIN",
    "ResNet18CIFAR",
    "ViTCIFAR",
    "AlexNet",
    "AlexNetCIFAR",
    "Backbone",
    "SobelFilter",
    "backbone_class",
    "build_backbone",
    "check_backbone_arguments",
    "count_parameters",
]
