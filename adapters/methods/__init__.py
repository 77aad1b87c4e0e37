"""The methods the engine trains, registered by name in :data:`METHODS` (the one place).

A run config's ``method: {name: sela, ...}`` picks ``METHODS["sela"]``; the config validator,
the engine and every error message read the valid names from here. Each method file holds one
:class:`~adapters.methods.base.Method` and its hyperparameters (a
:class:`~adapters.methods.base.MethodConfig`); the provenance of each is in ``docs/methods/``.

================  =================================================================
name              method
================  =================================================================
``deepcluster``   :class:`DeepCluster` (Caron et al., ECCV 2018)
``sela``          :class:`SeLa` (Asano et al., ICLR 2020)
``aet``           :class:`AET`, AET-project (Zhang et al., CVPR 2019)
``simclr``        :class:`SimCLR` (Chen et al., ICML 2020; lightly's modules)
``supervised``    :class:`Supervised`, the reference row trained with the labels
``recon_only``    :class:`ReconOnly`, the reference row with the objective alone
================  =================================================================

To add a method, write ``adapters/methods/<name>.py`` and add its class here. Tests register
test-only methods for their duration (``monkeypatch.setitem(METHODS, name, cls)``).
"""

from __future__ import annotations

from .aet import AET, AETConfig
from .base import EngineContext, Method, MethodConfig, StepOutput
from .deepcluster import DeepCluster, DeepClusterConfig
from .recon_only import ReconOnly
from .sela import SeLa, SeLaConfig
from .simclr import SimCLR, SimCLRConfig
from .supervised import Supervised, SupervisedConfig

__all__ = [
    "METHODS", "method_class", "Method", "MethodConfig", "StepOutput", "EngineContext",
    "DeepCluster", "DeepClusterConfig", "SeLa", "SeLaConfig", "AET", "AETConfig", "SimCLR",
    "SimCLRConfig", "Supervised", "SupervisedConfig", "ReconOnly",
]

#: Registered methods: name -> class (the class's ``name`` is its key).
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (DeepCluster, SeLa, AET, SimCLR, Supervised, ReconOnly)
}


def method_class(name: str) -> type[Method]:
    """The method registered as ``name``.

    Raises:
        ValueError: Unknown name; the message lists the registered ones.
    """
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"method {name!r} is unknown; methods: {', '.join(METHODS)}.")
    return METHODS[name]
