"""Typed config sections: a frozen dataclass built from a mapping, every key and value checked.

The pattern of :class:`recon_aux.ReconAuxConfig`, for the harness: a section is a dataclass
whose fields are its keys. :meth:`Section.from_any` builds one from YAML data (or keyword
arguments) and refuses

- a key that is not a field (:class:`UnknownKeyError`, which lists the valid keys),
- a value of the wrong type (the field's annotation: ``int``, ``float`` (an int is accepted),
  ``bool``, ``str``, ``X | None``, ``tuple[X, ...]`` (a list is accepted), ``Literal[...]``),
- a value out of the range or outside the choices the field declares with :func:`at_least`,
  :func:`above` or :func:`one_of`,

and a subclass adds the checks that tie fields together in :meth:`Section.check`. Nothing is
silently ignored or clamped. Example::

    @dataclass(frozen=True)
    class Probe(Section):
        label: ClassVar[str] = "eval.linear"
        layer: str = "conv5"
        epochs: int = field(default=10, metadata=at_least(1))
        recipe: str = field(default="standardized", metadata=one_of("standardized", "reglog"))

    Probe.from_any({"epochs": 3})   # Probe(layer='conv5', epochs=3, recipe='standardized')
    Probe.from_any({"epoch": 3}, where="eval.linear")
    # UnknownKeyError: unknown key(s) ['epoch'] in eval.linear; valid ones: layer, epochs, recipe

:func:`check_value` applies the same type rules to one value against any annotation (the run
config uses it for the keyword arguments of the evaluation protocols).
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from recon_aux.config import number_text_hint

__all__ = ["Section", "SchemaError", "UnknownKeyError", "at_least", "above", "one_of",
           "check_value", "plain"]

S = TypeVar("S", bound="Section")


class SchemaError(ValueError):
    """A config key is unknown, or its value has the wrong type or range."""


class UnknownKeyError(SchemaError, TypeError):
    """A config key that is not a field (a TypeError too, as an unexpected keyword argument)."""


def at_least(low: float) -> dict[str, Any]:
    """Field metadata: the value (when not None) must be ``>= low``."""
    return {"check": (lambda v: v >= low, f">= {low}")}


def above(low: float) -> dict[str, Any]:
    """Field metadata: the value (when not None) must be a finite number ``> low``."""
    return {"check": (lambda v: v > low and math.isfinite(v), f"a finite number > {low}")}


def one_of(*choices: Any) -> dict[str, Any]:
    """Field metadata: the value (when not None) must be one of ``choices``."""
    return {"check": (lambda v: v in choices, f"one of {', '.join(map(repr, choices))}")}


@dataclasses.dataclass(frozen=True)
class Section:
    """Base of a typed config section (subclass it as a frozen dataclass).

    Attributes:
        label: The dotted prefix of the section's keys in messages (``"train"`` gives
            ``train.epochs=-1 must be >= 0``).
        noun: What a key is called in messages.
    """

    label: ClassVar[str] = "section"
    #: What a key is called in messages ("key"; a method's config says "hyperparameter").
    noun: ClassVar[str] = "key"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            where = f"{self.label}.{f.name}"
            value = check_value(getattr(self, f.name), hints[f.name], where)
            rule = f.metadata.get("check")
            if rule is not None and isinstance(value, float) and not math.isfinite(value):
                raise SchemaError(f"{where}={value!r} must be a finite number ({rule[1]}).")
            if rule is not None and value is not None and not rule[0](value):
                raise SchemaError(f"{where}={value!r} must be {rule[1]}.")
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Checks between fields (raise :class:`SchemaError`); none by default."""

    @classmethod
    def keys(cls) -> list[str]:
        """The valid keys, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_any(cls: type[S], data: S | Mapping[str, Any] | None = None, where: str = "",
                 **overrides: Any) -> S:
        """Build from an instance, a mapping or None (every default), then ``overrides``.

        Args:
            data: The section's keys (e.g. a YAML mapping), or an instance to copy.
            where: How the section is named in errors about its keys (default
                ``section '<label>'``).
            **overrides: Keys that replace those of ``data``.

        Raises:
            UnknownKeyError: A key that is not a field (the valid ones are listed).
            SchemaError: A missing required key, or a value of the wrong type or range.
        """
        where = where or f"section {cls.label!r}"
        if isinstance(data, cls):
            data = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)}
        if data is not None and not isinstance(data, Mapping):
            raise SchemaError(f"{where} must be a mapping of {cls.noun}s, got {data!r}.")
        values = {**(data or {}), **overrides}
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise UnknownKeyError(f"unknown {cls.noun}(s) {unknown} in {where}; valid ones: "
                                  f"{', '.join(cls.keys()) or 'none'}.")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values
                   and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            raise SchemaError(f"{where} needs the {cls.noun}(s) {missing}.")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists), fit for YAML, JSON and ``weights_only`` checkpoints."""
        return {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def plain(value: Any) -> Any:
    """``value`` with tuples turned into lists and mappings into dicts, recursively."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def check_value(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the annotation ``hint`` (and converted: int -> float, list ->
    tuple); a :class:`SchemaError` naming ``where`` and the expected type otherwise."""
    ok, converted = _match(value, hint)
    if not ok:
        raise SchemaError(f"{where} expects {_describe(hint)}, got {value!r} "
                          f"({type(value).__name__}).{number_text_hint(value)}")
    return converted


def _match(value: Any, hint: Any) -> tuple[bool, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, converted = _match(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is typing.Literal:
        return value in args, value
    if hint is type(None) or hint is None:
        return value is None, value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint in (int, bool, str):
        return isinstance(value, hint) and (hint is bool or not isinstance(value, bool)), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return False, value
        matched = [_match(v, a) for v, a in zip(value, items)]
        return all(ok for ok, _ in matched), tuple(v for _, v in matched)
    if origin in (list, cabc.Sequence):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            return False, value
        return all(_match(v, args[0])[0] for v in value) if args else True, value
    if origin in (dict, cabc.Mapping) or hint in (dict, Mapping):
        return isinstance(value, Mapping), value
    if origin is cabc.Callable or hint is cabc.Callable:
        return callable(value) and not isinstance(value, str), value
    return (isinstance(value, hint) if isinstance(hint, type) else True), value


def _describe(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")
