"""Forward hooks that find the tapped layer and hold its output until ``aux.loss`` uses it.

A batch's path: a *pass* begins at the model's forward pre-hook, or, when the model is entered
another way (timm's ``model.forward_features(x)``, a wrapper calling submodules itself), at the
pre-hook of its *stem*, the first ``nn.Conv2d`` of the first forward, whose input is the images.
The pass notes that input and whether it trains (``model.training``, grad enabled); the tapped
layer's hook keeps its output; the pass files them as a :class:`Capture` at the model's forward
post-hook, or (stem pass) once every tapped layer ran. ``FeatureTap.take(images)`` hands the
capture whose pass received ``images`` to the loss, as ``N x C x h x w`` maps (:mod:`.tokens`).

Release rules (so nothing grows over thousands of steps): a capture is dropped when it is
taken; when a backward pass reaches its feature map (its graph is then spent); on
``optimizer.step()`` (the owner calls :meth:`FeatureTap.release_all`); at the next training
forward once ``aux.loss`` has been called after it (the step's loss phase is over); and, as a last
resort, beyond ``max_pending`` captures (the oldest, with a warning). The last releases are
remembered by weak reference, so that ``aux.loss`` on a released forward says what released it.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .layers import Recorder, choose_layer, is_attention
from .tokens import Layout, as_tensor, check_options, resolve_layout, to_map

__all__ = ["Capture", "FeatureTap", "PairingError", "conv_layer_names"]


#: torch.compile does not guard on nn.Module hooks by default: a graph may run without ours.
_COMPILED_HINT = (
    " If the model is compiled (torch.compile), a graph compiled before attach() or for another "
    "instance of its class without hooks runs without them (torch._dynamo.config."
    "skip_nnmodule_hook_guards): attach before the first compiled forward, or call "
    "torch.compiler.reset() after attaching.")


class PairingError(RuntimeError):
    """``aux.loss(images)`` found no (or no unambiguous) training forward for ``images``."""


@dataclass(eq=False)
class Capture:
    """The tapped layer's output from one training forward, and the input that forward received.

    Attributes:
        feature: The tapped output as the layer returned it (a tensor, or a tuple of them, one
            per tapped layer in the order the layers were named, for a multi-level tap); once
            handed out by :meth:`FeatureTap.take` it holds ``N x C x h x w`` maps.
        input_ref: A weak reference to the tensor the forward received (None when the pass
            began at the tapped layer).
        batch_size: The forward's batch size.
        index: The forward's number, in the order forwards ran.
        closed: Set on the captures still pending when another one is taken: ``aux.loss``
            was called for this step, so they are released at the next training forward.
        input_value, repeated, input_shape, stem_size, entry: See the comments below.
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
    #: Shape of the input (None when the pass began at the tapped layer: input unknown).
    input_shape: tuple[int, ...] | None = None
    #: Spatial size of the stem conv's output in this forward (a ViT's patch grid).
    stem_size: tuple[int, int] | None = None
    #: Where the pass began: "forward" (the model's forward), "stem" or "layer".
    entry: str = "forward"

    def received(self, images: Tensor) -> bool:
        """Whether ``images`` is the very tensor this forward received."""
        return self.input_ref is not None and self.input_ref() is images

    def holds_values_of(self, images: Tensor) -> bool:
        """Whether this forward's input (kept when the objective needs it) equals ``images`` in
        shape, dtype and values (a copy of the batch, e.g. after ``.to(device)``)."""
        v = self.input_value
        return (v is not None and v.shape == images.shape and v.dtype == images.dtype
                and torch.equal(v, images.detach().to(v.device)))

    def fits(self, images: Tensor) -> bool:
        """Whether ``images`` have the channels and size of this forward's input (when known)."""
        s = self.input_shape
        return s is None or len(s) != 4 or tuple(s[1:]) == tuple(images.shape[1:])


@dataclass(eq=False)
class _Pass:
    entry: str
    active: bool
    input_ref: weakref.ref | None = None
    input: Tensor | None = None
    input_shape: tuple[int, ...] | None = None
    outputs: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    stem_size: tuple[int, int] | None = None
    filed: Capture | None = None


