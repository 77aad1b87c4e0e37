"""Name -> backbone registry: ``build_backbone("alexnet_cifar", width=0.5)``."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .alexnet import AlexNet, AlexNetCIFAR
from .base import Backbone
from .nin import NIN
from .resnet import ResNet18CIFAR
from .vit import ViTCIFAR

__all__ = ["BACKBONES", "backbone_class", "build_backbone", "check_backbone_arguments"]

#: Registered backbones (read-only).
BACKBONES: Mapping[str, type[Backbone]] = MappingProxyType(
    {"alexnet": AlexNet, "alexnet_cifar": AlexNetCIFAR, "nin": NIN,
     "resnet18_cifar": ResNet18CIFAR, "vit_cifar": ViTCIFAR}
)


def backbone_class(name: str) -> type[Backbone]:
    """The class registered as ``name`` (case-insensitive; ``-`` is read as ``_``).

    Raises:
        ValueError: Unknown name (the message lists the valid ones).
    """
    key = _key(name)
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    return BACKBONES[key]


def _key(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


def check_backbone_arguments(name: str, kwargs: Mapping[str, Any]) -> None:
    """Raise a TypeError naming any keyword that backbone ``name``'s class does not take (the
    message lists those it takes); a ValueError for an unknown name."""
    cls = backbone_class(name)
    params = inspect.signature(cls).parameters
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(
            f"backbone {_key(name)!r} ({cls.__name__}) takes no argument(s) "
            f"{', '.join(unknown)}; "
            f"it takes: {', '.join(params) or 'none'}"
        )


def build_backbone(name: str, **kwargs: Any) -> Backbone:
    """Builds a backbone by name.

    Args:
        name: ``"alexnet"`` (:class:`AlexNet`, 224 input), ``"alexnet_cifar"``
            (:class:`AlexNetCIFAR`, 32 input), ``"nin"`` (:class:`NIN`, AET's CIFAR network) or
            ``"resnet18_cifar"`` (:class:`ResNet18CIFAR`, lightly's CIFAR-10 benchmark network)
            or ``"vit_cifar"`` (:class:`ViTCIFAR`, a 4x4-patch ViT for 32x32 images).
            Case-insensitive; ``-`` is read as ``_``.
        **kwargs: Passed to the class, e.g. ``width=0.5`` for ``"alexnet_cifar"``.

    Returns:
        The backbone, freshly initialized.

    Raises:
        ValueError: Unknown name (the message lists the valid ones).
        TypeError: A keyword the class does not take (the message lists those it takes).

    Examples:
        >>> model = build_backbone("alexnet_cifar", width=0.5)
        >>> model.out_dim
        2048
    """
    check_backbone_arguments(name, kwargs)
    return backbone_class(name)(**kwargs)
