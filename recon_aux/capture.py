"""Forward hooks that find the tapped conv layer and hold its output until ``aux.loss`` uses it.

A batch's path: the model's forward pre-hook notes the input tensor (the images) and whether this
is a *training* forward (``model.training`` and grad enabled); the tapped layer's forward hook
keeps its output; the model's forward (post-)hook files the pair as a :class:`Capture`.
``FeatureTap.take(images)`` hands the capture whose forward consumed ``images`` to the loss.

Release rules (so nothing grows over thousands of steps): a capture is dropped when it is
taken; when a backward pass reaches its feature map (its graph is then spent); on
``optimizer.step()`` (the owner calls :meth:`FeatureTap.release_all`); at the next training
forward once ``aux.loss`` has been called after it (the step's loss phase is over); and, as a last
resort, beyond ``max_pending`` captures (the oldest, with a warning).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["Capture", "FeatureTap", "PairingError", "conv_layer_names"]


class PairingError(RuntimeError):
    """``aux.loss(images)`` found no (or no unambiguous) training forward for ``images``."""


@dataclass(eq=False)
class Capture:
    """The tapped layer's output from one training forward, and the input that forward received.

    ``feature`` is one ``N x C x h x w`` tensor, or a tuple of them (one per tapped layer, in the
    order the layers were named) for a multi-level tap.
    """

    feature: Tensor | tuple[Tensor, ...]
    input_ref: weakref.ref | None
    batch_size: int
    index: int
    closed: bool = field(default=False)
    #: The input's values (detached), to pair a copy of it (e.g. made by DataParallel's scatter)
    #: when several pending captures share the batch size.
    input_value: Tensor | None = None
    #: Tapped layers that ran more than once in this forward, with their call counts.
    repeated: dict[str, int] = field(default_factory=dict)

    def received(self, images: Tensor) -> bool:
        return self.input_ref is not None and self.input_ref() is images

    def holds_values_of(self, images: Tensor) -> bool:
        v = self.input_value
        return (v is not None and v.shape == images.shape and v.dtype == images.dtype
                and torch.equal(v, images.detach().to(v.device)))


class _Hook:
    """A hook that calls back into its tap through weak references.

    It ignores calls from any module other than the instance it was registered on, and a deep copy
    of a hooked model shares the same (inert for the copy) hook object instead of copying the tap:
    momentum encoders made with ``copy.deepcopy`` after ``attach`` are never captured.
    """

    def __init__(self, tap: FeatureTap, method: str, module: nn.Module, *extra) -> None:
        self._tap = weakref.ref(tap)
        self._method = method
        self._module = weakref.ref(module)
        self._extra = extra

    def __call__(self, module: nn.Module, *args):
        tap = self._tap()
        if tap is None or module is not self._module():
            if tap is not None and getattr(module, "_is_replica", False):
                raise RuntimeError(
                    "recon_aux: this module runs as a replica of torch.nn.DataParallel over "
                    "several GPUs, whose forwards recon_aux cannot capture (each replica runs "
                    "in its own thread on its own device). Use DistributedDataParallel (one "
                    "process per GPU, e.g. torchrun), or DataParallel with one visible GPU."
                )
            return None
        getattr(tap, self._method)(module, *self._extra, *args)
        return None

    def __deepcopy__(self, memo):
        return self


class _ReleaseOnBackward:
    """Tensor hook: the backward pass reached a captured feature map, so release that capture."""

    def __init__(self, tap: FeatureTap, capture: Capture) -> None:
        self._tap, self._capture = weakref.ref(tap), weakref.ref(capture)

    def __call__(self, grad: Tensor) -> None:
        tap, cap = self._tap(), self._capture()
        if tap is not None and cap is not None:
            tap.release(cap)


def conv_layer_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Conv2d`` in ``model`` (registration order)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


class FeatureTap:
    """Captures the output of one layer (or several) of ``model`` in training forwards.

    Args:
        model: The module whose forward receives the images.
        layer: Module name to tap (``"features.10"``); a list of names for a multi-level tap
            (``["layer3", "layer4"]``: each capture then holds one feature map per name, in that
            order); or None for the Conv2d that runs last in the forward pass, found from
            execution order at the first forward.
        max_pending: Most unconsumed captures kept.

    Attributes:
        layer_names: The tapped layers' names; empty until the first forward when chosen
            automatically.
        layer_name: ``layer_names`` as one string (``"layer3+layer4"``), None before the choice.
        multi_level: True when ``layer`` was a list (captures hold tuples).
        pending: Captures waiting for ``take``.
    """

    def __init__(self, model: nn.Module, layer: str | Sequence[str] | None = None,
                 max_pending: int = 64) -> None:
        self._model = weakref.ref(model)
        self.max_pending = max_pending
        self.layer_names: list[str] = []
        self.multi_level = not (layer is None or isinstance(layer, str))
        self._outputs: dict[str, Tensor] = {}
        self._calls: dict[str, int] = {}
        self._input: Tensor | None = None
        self.pending: list[Capture] = []
        self._handles: list = []
        self._select_handles: list = []
        self._depth = 0
        self._active = False
        self._probe: dict | None = None
        self._input_ref: weakref.ref | None = None
        self._last_conv: tuple[str, Tensor] | None = None
        self._count = 0
        self._skipped: str | None = None
        self._warned_overflow = False
        self._warned_frozen = False

        modules = dict(model.named_modules())
        convs = conv_layer_names(model)
        if layer is None:
            if not convs:
                raise ValueError(
                    f"{type(model).__name__} has no nn.Conv2d: recon_aux reconstructs the image "
                    "from the last convolutional feature map. Pass layer='NAME' to tap another "
                    "module that outputs N x C x h x w, or attach to the convolutional encoder."
                )
            for name in convs:
                self._select_handles.append(modules[name].register_forward_hook(
                    _Hook(self, "_on_conv", modules[name], name)))
        else:
            names = [layer] if isinstance(layer, str) else list(layer)
            if not names or not all(isinstance(n, str) for n in names):
                raise ValueError(f"layer={layer!r} must be a module name or a non-empty list of "
                                 "module names (e.g. ['layer3', 'layer4']).")
            if len(set(names)) != len(names):
                raise ValueError(f"layer={names} names a module twice; name each level once.")
            for name in names:
                if name not in modules or name == "":
                    raise ValueError(
                        f"layer={name!r} is not a module of {type(model).__name__}. Its conv "
                        f"layers are: {convs if convs else 'none'}."
                    )
                self._tap_layer(name, modules[name])
        self._handles.append(model.register_forward_pre_hook(_Hook(self, "_on_model_pre", model)))
        self._handles.append(model.register_forward_hook(
            _Hook(self, "_on_model_post", model), always_call=True))

    @property
    def layer_name(self) -> str | None:
        return "+".join(self.layer_names) if self.layer_names else None

    # -- hooks ---------------------------------------------------------------------------------
    def _tap_layer(self, name: str, module: nn.Module) -> None:
        self.layer_names.append(name)
        self._handles.append(module.register_forward_hook(
            _Hook(self, "_on_layer", module, name)))

    def _on_model_pre(self, model: nn.Module, args: tuple) -> None:
        self._depth += 1
        if self._depth > 1:  # the model's forward called itself: one capture per outer call
            return
        self._outputs, self._last_conv, self._calls = {}, None, {}
        if self._probe is not None:
            self._active = True
            return
        self._active = model.training and torch.is_grad_enabled()
        if not self._active:
            self._skipped = "in eval mode" if not model.training else "under torch.no_grad()"
            return
        # A new training forward: captures whose step's loss phase is over are spent.
        self.pending = [c for c in self.pending if not c.closed]
        first = args[0] if args else None
        self._input_ref = weakref.ref(first) if torch.is_tensor(first) else None
        self._input = first.detach() if torch.is_tensor(first) else None

    def _on_conv(self, module: nn.Module, name: str, inputs: tuple, output) -> None:
        if self._depth > 0:
            self._last_conv = (name, output if self._active else None)
            self._calls[name] = self._calls.get(name, 0) + 1

    def _on_layer(self, module: nn.Module, name: str, inputs: tuple, output) -> None:
        if self._depth > 0 and self._active:
            self._outputs[name] = output
            self._calls[name] = self._calls.get(name, 0) + 1

    def _on_model_post(self, model: nn.Module, args: tuple, output) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        if not self.layer_names:
            if self._last_conv is None:
                return  # the forward failed or ran no conv; choose at a later forward
            name, output = self._last_conv
            if output is not None:
                self._outputs[name] = output
            for h in self._select_handles:
                h.remove()
            self._select_handles = []
            self._tap_layer(name, dict(model.named_modules())[name])
        outputs, self._outputs, self._last_conv = self._outputs, {}, None
        calls, self._calls = self._calls, {}
        model_input, self._input = self._input, None
        missing = [n for n in self.layer_names if n not in outputs]
        if self._active and missing:
            self._skipped = f"without reaching the tapped layer {'+'.join(missing)!r}"
        if not self._active or missing:
            return
        self._active = False
        feats = [outputs[n] for n in self.layer_names]
        for name, f in zip(self.layer_names, feats):
            if not torch.is_tensor(f) or f.dim() != 4:
                raise ValueError(
                    f"the tapped layer {name!r} returned "
                    f"{tuple(f.shape) if torch.is_tensor(f) else type(f).__name__}; recon_aux "
                    "needs an N x C x h x w feature map. Tap a conv layer (layer='NAME')."
                )
        if len({int(f.shape[0]) for f in feats}) != 1:
            raise ValueError(f"the tapped layers {self.layer_names} returned different batch "
                             f"sizes {[int(f.shape[0]) for f in feats]}; tap layers of one "
                             "forward path.")
        feature = tuple(feats) if self.multi_level else feats[0]
        if self._probe is not None:
            self._probe["feature"] = feature
            return
        self._count += 1
        repeated = {n: calls[n] for n in self.layer_names if calls.get(n, 0) > 1}
        cap = Capture(feature, self._input_ref, int(feats[0].shape[0]), self._count,
                      input_value=model_input, repeated=repeated)
        for f in feats:
            if f.requires_grad:
                f.register_hook(_ReleaseOnBackward(self, cap))
        if not any(f.requires_grad for f in feats) and not self._warned_frozen:
            self._warned_frozen = True
            warnings.warn(
                f"recon_aux: the tapped layer {self.layer_name!r} output does not require grad "
                "(a frozen encoder, or a layer before every trainable one): the objective trains "
                "the head only and cannot change the encoder.", RuntimeWarning, stacklevel=2)
        self.pending.append(cap)
        if len(self.pending) > self.max_pending:
            self.pending.pop(0)
            if not self._warned_overflow:
                self._warned_overflow = True
                warnings.warn(
                    f"recon_aux: more than max_pending={self.max_pending} training forwards were "
                    "captured without aux.loss, backward or optimizer.step(); releasing the "
                    "oldest. Call aux.loss(images) after the forwards you want reconstructed, or "
                    "raise max_pending.", RuntimeWarning, stacklevel=2,
                )

    # -- use -----------------------------------------------------------------------------------
    def take(self, images: Tensor) -> Capture:
        """Remove and return the capture of the forward that consumed ``images``.

        The capture whose forward received this very tensor wins; otherwise the one pending
        capture with the same batch size, or among several of that size the one whose input
        holds the same values (a copy, e.g. by DataParallel's scatter). Anything else, and a
        forward in which the tapped layer ran more than once, is a :class:`PairingError`.
        """
        match = next((c for c in self.pending if c.received(images)), None)
        if match is None:
            same = [c for c in self.pending if c.batch_size == images.shape[0]]
            if len(same) > 1:  # several candidates: the one whose input holds these values
                same = [c for c in same if c.holds_values_of(images)] or same
            if len(same) == 1:
                match = same[0]
            else:
                raise PairingError(self._pairing_message(images, same))
        if match.repeated:
            raise PairingError(
                f"the tapped layer {self.layer_name!r} ran {max(match.repeated.values())} times "
                "during one forward of the attached model (e.g. a siamese forward that encodes "
                "two images), so its output cannot be paired with one input. Attach to the "
                "encoder submodule that sees one image per call (recon_aux.attach(model.encoder, "
                "...)), or name a layer that runs once per forward (layer='NAME')."
            )
        self.pending.remove(match)
        for c in self.pending:
            c.closed = True
        return match

    def _pairing_message(self, images: Tensor, same: list[Capture]) -> str:
        n = images.shape[0]
        if not self.pending:
            why = (f" The last forward of the model was not captured: it ran {self._skipped}."
                   if self._skipped else " No forward of the model has been seen yet.")
            return (
                f"aux.loss(images) found no training forward to pair with (batch of {n}). Call it "
                "after the model's forward on these images, in train mode (model.train()) with "
                "grad enabled; forwards under torch.no_grad() or in eval mode are not "
                "captured, and each capture is released by backward and optimizer.step()." + why
            )
        sizes = [c.batch_size for c in self.pending]
        if not same:
            return (
                f"aux.loss(images) got a batch of {n} images, which no pending training forward "
                f"received; the pending forwards had batch sizes {sizes}. Pass the tensor the "
                "model received (e.g. the normalised copy), or images of the same batch."
            )
        return (
            f"aux.loss(images) got a batch of {n} images that is not the tensor any pending "
            f"forward received, and {len(same)} pending forwards have that batch size "
            f"(pending batch sizes: {sizes}): the pairing is ambiguous. Pass the exact tensor "
            "given to the model (aux.loss(x) after model(x)), or call aux.loss right after each "
            "forward."
        )

    def release(self, capture: Capture) -> None:
        if capture in self.pending:
            self.pending.remove(capture)

    def release_all(self) -> None:
        self.pending.clear()

    @contextlib.contextmanager
    def probe(self) -> Iterator[dict]:
        """Within this block the next forward's tapped feature is stored in the yielded dict
        (key ``"feature"``) whatever the mode or grad state, and no capture is filed."""
        if self._probe is not None:
            raise RuntimeError("FeatureTap.probe() is not re-entrant.")
        self._probe = box = {}
        try:
            yield box
        finally:
            self._probe = None

    def remove(self) -> None:
        """Remove every hook this tap registered and drop all captures."""
        for h in self._handles + self._select_handles:
            h.remove()
        self._handles, self._select_handles = [], []
        self.release_all()