#: Why a capture left ``pending`` (the key), as the end of a sentence, with the fix.
_RELEASED = {
    "used": "already used by an earlier aux.loss call: each forward is reconstructed once (call "
            "aux.loss once per forward; for several views, one forward and one aux.loss each)",
    "step": "released by optimizer.step(): call aux.loss(images) after the forward and before "
            "optimizer.step() of the same step",
    "backward": "released when backward reached its feature map: call aux.loss(images) before "
                "loss.backward() and add it to the loss you backpropagate",
    "closed": "released at the next training forward, aux.loss having been called for its step: "
              "call aux.loss for every view before the next step's forwards",
    "overflow": "dropped because more than max_pending forwards were waiting: call aux.loss "
                "after the forwards you want reconstructed, or raise max_pending",
}


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

    @torch.compiler.disable  # bookkeeping in Python, eagerly (torch.compile breaks the graph)
    def __call__(self, module: nn.Module, *args):
        tap = self._tap()
        if tap is None or module is not self._module():
            # raised before the forward (a pre-hook): the model's post-hook, which runs even
            # after that error (always_call), returns quietly instead of raising it again
            if tap is not None and getattr(module, "_is_replica", False) \
                    and self._method != "_on_model_post":
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
            tap.release(cap, "backward")


def conv_layer_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Conv2d`` in ``model`` (registration order)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


