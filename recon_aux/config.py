"""Configuration of the auxiliary objective: one dataclass, from a dict, a YAML file or kwargs.

Every knob of :func:`recon_aux.attach` lives here, so a training config's ``recon:`` block maps
one-to-one onto :class:`ReconAuxConfig`. Unknown keys and wrong types are errors that name the key
and list what is valid; nothing is silently ignored. Each field declares, next to it, the values
it admits beyond its type (an :class:`Allowed`: finite numbers, bounds, tuple length, choices) and
the fix to show when a value is refused; a refused value is an error that names the field, the
value and that fix, raised when the config is built (and when a field is assigned later),
before any work. Nothing is clamped, reshaped or dropped. :meth:`ReconAuxConfig.check_values`
applies the same rules to a subset of the fields (``PerceptualLoss`` uses it for its arguments).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ReconAuxConfig", "ConfigError", "Allowed", "MIN_SIZE", "safe_load"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping, which YAML would
    resolve silently by keeping the last value (a second ``train:`` section replacing the whole
    first one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is written twice in one mapping (first on line "
                    f"{seen[key] + 1}); YAML would keep the last silently: keep one",
                    key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def safe_load(stream: Any) -> Any:
    """``yaml.safe_load`` that also refuses a key written twice in one mapping."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only


class ConfigError(ValueError):
    """A configuration key is unknown or its value has the wrong type or range."""


@dataclass(frozen=True)
class Allowed:
    """The values one field admits beyond its type, and the fix shown when one is refused.

    Every number in the value (each element of a tuple) must be finite and satisfy ``ge`` /
    ``gt``; ``length`` is the number of elements a tuple must have; ``increasing`` asks for
    strictly increasing elements; ``choices`` lists the admitted values. None passes wherever the
    field's type admits it (it means "not set").
    """

    ge: float | None = None
    gt: float | None = None
    length: int | None = None
    increasing: bool = False
    choices: tuple | None = None
    fix: str = ""

    def problem(self, value: Any) -> str | None:
        """What is wrong with ``value`` (already type-checked), or None when it is admitted."""
        if value is None:
            return None
        if self.choices is not None:
            return None if value in self.choices else f"is not one of {self.choices}"
        if isinstance(value, (bool, str)):
            return None
        items = value if isinstance(value, tuple) else (value,)
        if self.length is not None and isinstance(value, tuple) and len(value) != self.length:
            return f"has {len(value)} value(s), not {self.length}"
        each = "" if items is not value else "holds {}; each value "
        for v in items:
            if not math.isfinite(v):
                return (each.format(v) + "must be finite") if each else "is not finite"
            if self.ge is not None and not v >= self.ge:
                return each.format(v) + f"must be >= {self.ge:g}"
            if self.gt is not None and not v > self.gt:
                return each.format(v) + f"must be > {self.gt:g}"
        if self.increasing and not all(b > a for a, b in zip(items, items[1:])):
            return "must be (low, high) with high > low"
        return None


def _knob(default: Any, **allowed: Any) -> Any:
    """A dataclass field with ``default`` and its :class:`Allowed` values."""
    return dataclasses.field(default=default, metadata={"allowed": Allowed(**allowed)})


#: Smallest H and W each LPIPS backbone accepts (its pooling needs at least this much).
MIN_SIZE = {"alex": 31, "vgg": 16}

_WEIGHT_FIX = "Use a finite number >= 0; 0 turns {} off."


