"""Backbones of the papers recon-aux builds on: AlexNet (DeepCluster/SeLa), AlexNetCIFAR, NIN (AET).

Every backbone is a :class:`Backbone`: ``forward(x)`` returns the final representation
``(N, out_dim)``, ``forward_features(x, layers)`` the activations at named ``probe_points``, and
``last_conv`` the ``nn.Conv2d`` that runs last (whose output the reconstruction head decodes).
Classifier / pseudo-label heads are not part of the backbones.
"""

from ._base import Backbone, count_parameters
from .alexnet import AlexNet, AlexNetCIFAR, SobelFilter

__all__ = ["AlexNet", "AlexNetCIFAR", "Backbone", "SobelFilter", "count_parameters"]