class FeatureTap:
    """Captures the output of one layer (or several) of ``model`` in training forwards.

    Args:
        model: The module whose forward (or stem) receives the images.
        layer: Module name to tap (``"features.10"``, ``"blocks.11"``); a list of names for a
            multi-level tap (``["layer3", "layer4"]``: each capture then holds one feature map
            per name, in that order); or None for the encoder's representation, chosen at the
            first forward by the rule of :mod:`recon_aux.layers`.
        max_pending: Most unconsumed captures kept.
        prefix_tokens: Class/register tokens in front of a token output (None: inferred; see
            :mod:`recon_aux.tokens`).
        grid: (h, w) of a non-square token grid (None: inferred).
        layout: ``"nchw"``, ``"nhwc"`` or ``"tokens"`` to settle an ambiguous output (None:
            inferred).

    Attributes:
        layer_names: The tapped layers' names; empty until the first forward when chosen
            automatically.
        layer_name: ``layer_names`` as one string (``"layer3+layer4"``), None before the choice.
        multi_level: True when ``layer`` was a list (captures hold tuples).
        layouts: Each tapped layer's :class:`~recon_aux.tokens.Layout`, once decided.
        stem: Name of the first ``nn.Conv2d`` that ran (None before the first forward).
        pending: Captures waiting for ``take``.

    Example:
        >>> import torch, torchvision
        >>> from recon_aux.capture import FeatureTap
        >>> model = torchvision.models.resnet18()
        >>> tap = FeatureTap(model, "layer4")
        >>> images = torch.rand(2, 3, 64, 64)
        >>> _ = model(images)  # a training forward (model.training): its layer4 output is kept
        >>> tap.take(images).feature.shape  # the capture of the forward that read these images
        torch.Size([2, 512, 2, 2])
        >>> tap.remove()
    """

    def __init__(self, model: nn.Module, layer: str | Sequence[str] | None = None,
                 max_pending: int = 64, *, prefix_tokens: int | None = None,
                 grid: Sequence[int] | None = None, layout: str | None = None) -> None:
        self._model = weakref.ref(model)
        self.max_pending = max_pending
        self.prefix_tokens, self.grid, self.layout = check_options(prefix_tokens, grid, layout)
        self.layer_names: list[str] = []
        self.multi_level = not (layer is None or isinstance(layer, str))
        self.layouts: dict[str, Layout] = {}
        self.stem: str | None = None
        self.pending: list[Capture] = []
        self._pass: _Pass | None = None
        self._handles: list = []
        self._select_handles: list = []
        self._stem_handles: dict[str, object] = {}
        self._recorder: Recorder | None = None
        self._depth = 0
        self._probe: dict | None = None
        self._count = 0
        self._released: deque = deque(maxlen=16)
        self._last_miss: str | None = None
        self._warned_overflow = False
        self._warned_frozen = False

        modules = dict(model.named_modules())
        convs = conv_layer_names(model)
        if layer is None:
            if not convs and not any(is_attention(m) for m in model.modules()):
                raise ValueError(
                    f"{type(model).__name__} has no nn.Conv2d and no attention block: recon_aux "
                    "reconstructs the image from a feature map or a token map. Pass layer='NAME' "
                    "to tap a module that outputs N x C x h x w (or N x L x D tokens), or attach "
                    "to the encoder itself.")
            self._recorder = Recorder()
            for name, m in modules.items():
                if name:
                    self._select_handles.append(m.register_forward_hook(
                        _Hook(self, "_on_select", m, name)))
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
        for name in convs:  # until the first forward shows which conv is the stem
            self._stem_handles[name] = modules[name].register_forward_pre_hook(
                _Hook(self, "_on_conv_pre", modules[name], name))
        self._handles.append(model.register_forward_pre_hook(_Hook(self, "_on_model_pre", model)))
        self._handles.append(model.register_forward_hook(
            _Hook(self, "_on_model_post", model), always_call=True))

    @property
    def layer_name(self) -> str | None:
        """The tapped layer(s), ``"+"``-joined (``"layer3+layer4"``); None until chosen."""
        return "+".join(self.layer_names) if self.layer_names else None

    # -- passes ----------------------------------------------------------------------------------
    def _tap_layer(self, name: str, module: nn.Module) -> None:
        self.layer_names.append(name)
        self._handles.append(module.register_forward_hook(
            _Hook(self, "_on_layer", module, name)))

    def _begin(self, entry: str, first) -> _Pass:
        model = self._model()
        if self._probe is not None:
            active = True
        else:
            active = model is not None and model.training and torch.is_grad_enabled()
            if not active:
                self._last_miss = self._skip_text(
                    "in eval mode" if model is not None and not model.training
                    else "under torch.no_grad()")
        p = _Pass(entry, active)
        if active and self._probe is None:
            # A new training forward: captures whose step's loss phase is over are spent.
            for c in [c for c in self.pending if c.closed]:
                self._forget(c, "closed")
        if torch.is_tensor(first):
            p.input_shape = tuple(first.shape)
            if active:
                p.input_ref, p.input = weakref.ref(first), first.detach()
        if not self.layer_names:
            self._recorder = Recorder()
        self._pass = p
        return p

    def _end_open_pass(self) -> None:
        """Close a pass that began outside the model's forward (at the stem or a tapped layer)."""
        p = self._pass
        if p is None or p.entry == "forward":
            return
        self._pass = None
        if not self.layer_names:
            self._choose(p)
        if p.active and p.filed is None and self._probe is None:
            missing = [n for n in self.layer_names if n not in p.outputs]
            if missing:
                self._last_miss = self._skip_text(
                    f"without reaching the tapped layer {'+'.join(missing)!r}") + _COMPILED_HINT

    def _skip_text(self, how: str) -> str:
        return f"The last forward of the model was not captured: it ran {how}."

    # -- hooks -----------------------------------------------------------------------------------
    def _on_model_pre(self, model: nn.Module, args: tuple) -> None:
        self._depth += 1
        if self._depth > 1:  # the model's forward called itself: one capture per outer call
            return
        self._end_open_pass()
        self._begin("forward", args[0] if args else None)

    def _on_conv_pre(self, module: nn.Module, name: str, args: tuple) -> None:
        if self.stem is None:  # the first conv to run is the stem: keep only its hooks
            self.stem = name
            for other, handle in self._stem_handles.items():
                if other != name:
                    handle.remove()
            self._stem_handles = {name: self._stem_handles[name]}
            self._handles.append(module.register_forward_hook(_Hook(self, "_on_stem", module)))
        if self._depth > 0:
            return  # inside the model's forward: that pass is running
        self._end_open_pass()
        self._begin("stem", args[0] if args else None)

    def _on_stem(self, module: nn.Module, inputs: tuple, output) -> None:
        p = self._pass
        if p is not None and p.stem_size is None and torch.is_tensor(output) \
                and output.dim() == 4:
            p.stem_size = (int(output.shape[-2]), int(output.shape[-1]))

    def _on_select(self, module: nn.Module, name: str, inputs: tuple, output) -> None:
        if self._recorder is not None:
            self._recorder.record(name, inputs, output)

    def _on_layer(self, module: nn.Module, name: str, inputs: tuple, output) -> None:
        p = self._pass
        if self._depth == 0 and (p is None or (p.entry == "layer" and name in p.outputs)):
            # Outside any pass (a model without a conv stem entered another way): a pass whose
            # input is unknown, paired by batch size.
            self._end_open_pass()
            p = self._begin("layer", None)
        if p is None:
            return
        p.calls[name] = p.calls.get(name, 0) + 1
        if not p.active:
            return
        if p.filed is not None:  # ran again after the pass was filed
            p.filed.repeated[name] = p.calls[name]
            return
        p.outputs[name] = output
        if self._depth == 0 and all(n in p.outputs for n in self.layer_names):
            self._file(p)

    def _on_model_post(self, model: nn.Module, args: tuple, output) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        p, self._pass = self._pass, None
        if p is None:
            return
        if not self.layer_names:
            self._choose(p)
            if not self.layer_names:
                return
        missing = [n for n in self.layer_names if n not in p.outputs]
        if p.active and missing and self._probe is None:
            self._last_miss = self._skip_text(
                f"without reaching the tapped layer {'+'.join(missing)!r}") + _COMPILED_HINT
        if p.active and not missing:
            self._file(p)

    # -- choice and filing -----------------------------------------------------------------------
    def _choose(self, p: _Pass | None) -> None:
        """Choose the layer (``layer=None``) from the recorded forward; fill ``p`` from it."""
        rec, model = self._recorder, self._model()
        if not rec or model is None:
            return
        name = choose_layer(model, rec)
        for h in self._select_handles:
            h.remove()
        self._select_handles, self._recorder = [], None
        self._tap_layer(name, dict(model.named_modules())[name])
        if p is None:  # entered without a pass (no conv stem): a training pass if it is now
            p = self._pass = _Pass("layer", model.training and torch.is_grad_enabled())
        p.outputs[name], p.calls[name] = rec.out[name], rec.calls[name]
        if p.entry != "forward" and p.active and p.filed is None:
            self._file(p)

    def _file(self, p: _Pass) -> None:
        feats = [as_tensor(p.outputs[n], n) for n in self.layer_names]
        for name, f in zip(self.layer_names, feats):
            if f.dim() not in (3, 4):
                raise ValueError(
                    f"the tapped layer {name!r} returned {tuple(f.shape)}; recon_aux needs an "
                    "N x C x h x w map, an N x h x w x C map or N x L x D tokens. Tap a conv "
                    "layer or a block (layer='NAME').")
        if len({int(f.shape[0]) for f in feats}) != 1:
            raise ValueError(f"the tapped layers {self.layer_names} returned different batch "
                             f"sizes {[int(f.shape[0]) for f in feats]}; tap layers of one "
                             "forward path.")
        if self._probe is not None:
            image = p.input_shape[-2:] if p.input_shape else None
            self._probe["feature"] = self.maps(feats, image, p.stem_size)
            p.filed = True
            return
        self._count += 1
        repeated = {n: p.calls[n] for n in self.layer_names if p.calls.get(n, 0) > 1}
        cap = Capture(tuple(feats) if self.multi_level else feats[0], p.input_ref,
                      int(feats[0].shape[0]), self._count, input_value=p.input,
                      repeated=repeated, input_shape=p.input_shape, stem_size=p.stem_size,
                      entry=p.entry)
        p.filed = cap
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
            self._forget(self.pending[0], "overflow")
            if not self._warned_overflow:
                self._warned_overflow = True
                warnings.warn(
                    f"recon_aux: more than max_pending={self.max_pending} training forwards were "
                    "captured without aux.loss, backward or optimizer.step(); releasing the "
                    "oldest. Call aux.loss(images) after the forwards you want reconstructed, or "
                    "raise max_pending.", RuntimeWarning, stacklevel=2,
                )

    def maps(self, feats: Sequence[Tensor], image: Sequence[int] | None,
             stem: Sequence[int] | None = None) -> Tensor | tuple[Tensor, ...]:
        """The tapped outputs ``feats`` (one per layer) as ``N x C x h x w`` maps for images of
        spatial size ``image``; each layer's layout is decided the first time."""
        model = self._model()
        modules = dict(model.named_modules()) if model is not None else {}
        out = []
        for name, f in zip(self.layer_names, feats):
            image_hw = tuple(int(v) for v in image) if image is not None else _square(f)
            layout = self.layouts.get(name)
            if layout is None:
                m = modules.get(name)
                sub = list(m.modules()) if m is not None else []
                layout = resolve_layout(
                    f, name, image_hw, stem=stem, prefix_tokens=self.prefix_tokens,
                    grid=self.grid, layout=self.layout,
                    has_conv=any(isinstance(s, nn.Conv2d) for s in sub),
                    has_linear=any(isinstance(s, nn.Linear) or type(s) is nn.LayerNorm
                                   or is_attention(s) for s in sub))
                self.layouts[name] = layout
            out.append(to_map(f, layout, name, image_hw, stem=stem, grid=self.grid))
        return tuple(out) if self.multi_level else out[0]

    # -- use -------------------------------------------------------------------------------------
    def take(self, images: Tensor) -> Capture:
        """Remove and return the capture of the forward that consumed ``images``, its outputs
        turned into ``N x C x h x w`` maps.

        The capture whose forward received this very tensor wins; otherwise the one pending
        capture with the same batch size and input shape (channels, height, width), or among
        several the one whose input holds the same values (a copy, e.g. by DataParallel's
        scatter). Anything else, and a forward in which the tapped layer ran more than once, is
        a :class:`PairingError` that says what happened.
        """
        if not self.layer_names and self._pass is not None and self._pass.entry != "forward":
            self._end_open_pass()  # a forward entered another way: choose the layer now
        elif not self.layer_names and self._pass is None and self._recorder:
            self._choose(None)
        match = next((c for c in self.pending if c.received(images)), None)
        p = self._pass
        if match is None and (self._released_for(images) is not None or (
                p is not None and p.input_ref is not None and p.input_ref() is images)):
            raise PairingError(self._pairing_message(images, [], []))
        if match is None:
            same = [c for c in self.pending if c.batch_size == images.shape[0]]
            fitting = [c for c in same if c.fits(images)]
            if len(fitting) > 1:  # several candidates: the one whose input holds these values
                fitting = [c for c in fitting if c.holds_values_of(images)] or fitting
            if len(fitting) == 1:
                match = fitting[0]
            else:
                raise PairingError(self._pairing_message(images, same, fitting))
        if match.repeated:
            raise PairingError(
                f"the tapped layer {self.layer_name!r} ran {max(match.repeated.values())} times "
                "during one forward of the attached model (e.g. a siamese forward that encodes "
                "two images), so its output cannot be paired with one input. Attach to the "
                "encoder submodule that sees one image per call (recon_aux.attach(model.encoder, "
                "...)), or name a layer that runs once per forward (layer='NAME')."
            )
        self._forget(match, "used")
        for c in self.pending:
            c.closed = True
        feats = match.feature if isinstance(match.feature, tuple) else (match.feature,)
        match.feature = self.maps(feats, images.shape[-2:], match.stem_size)
        return match

    def _pairing_message(self, images: Tensor, same: list[Capture],
                         fitting: list[Capture]) -> str:
        n, shape = images.shape[0], tuple(images.shape)
        p = self._pass
        if p is not None and p.entry == "stem" and p.active and p.filed is None and (
                not self.pending or (p.input_ref is not None and p.input_ref() is images)):
            return (f"aux.loss(images) found no training forward to pair with: the last forward "
                    f"(entered at the stem {self.stem!r}, not through the model's forward) has "
                    f"not run the tapped layer {self.layer_name!r}. Call aux.loss after a "
                    "forward that runs it (model(x), or forward_features(x) when it does).")
        gone = self._released_for(images)
        if gone is not None:
            return (f"aux.loss(images) got the images ({shape}) of a forward whose features were "
                    f"{_RELEASED[gone[1]]}.")
        if not self.pending:
            if self._count == 0:
                why = (self._last_miss or "") + (
                    " No forward of the model has been seen yet: recon_aux watches the module "
                    "given to attach() and captures its forward, or any method that runs its "
                    "first conv (the stem) and then the tapped layer (e.g. timm's "
                    "forward_features)." + _COMPILED_HINT if self._last_miss is None else "")
            else:
                why = self._last_miss or ""
            return (
                f"aux.loss(images) found no training forward to pair with (batch of {n}). Call it "
                "after the model's forward on these images, in train mode (model.train()) with "
                "grad enabled; forwards under torch.no_grad() or in eval mode are not "
                "captured, and each capture is released by backward and optimizer.step(). " + why
            ).rstrip()
        sizes = [c.batch_size for c in self.pending]
        if not same:
            return (
                f"aux.loss(images) got a batch of {n} images, which no pending training forward "
                f"received; the pending forwards had batch sizes {sizes}. Pass the tensor the "
                "model received (e.g. the normalised copy), or images of the same batch."
            )
        if not fitting:
            got = ", ".join(str(c.input_shape) for c in same)
            return (
                f"aux.loss(images) got images of shape {shape}, but the pending forward(s) with a "
                f"batch of {n} received {got}: the reconstruction target must have the channels "
                "and size the encoder saw. Pass the tensor the model received (aux.loss(x) after "
                "model(x)), at the size it was encoded."
            )
        return (
            f"aux.loss(images) got a batch of {n} images that is not the tensor any pending "
            f"forward received, and {len(fitting)} pending forwards have that batch size and "
            f"shape (pending batch sizes: {sizes}): the pairing is ambiguous. Pass the exact "
            "tensor given to the model (aux.loss(x) after model(x)), or call aux.loss right after "
            "each forward."
        )

    def _released_for(self, images: Tensor) -> tuple | None:
        """The release record of the forward that received ``images``, if one is remembered."""
        return next((r for r in reversed(self._released)
                     if r[0] is not None and r[0]() is images), None)

    def _forget(self, capture: Capture, reason: str) -> None:
        if capture in self.pending:
            self.pending.remove(capture)
            self._released.append((capture.input_ref, reason))
            if reason != "used":
                self._last_miss = f"The last captured forward was {_RELEASED[reason]}."

    def release(self, capture: Capture, reason: str = "backward") -> None:
        """Drop ``capture`` (backward reached its feature map, or it was used); ``reason``, a
        key of ``_RELEASED``, is what a later ``aux.loss`` on that forward reports."""
        self._forget(capture, reason)

    def release_all(self) -> None:
        """Drop every pending capture (the optimizer stepped: their forwards are stale)."""
        for c in list(self.pending):
            self._forget(c, "step")

    def adopt(self, names: Sequence[str]) -> None:
        """Tap ``names`` (e.g. a checkpoint's layers) when the layer is still to be chosen."""
        model = self._model()
        if self.layer_names or model is None:
            return
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules or n == ""]
        if unknown:
            raise ValueError(f"the checkpoint's tapped layers {unknown} are not modules of "
                             f"{type(model).__name__}: load it into the model it was saved "
                             "with, or attach with layer=... naming this model's layer and "
                             "train the head anew.")
        for h in self._select_handles:
            h.remove()
        self._select_handles, self._recorder = [], None
        self.multi_level = len(names) > 1
        for n in names:
            self._tap_layer(n, modules[n])

    @contextlib.contextmanager
    def probe(self) -> Iterator[dict]:
        """Within this block the next forward's tapped feature is stored in the yielded dict
        (key ``"feature"``, as ``N x C x h x w`` maps) whatever the mode or grad state, and no
        capture is filed."""
        if self._probe is not None:
            raise RuntimeError("FeatureTap.probe() is not re-entrant.")
        self._probe = box = {}
        try:
            yield box
        finally:
            self._probe = None

    def remove(self) -> None:
        """Remove every hook this tap registered and drop all captures."""
        for h in self._handles + self._select_handles + list(self._stem_handles.values()):
            h.remove()
        self._handles, self._select_handles, self._stem_handles = [], [], {}
        self._recorder = self._pass = None
        self.pending.clear()


def _square(f: Tensor) -> tuple[int, int]:
    """An image size for a map whose input is unknown: the map's own grid, as if stride 1."""
    if f.dim() == 4:
        return int(f.shape[-2]), int(f.shape[-1])
    side = int(round((f.shape[1]) ** 0.5))
    return side, side