def _refusing_unknown_keywords(cls: type) -> type:
    """Wrap the dataclass ``__init__`` of ``cls`` so that a misspelt keyword is the
    :class:`ConfigError` that lists the valid keys (the dataclass's ``TypeError`` names none);
    ``functools.wraps`` keeps the fields in ``inspect.signature`` and ``help``."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls.refuse_unknown(kwargs)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


@_refusing_unknown_keywords
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
            path (with its sha256 in ``PATH.sha256``, or a torchvision-style name that holds a
            hash prefix), or "random" (plumbing tests only; warns).
        input_range: (low, high) of the images before any mean/std normalisation.
        mean, std: Per-channel (3 values, RGB) normalisation the pipeline applied
            (``x = (img - mean) / std``), or None when images are fed in ``input_range``.
        resize_to: Upsample both images to this size before LPIPS (int or (h, w)); None keeps
            the input size. L2 is always computed at the input size.
        lpips_crop: For images larger than this side, LPIPS reads one random ``lpips_crop`` x
            ``lpips_crop`` window per image, the same window in the reconstruction and its
            target (after ``resize_to``); None: always the whole image. LPIPS is a spatial mean
            of per-position distances, so a window's LPIPS estimates the whole image's, except
            near the window's borders, at (crop / side)^2 of the cost: at 224 px and the default
            128, a third. This is a stated change of the estimate: on CIFAR-10 test images
            upsampled to 224 px, blurred or noised, 128-px windows gave 0.96 of the whole
            image's LPIPS on average (64-px windows 0.55-0.86). L2 always reads the whole image.
            Images of 128 px or less (CIFAR, STL-10 at 96) are never cropped by the default.
        lpips_fraction: Share of the batch LPIPS reads, in (0, 1]: ``ceil(fraction * N)``
            images drawn at random per call. The mean over a random subset is an unbiased
            estimate of the batch mean, at that share of the cost and with more variance.
            Default 1 (every image).
        range_tolerance: How far (as a fraction of the range) images may stray outside
            ``input_range`` before it is an error.
        check_inputs: Check image range and loss finiteness every call (one host sync).
        head_width: Channels of the head's first stage; None sizes it with the encoder
            (a quarter of the tapped layer's channels, between ``head_min_width`` and
            ``head_max_width``).
        head_max_width: Cap of that default width (128). Each upsampling stage halves the
            width and doubles the side, so every stage costs the same: the first width sets the
            head's cost. With a cap of 512, a ResNet-50 at 224 px (2048 channels) got a head of
            +25% of the training step's FLOPs; with 128, +2.6% (benchmarks/results/flops.md).
        head_min_width: Floor for the channel count, which halves at every upsampling stage.
        head_norm: "batch", "group" or "none".
        head_upsample: "nearest" or "bilinear".
        head_out_scale: 1, 2 or 4: doublings done by the head's sub-pixel output conv, at most
            those the tapped map needs to reach the image's size (an error at the head's build
            otherwise; the default 2 becomes 1 for a map already at the image's size).
        lr, weight_decay: Of the head's parameter group; None takes the optimizer's defaults.
        max_pending: Most captured forwards kept while waiting for ``aux.loss``; beyond it the
            oldest is released with a warning.
        sync_grads: Under ``torch.distributed`` (world size > 1), average the head's gradients
            over ranks just before ``optimizer.step()`` (the head lives outside your
            ``DistributedDataParallel`` module). Needs the optimizer passed to ``attach``;
            turn off when the head is inside a DDP-wrapped module (e.g. Lightning), which
            averages it already.

    Example:
        >>> from recon_aux import ReconAuxConfig
        >>> cfg = ReconAuxConfig(weight=0.5, net="vgg")
        >>> cfg.weight, cfg.l2_weight, cfg.net
        (0.5, 1.0, 'vgg')
        >>> ReconAuxConfig.from_any({"lpips_fraction": 0.5}, weight=2.0).to_dict()["weight"]
        2.0
        >>> ReconAuxConfig(wieght=1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        recon_aux.config.ConfigError: unknown config key(s) ['wieght']. Valid keys: weight, ...
    """

    weight: float = _knob(1.0, ge=0, fix=_WEIGHT_FIX.format("the auxiliary loss"))
    l2_weight: float = _knob(1.0, ge=0, fix=_WEIGHT_FIX.format("the L2 term"))
    lpips_weight: float = _knob(1.0, ge=0, fix=_WEIGHT_FIX.format("LPIPS"))
    net: str = _knob("alex", choices=("alex", "vgg"),
                     fix="No other backbone's ImageNet weights are available offline.")
    lpips_weights: str = _knob("auto")
    input_range: tuple[float, float] = _knob(
        (0.0, 1.0), increasing=True,
        fix="Give the finite (low, high) of your images before any mean/std normalisation: (0, 1) "
            "for ToTensor images, (-1, 1) for images scaled to [-1, 1], (0, 255) for raw pixels.")
    mean: tuple[float, ...] | None = _knob(
        None, length=3,
        fix="Give the 3 finite per-channel (RGB) means your pipeline's Normalize used, or None.")
    std: tuple[float, ...] | None = _knob(
        None, length=3, gt=0,
        fix="Give the 3 finite, positive per-channel (RGB) stds your pipeline's Normalize used, "
            "or None.")
    resize_to: int | tuple[int, int] | None = _knob(
        None, ge=1, fix="Give a size in pixels (int or (h, w)) large enough for the LPIPS "
                        "backbone, or None to keep the input size.")
    lpips_crop: int | None = _knob(
        128, ge=1, fix="Give a window side in pixels large enough for the LPIPS backbone (>= 31 "
                       "for alex, >= 16 for vgg), or None to read the whole image.")
    lpips_fraction: float = _knob(
        1.0, gt=0, fix="Use a share of the batch in (0, 1]; 1 reads every image.")
    range_tolerance: float = _knob(
        0.01, ge=0, fix="Use a finite fraction of the range >= 0 (default 0.01); to skip the "
                        "range check, set check_inputs=False.")
    check_inputs: bool = True
    head_width: int | None = _knob(
        None, ge=1, fix="Use a channel count >= 1, or None to size the head with the encoder.")
    head_min_width: int = _knob(16, ge=1, fix="Use a channel count >= 1.")
    head_max_width: int = _knob(128, ge=1, fix="Use a channel count >= 1.")
    head_norm: str = _knob("batch", choices=("batch", "group", "none"))
    head_upsample: str = _knob("nearest", choices=("nearest", "bilinear"))
    head_out_scale: int = _knob(2, choices=(1, 2, 4))
    lr: float | None = _knob(
        None, ge=0, fix="Use a finite learning rate >= 0 (a negative one makes the head ascend "
                        "its loss), or None for the optimizer's default.")
    weight_decay: float | None = _knob(
        None, ge=0, fix="Use a finite weight decay >= 0, or None for the optimizer's default.")
    max_pending: int = _knob(
        64, ge=1, fix="Use an int >= 1: the captured forwards kept while waiting for aux.loss.")
    sync_grads: bool = True

    #: The fields :class:`~recon_aux.ReconAux` reads at every ``loss`` call; the others are fixed
    #: once ``attach`` has built the objective from them (the LPIPS network, the head, the hooks).
    LIVE = ("weight", "check_inputs")

    def __setattr__(self, name: str, value: Any) -> None:
        # Every assignment (the dataclass __init__'s, and later ones such as a weight schedule's
        # ``aux.config.weight = w``) passes the field's own type and range check; a later one
        # also the rules that relate two fields, and is refused when attach has fixed the field.
        self.refuse_unknown([name])
        if getattr(self, "_attached", False) and name not in self.LIVE:
            raise ConfigError(
                f"{name} is fixed once attach() has built the objective from it; only "
                f"{', '.join(self.LIVE)} change live (aux.config.weight = w). To change {name}, "
                f"call aux.remove() and attach again with {name}=...")
        value = self._check_field(name, value)
        if getattr(self, "_ready", False):
            self.check_values({**self.to_dict(), name: value})
        object.__setattr__(self, name, value)

    def __post_init__(self) -> None:
        self.check_values({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        object.__setattr__(self, "_ready", True)

    def fixed_by_attach(self) -> ReconAuxConfig:
        """A copy whose fields outside :data:`LIVE` refuse assignment (``attach`` keeps one)."""
        copy = dataclasses.replace(self)
        object.__setattr__(copy, "_attached", True)
        return copy

    @classmethod
    def _check_field(cls, name: str, value: Any) -> Any:
        cls.refuse_unknown([name])
        field = cls.__dataclass_fields__[name]
        value = _coerce(name, value, cls._hint(name))
        allowed = field.metadata.get("allowed")
        problem = allowed.problem(value) if allowed is not None else None
        if problem is not None:
            raise ConfigError(f"{name}={value!r} {problem}. {allowed.fix}".rstrip())
        return value

    @classmethod
    def check_values(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """Type-check and range-check ``values`` (some or all fields); return them converted
        (ints to floats, lists to tuples). Rules that relate two fields use the defaults of those
        not given.

        Raises:
            ConfigError: naming the field, the value and the fix.
        """
        out = {name: cls._check_field(name, value) for name, value in values.items()}

        def get(name: str) -> Any:
            return out[name] if name in out else cls.__dataclass_fields__[name].default

        if get("l2_weight") == 0 and get("lpips_weight") == 0:
            raise ConfigError("l2_weight and lpips_weight are both 0: the objective is empty. "
                              "Give one of them a weight > 0.")
        if (get("mean") is None) != (get("std") is None):
            raise ConfigError(f"mean={get('mean')!r} and std={get('std')!r}: give both mean and "
                              "std (the normalisation your pipeline applied), or neither.")
        if get("lpips_fraction") > 1:
            raise ConfigError(f"lpips_fraction={get('lpips_fraction')!r} is more than the whole "
                              "batch. Use a share in (0, 1]; 1 reads every image.")
        if get("head_min_width") > get("head_max_width"):
            raise ConfigError(f"head_min_width={get('head_min_width')} is above head_max_width="
                              f"{get('head_max_width')}. Give a floor <= the cap.")
        crop, net = get("lpips_crop"), get("net")
        if crop is not None and get("lpips_weight") > 0:
            if crop < MIN_SIZE[net]:
                raise ConfigError(
                    f"lpips_crop={crop!r} is smaller than the {MIN_SIZE[net]}x{MIN_SIZE[net]} "
                    f"pixels LPIPS-{net} needs. Use lpips_crop >= {MIN_SIZE[net]}, or None to "
                    "read the whole image.")
        resize = get("resize_to")
        if resize is not None and get("lpips_weight") > 0:
            size = (resize, resize) if isinstance(resize, int) else resize
            if min(size) < MIN_SIZE[net]:
                raise ConfigError(
                    f"resize_to={resize!r} is smaller than the {MIN_SIZE[net]}x{MIN_SIZE[net]} "
                    f"pixels LPIPS-{net} needs. Use resize_to >= {MIN_SIZE[net]}, or None to keep "
                    "the input size."
                )
        return out

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
    def refuse_unknown(cls, keys: Any) -> None:
        """Raise a :class:`ConfigError` listing the valid keys unless every one of ``keys`` is
        a field."""
        unknown = sorted(set(keys) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}. {cls.valid_keys_text()}")

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
                raise ConfigError(f"config file {path} does not exist; give the path of a YAML "
                                  "file, a dict or a ReconAuxConfig.")
            try:
                with open(path) as f:
                    loaded = safe_load(f)
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}"
                                  ) from None
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
        cls.refuse_unknown(data)  # before cls(**data), where a key that is no str is a TypeError
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data dict (tuples as lists), fit for YAML/JSON."""
        out = {}
        for name in self.valid_keys():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out


def number_text_hint(value: Any) -> str:
    """The fix for a number YAML read as text, else "": YAML 1.1 takes ``1e-3`` for a string,
    since its floats need a dot in the mantissa and a sign on the exponent (``1.0e-3``)."""
    match = re.fullmatch(r"([-+]?)(\d+)(?:\.(\d*))?[eE]([-+]?)(\d+)", value) \
        if isinstance(value, str) else None
    if match is None:
        return ""
    sign, whole, frac, exp_sign, exp = match.groups()
    fixed = f"{sign}{whole}.{frac or '0'}e{exp_sign or '+'}{exp}"
    return f" YAML reads {value!r} as text; write {fixed} (a dot and a signed exponent)."


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the type ``hint``; ints pass for floats, lists for tuples."""
    ok, converted = _match(value, hint)
    if not ok:
        raise ConfigError(
            f"config key {name!r} expects {_hint_text(hint)}, got {value!r} "
            f"({type(value).__name__}).{number_text_hint(value)}"
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
    if hint is int:  # numpy integers pass as ints; bools do not
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        return ok, int(value) if ok else value
    if hint is float:  # any real number (numpy's too), as a Python float; not a bool
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
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
