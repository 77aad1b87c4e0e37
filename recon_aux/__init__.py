"""recon-aux: an auxiliary L2 + LPIPS image-reconstruction objective for any encoder.

Two lines in an existing training loop (Hizioglu, 2020, "Perceptual Image Similarity for
Unsupervised Representation Learning"):

    aux = recon_aux.attach(encoder, optimizer)   # before the loop
    loss = loss + aux.loss(images)               # after encoder(images)
"""

from .capture import FeatureTap, PairingError
from .config import ConfigError, ReconAuxConfig
from .head import ReconstructionHead
from .objective import ReconAux, attach
from .perceptual import NonFiniteLossError, PerceptualLoss, RangeError
from .weights import WeightsCacheWarning, WeightsError

__version__ = "0.1.0"
__all__ = [
    "attach", "ReconAux", "ReconAuxConfig", "ReconstructionHead", "PerceptualLoss", "FeatureTap",
    "ConfigError", "PairingError", "RangeError", "NonFiniteLossError", "WeightsError",
    "WeightsCacheWarning",
]
