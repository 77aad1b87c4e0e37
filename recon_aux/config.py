"""Configuration of the auxiliary objective: one dataclass, from a dict, a YAML file or kwargs.

Every knob of :func:`recon_aux.attach` lives here, so a training config's ``recon:`` block maps
one-to-one onto :class:`ReconAuxConfig`. Unknown keys and wrong types are errors that name the key
and list what is valid; nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ReconAuxConfig", "ConfigError"]


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type or range."""


@dataclass
class ReconAuxConfig:
    """Settings of the reconstruction objective.

    The loss is ``weight * (l2_weight * L2 + lpips_weight * LPIPS)`` (paper, section 3.2: "the
    addition of L2 and perceptual similarity gave the best results").

    Attributes:
        weight: Overall weight of the auxiliary loss added to the method's loss.
        l2_weight: Weight of the pixel L2 term (mean squared error in [0, 1] pixel units).
        lpips_weight: Weight of the LPIPS term (0 disables LPIPS and skips building its network).
        net: LPIPS backbone, "alex" or "vgg".
        lpips_weights: Where the LPIPS backbone's ImageNet weights come from: "auto", a file
            path, or "random" (plumbing tests only; warns).
        input_range: (low, high) of the images before any mean/std normalisation.
        mean, std: Per-channel normalisation the pipeline applied (``x = (img - mean) / std``),
            or None when images are fed in ``input_range``.
        resize_to: Upsample both images to this size before LPIPS (int or (h, w)); None keeps
            the input size. L2 is always computed at the input size.
        range_tolerance: How far (as a fraction of the range) images may stray outside
            ``input_range`` before it is an error.
        check_inputs: Check image range and loss finiteness every call (one host sync).
        head_width: Channels of the head's first stage; None sizes it with the encoder
            (a quarter of the tapped layer's channels, between 16 and 512).
        head_min_width: Floor for the channel count, which halves at every upsampling stage.
        head_norm: "batch", "group" or "none".
        head_upsample: "nearest" or "bilinear".
        head_out_scale: 1, 2 or 4: doublings done by the head's sub-pixel output conv.
        lr, weight_decay: Of the head's parameter group; None takes the optimizer's defaults.
        max_pending: Most captured forwards kept while waiting for ``aux.loss``; beyond it the
            oldest is released with a warning.
        sync_grads: Under ``torch.distributed`` (world size > 1), average the head's gradients
            over ranks just before ``optimizer.step()`` (the head lives outside your
            ``DistributedDataParallel`` module). Needs the optimizer passed to ``attach``;
            turn off when the head is inside a DDP-wrapped module (e.g. Lightning), which
            averages it already.
    """

    weight: float = 1.0
    l2_weight: float = 1.0
    lpips_weight: float = 1.0
    net: str = "alex"
    lpips_weights: str = "auto"
    input_range: tuple[float, float] = (0.0, 1.0)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize_to: int | tuple[int, int] | None = None
    range_tolerance: float = 0.01
    check_inputs: bool = True
    head_width: int | None = None
    head_min_width: int = 16
    head_norm: str = "batch"
    head_upsample: str = "nearest"
    head_out_scale: int = 2
    lr: float | None = None
    weight_decay: float | None = None
    max_pending: int = 64
    sync_grads: bool = True
    _choices: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "net": ("alex", "vgg"),
        "head_norm": ("batch", "group", "none"),
        "head_upsample": ("nearest", "bilinear"),
    }

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), self._hint(f.name)))
        for name, allowed in self._choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {allowed}.")
        for name in ("weight", "l2_weight", "lpips_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if self.l2_weight == 0 and self.lpips_weight == 0:
            raise ConfigError("l2_weight and lpips_weight are both 0: the objective is empty.")
        lo, hi = self.input_range
        if not hi > lo:
            raise ConfigError(f"input_range={self.input_range} must be (low, high), high > low.")
        if (self.mean is None) != (self.std is None):
            raise ConfigError("give both mean and std (the normalisation your pipeline applied).")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError(f"std={self.std} must be positive.")

    @classmethod
    def _hint(cls, name: str) -> Any:
        return typing.get_type_hints(cls)[name]

    @classmethod
    def valid_keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def valid_keys_text(cls) -> str:
        return "Valid keys: " + ", ".join(cls.valid_keys()) + "."

    @classmethod
    def from_any(cls, config: ReconAuxConfig | Mapping | str | Path | None = None,
                 **overrides: Any) -> ReconAuxConfig:
        """Build from a config object, a dict, a YAML file path (safe_load) or None, then apply
        ``overrides`` (config fields)."""
        if config is None:
            data: dict[str, Any] = {}
        elif isinstance(config, ReconAuxConfig):
            data = config.to_dict()
        elif isinstance(config, Mapping):
            data = dict(config)
        elif isinstance(config, (str, Path)):
            path = Path(config)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist.")
            with open(path) as f:
                loaded = yaml.safe_load(f)
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, Mapping):
                raise ConfigError(f"{path} must hold a mapping of config keys, got {type(loaded)}.")
            data = dict(loaded)
        else:
            raise ConfigError(
                f"config must be a ReconAuxConfig, a dict or a YAML path, got {type(config)}."
            )
        data.update(overrides)
        unknown = sorted(set(data) - set(cls.valid_keys()))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}. {cls.valid_keys_text()}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data dict (tuples as lists), fit for YAML/JSON."""
        out = {}
        for name in self.valid_keys():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the type ``hint``; ints pass for floats, lists for tuples."""
    ok, converted = _match(value, hint)
    if not ok:
        raise ConfigError(
            f"config key {name!r} expects {_hint_text(hint)}, got {value!r} "
            f"({type(value).__name__})."
        )
    return converted


def _match(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            ok, conv = _match(value, arg)
            if ok:
                return True, conv
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            return False, value
        if len(args) == 2 and args[1] is Ellipsis:
            items = [_match(v, args[0]) for v in value]
        elif len(args) == len(value):
            items = [_match(v, a) for v, a in zip(value, args)]
        else:
            return False, value
        if all(ok for ok, _ in items):
            return True, tuple(conv for _, conv in items)
        return False, value
    if origin is dict:
        return isinstance(value, dict), value
    return isinstance(value, hint), value


def _hint_text(hint: Any) -> str:
    return str(hint).replace("typing.", "")
