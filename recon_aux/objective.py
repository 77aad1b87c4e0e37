"""``attach``: the two lines that add the reconstruction objective to an existing training loop.

.. code-block:: python

    aux = recon_aux.attach(encoder, optimizer)   # once, before the loop
    loss = loss + aux.loss(images)               # each step, after encoder(images)

:class:`ReconAux` ties the pieces together: a :class:`~recon_aux.capture.FeatureTap` on the
encoder's representation (its last block, or its last conv layer: :mod:`recon_aux.layers`), a
:class:`~recon_aux.head.ReconstructionHead` built from the first captured feature map (token
outputs of transformer blocks become maps: :mod:`recon_aux.tokens`), and a
:class:`~recon_aux.perceptual.PerceptualLoss`.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .capture import FeatureTap
from .config import ReconAuxConfig
from .head import ReconstructionHead
from .perceptual import NonFiniteLossError, PerceptualLoss, check_images
from .tokens import Layout

__all__ = ["ReconAux", "attach", "NonFiniteLossError"]

_DIVERGED = ("The encoder's features or the head diverged: lower the learning rate or the "
             "auxiliary weight, or check the images for NaN/Inf.")

# model -> weak reference to the ReconAux attached to it (one at a time).
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _StepHook:
    def __init__(self, aux: ReconAux) -> None:
        self._aux = weakref.ref(aux)

    def __call__(self, optimizer, args, kwargs) -> None:
        aux = self._aux()
        if aux is not None:
            aux.steps += 1
            aux.tap.release_all()
            if aux.head is not None:  # the step consumed them; loops that zero only their
                aux.head.zero_grad(set_to_none=True)  # own model (net.zero_grad()) stay right


class _SyncHook:
    """Optimizer step pre-hook: average the head's gradients over ranks (DDP-style)."""

    def __init__(self, aux: ReconAux) -> None:
        self._aux = weakref.ref(aux)

    def __call__(self, optimizer, args, kwargs) -> None:
        aux = self._aux()
        if aux is not None:
            aux.sync_gradients()


class ReconAux(nn.Module):
    """The auxiliary reconstruction objective attached to an encoder (Hizioglu, 2020, Figure 1).

    A generator reconstructs each training batch from the encoder's feature map (its last block
    or last conv layer, or the named layers); ``weight * (l2_weight * L2 + lpips_weight *
    LPIPS)`` is added to the method's loss, and its gradient flows back into the encoder. Nothing
    in the model's code changes: the feature map is read by forward hooks. Build it with
    :func:`attach`.

    As an ``nn.Module`` its parameters and ``state_dict()`` hold the head only (the frozen LPIPS
    network is never registered), plus an ``_extra_state`` entry with the head's geometry so that
    ``load_state_dict`` can rebuild a head that has not been built yet. When ``aux`` is an
    attribute of a LightningModule, ``self.parameters()`` therefore hands the optimizer the head
    once and no LPIPS weights; attach without an optimizer in that case.

    Attributes:
        config: The :class:`~recon_aux.config.ReconAuxConfig` in force.
        tap: The :class:`~recon_aux.capture.FeatureTap` (hooks and pending captures).
        head: The :class:`ReconstructionHead`, or None until the first ``loss`` (or
            ``input_shape`` at attach) shows the feature map's shape.
        perceptual: The :class:`PerceptualLoss`.
        last: Detached ``l2``, ``lpips``, ``total``, ``reconstruction`` and ``images`` of the
            latest ``loss`` call, for logging and pictures.
        calls, steps: ``loss`` calls and ``optimizer.step()`` calls seen.

    Example:
        >>> import torch, torchvision, recon_aux
        >>> encoder = torchvision.models.resnet18(num_classes=10)
        >>> optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
        >>> aux = recon_aux.attach(encoder, optimizer)  # a ReconAux
        >>> images = torch.rand(4, 3, 64, 64)
        >>> loss = encoder(images).logsumexp(1).mean() + aux.loss(images)  # forward first
        >>> loss.backward()
        >>> optimizer.step()
        >>> aux.layer_name, sorted(aux.last), (aux.calls, aux.steps)
        ('layer4.1.conv2', ['images', 'l2', 'lpips', 'reconstruction', 'total'], (1, 1))
        >>> aux.reconstruct(images).shape  # N x 3 x H x W, in the images' range
        torch.Size([4, 3, 64, 64])
        >>> aux.remove()  # the hooks go; the encoder is as it was
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        layer: str | Sequence[str] | None = None,
        config: ReconAuxConfig | Mapping | str | Path | None = None,
        input_shape: Sequence[int] | None = None,
        prefix_tokens: int | None = None,
        grid: Sequence[int] | None = None,
        layout: str | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach() needs an nn.Module, got {type(model).__name__}.")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, "
                            f"got {type(optimizer).__name__}.")
        if optimizer is not None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            trainable = [p for p in model.parameters() if p.requires_grad]
            if trainable and not any(id(p) in held for p in trainable):
                warnings.warn(
                    f"recon_aux: the optimizer given to attach() holds none of this "
                    f"{type(model).__name__}'s trainable parameters: the objective's gradient "
                    "reaches the encoder, but nothing steps it with this optimizer. Pass the "
                    "optimizer that trains the encoder (the head joins it as a param group).",
                    stacklevel=3)
        previous = _ATTACHED.get(model)
        if previous is not None and previous() is not None and not previous()._removed:
            raise RuntimeError(
                f"a ReconAux is already attached to this {type(model).__name__} (layer "
                f"{previous().layer_name!r}). Use that one, or call its .remove() first."
            )
        # a copy, whose fields outside ReconAuxConfig.LIVE refuse assignment from now on
        self.config = cfg = ReconAuxConfig.from_any(config, **overrides).fixed_by_attach()
        with torch.random.fork_rng(devices=[]):  # attach draws nothing from the user's RNG
            self.perceptual = PerceptualLoss(
                l2_weight=cfg.l2_weight, lpips_weight=cfg.lpips_weight, net=cfg.net,
                input_range=cfg.input_range, mean=cfg.mean, std=cfg.std,
                resize_to=cfg.resize_to, weights=cfg.lpips_weights,
                range_tolerance=cfg.range_tolerance, check_inputs=cfg.check_inputs,
                lpips_crop=cfg.lpips_crop, lpips_fraction=cfg.lpips_fraction,
            )
        self.head: ReconstructionHead | None = None
        self.tap = FeatureTap(model, layer, max_pending=cfg.max_pending,
                              prefix_tokens=prefix_tokens, grid=grid, layout=layout)
        self._model = weakref.ref(model)
        self._optimizer = optimizer
        self._head_spec: dict | None = None
        self._compile: tuple[tuple, dict] | None = None  # compile()'s arguments, for a later head
        self._removed = False
        self.last: dict[str, Tensor] = {}
        self.calls = 0
        self.steps = 0
        self._step_handle = (optimizer.register_step_post_hook(_StepHook(self))
                             if optimizer is not None else None)
        self._sync_handle = (optimizer.register_step_pre_hook(_SyncHook(self))
                             if optimizer is not None and cfg.sync_grads else None)
        _ATTACHED[model] = weakref.ref(self)
        if input_shape is not None:
            self._build_from_dry_forward(model, tuple(input_shape))

    # -- properties ------------------------------------------------------------------------------
    @property
    def layer_name(self) -> str | None:
        """Name of the tapped layer (None until the first forward when chosen automatically)."""
        return self.tap.layer_name

    # -- the loss --------------------------------------------------------------------------------
    def loss(self, images: Tensor) -> Tensor:
        """The auxiliary loss for ``images`` (``N x 3 x H x W``, in the configured encoding).

        Call it after the model's training forward on ``images`` (several views per step: one
        call per view). Returns ``weight * (l2_weight * L2 + lpips_weight * LPIPS)`` as a scalar
        float32 tensor whose gradient reaches the head and the encoder.
        """
        self._check_not_removed()
        check_images(images, "images")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch (0 samples): call aux.loss for batches "
                             "that hold images, or skip the step.")
        self.perceptual.check_size(images)
        if self.head is None and self.config.check_inputs:
            self.perceptual.check_target(images)  # before the head is built from this batch
        capture = self.tap.take(images)
        feature = capture.feature
        if capture.batch_size != images.shape[0]:
            raise ValueError(f"images hold {images.shape[0]} samples but the forward they were "
                             f"paired with produced {capture.batch_size}.")
        _check_feature_dtype(feature, self.layer_name)
        if self.head is None:
            self._build_head(feature, tuple(images.shape[-2:]))
        self.calls += 1
        reconstruction = self.head(feature, images.shape[-2:])
        self.perceptual.check_inputs = self.config.check_inputs  # live, as the weights are
        parts = self.perceptual.components(reconstruction, images, check=False)
        total = self.config.weight * parts["total"]
        if self.config.check_inputs:
            self._check(reconstruction, parts, total)
        self.last = {
            "l2": parts["l2"].detach(), "lpips": parts["lpips"].detach(), "total": total.detach(),
            "reconstruction": reconstruction.detach(), "images": images.detach(),
        }
        return total

    def forward(self, images: Tensor) -> Tensor:
        """Same as :meth:`loss`."""
        return self.loss(images)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``torch.compile`` what :meth:`loss` computes with: the head and the LPIPS network.

        ``nn.Module.compile`` would compile :meth:`forward`, which the documented
        ``aux.loss(images)`` never calls; this compiles, in place, the two modules ``loss``
        runs (arguments as ``torch.compile``'s, e.g. ``mode="max-autotune"`` or
        ``backend="aot_eager"``). The hooks, the input checks and the bookkeeping stay eager;
        parameter names and the ``state_dict`` are unchanged. A head built later (at the first
        ``loss``, without ``input_shape``) is compiled as it is built. To compile the encoder
        too, compile it as usual (``model.compile()`` or ``torch.compile(model)``), before or
        after :func:`attach`, but attach before its first compiled forward (torch.compile does
        not notice hooks added to a module whose graph it already made).

        Example:
            >>> import torch, torchvision, recon_aux
            >>> encoder = torchvision.models.resnet18()
            >>> aux = recon_aux.attach(encoder, torch.optim.SGD(encoder.parameters(), lr=0.1))
            >>> aux.compile(mode="max-autotune-no-cudagraphs")  # takes effect at the first loss
        """
        self._compile = (args, kwargs)
        if self.head is not None:
            self.head.compile(*args, **kwargs)
        if self.perceptual.lpips is not None:
            self.perceptual.lpips.compile(*args, **kwargs)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """Reconstructions of ``images`` by the current encoder and head, in eval mode:
        ``N x 3 x H x W`` in, the same shape out, in the images' encoding (``mean``/``std``,
        ``input_range``).

        Runs one extra forward of the attached model (no grad, eval mode; training flags are
        restored afterwards). For pictures; nothing is captured or trained.
        """
        self._check_not_removed()
        model = self._model()
        if model is None or self.head is None:
            raise RuntimeError("reconstruct() needs the attached model and a built head "
                               "(call loss() once, or attach with input_shape=...).")
        check_images(images, "images")
        flags = _training_flags(model)
        head_mode = self.head.training
        try:
            model.eval()
            self.head.eval()
            with self.tap.probe() as box:
                model(images)
            return self.head(box["feature"], images.shape[-2:])
        finally:
            _restore_training_flags(model, flags)
            self.head.train(head_mode)

    def _check_not_removed(self) -> None:
        if self._removed:
            raise RuntimeError("this ReconAux was removed; attach a new one.")

    def sync_gradients(self) -> None:
        """Average the head's gradients over all ranks of the default process group.

        Called automatically before ``optimizer.step()`` when ``attach`` got the optimizer and
        ``sync_grads`` is on; a no-op outside ``torch.distributed`` or with one rank. Every rank
        must reach it (as with DDP's own reduction); a rank whose head got no gradient this step
        contributes zeros.
        """
        if (self.head is None or not torch.distributed.is_available()
                or not torch.distributed.is_initialized()
                or torch.distributed.get_world_size() < 2):
            return
        params = [p for p in self.head.parameters() if p.requires_grad]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
        offset = 0
        for p in params:
            g = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    def _check(self, reconstruction: Tensor, parts: dict, total: Tensor) -> None:
        """One host sync: the images' range (the perceptual loss's check), then the loss's
        finiteness."""
        losses = torch.stack([parts["l2"].detach(), parts["lpips"].detach(), total.detach()])
        read = torch.cat([parts["span"], losses]).tolist()
        span, values = read[:4], read[4:]
        try:
            self.perceptual.check_span(span)
        except NonFiniteLossError as exc:
            # the images come from the data, the reconstruction from training
            why = ("Check the data pipeline: the images given to aux.loss are not finite."
                   if not all(math.isfinite(v) for v in span[:2]) else _DIVERGED)
            raise NonFiniteLossError(f"recon_aux: at aux.loss call {self.calls} (optimizer step "
                                     f"{self.steps}): {exc} {why}") from exc
        if all(math.isfinite(v) for v in values):
            return
        if not bool(torch.isfinite(reconstruction).all()):
            component = "reconstruction"
        else:
            component = next(k for k, v in zip(("l2", "lpips", "total"), values, strict=True)
                             if not math.isfinite(v))
        raise NonFiniteLossError(
            f"recon_aux: non-finite {component} at aux.loss call {self.calls} (optimizer step "
            f"{self.steps}); l2, lpips, total = {values}. {_DIVERGED}"
        )

    # -- head ------------------------------------------------------------------------------------
    def _build_head(self, feature: Tensor | tuple[Tensor, ...], image_size: tuple) -> None:
        """Build the head for ``feature`` (one map, or a tuple for a multi-level tap)."""
        feats = list(feature) if isinstance(feature, tuple) else [feature]
        channels = [int(f.shape[1]) for f in feats]
        h, w = max(((int(f.shape[-2]), int(f.shape[-1])) for f in feats), key=lambda s: s[0] * s[1])
        self._build_head_from(channels if isinstance(feature, tuple) else channels[0], (h, w),
                              image_size, feats[0].device)

    def _build_head_from(self, channels: int | list[int], in_size: tuple, image_size: tuple,
                         device) -> None:
        cfg = self.config
        h, w = (int(v) for v in in_size)
        spec = dict(
            in_channels=channels, in_size=[h, w], out_size=[int(v) for v in image_size],
            width=cfg.head_width, min_width=cfg.head_min_width,
            max_width=cfg.head_max_width, norm=cfg.head_norm,
            upsample=cfg.head_upsample, out_scale=cfg.head_out_scale,
            output_range=list(cfg.input_range),
            mean=None if cfg.mean is None else list(cfg.mean),
            std=None if cfg.std is None else list(cfg.std),
        )
        # The head's init uses a fork of the global RNG: with and without recon_aux, a seeded
        # run draws the same data order, augmentations and dropout masks.
        with torch.random.fork_rng(devices=[]):
            self.head = ReconstructionHead(**spec).to(device)
        if self._compile is not None:
            self.head.compile(*self._compile[0], **self._compile[1])
        self._head_spec = spec
        if self._optimizer is not None:
            self._add_param_group(self._optimizer)

    def _add_param_group(self, optimizer: torch.optim.Optimizer) -> None:
        group: dict[str, Any] = {"params": list(self.head.parameters())}
        if self.config.lr is not None:
            group["lr"] = self.config.lr
        if self.config.weight_decay is not None:
            group["weight_decay"] = self.config.weight_decay
        scheduled = any("initial_lr" in g for g in optimizer.param_groups)
        optimizer.add_param_group(group)
        if scheduled:
            optimizer.param_groups[-1].setdefault("initial_lr", optimizer.param_groups[-1]["lr"])
            warnings.warn(
                "recon_aux: the head's parameter group joined the optimizer after an LR scheduler "
                "was created, so that scheduler keeps the head's learning rate constant. To have "
                "it scheduled, attach with input_shape=(3, H, W) before creating the scheduler.",
                UserWarning, stacklevel=4,
            )

    def _build_from_dry_forward(self, model: nn.Module, input_shape: tuple) -> None:
        """Build the head now from one forward on zeros that changes nothing in the model."""
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {input_shape}.")
        ref = next(iter(model.parameters()), None)
        device = ref.device if ref is not None else torch.device("cpu")
        flags = _training_flags(model)
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            model.eval()
            with torch.no_grad(), self.tap.probe() as box:
                model(torch.zeros((2, *input_shape), device=device))
        finally:
            _restore_training_flags(model, flags)
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        if "feature" not in box:
            raise RuntimeError(f"the dry forward on input_shape={input_shape} reached no tapped "
                               "layer; check the model and the layer name.")
        self._build_head(box["feature"], input_shape[1:])

    # -- checkpoints -----------------------------------------------------------------------------
    def get_extra_state(self) -> dict:
        state = {"version": 1, "head_spec": self._head_spec, "layer_name": self.layer_name,
                 "layouts": {n: v.to_list() for n, v in self.tap.layouts.items()}}
        if self.perceptual is not None:  # where LPIPS's crops and subsets are drawn from
            state["lpips_rng"] = self.perceptual.generator.get_state()
        return state

    def set_extra_state(self, state: dict) -> None:
        if state.get("lpips_rng") is not None and self.perceptual is not None:
            self.perceptual.generator.set_state(state["lpips_rng"])
        spec = state.get("head_spec")
        saved = state.get("layer_name")
        if saved is not None and self.layer_name is None:
            # layer=None not chosen yet: keep the checkpoint's layer (the rule may have changed)
            self.tap.adopt(saved.split("+"))
        if saved not in (None, self.layer_name) and self.layer_name is not None:
            raise ValueError(f"checkpoint was made with layer {saved!r}, this ReconAux taps "
                             f"{self.layer_name!r}; attach with layer={saved!r} (or "
                             "layer=None) to load it.")
        for name, value in (state.get("layouts") or {}).items():
            if name in self.tap.layer_names:
                self.tap.layouts.setdefault(name, Layout.from_list(value))
        if spec is None:
            return
        if "max_width" not in spec:  # written before head_max_width existed: the cap was 512
            spec = _legacy_head_spec(spec, self.config)
        if self.head is None:
            model = self._model()
            ref = next(iter(model.parameters()), None) if model is not None else None
            self._build_head_from(spec["in_channels"], tuple(spec["in_size"]),
                                  tuple(spec["out_size"]),
                                  ref.device if ref is not None else torch.device("cpu"))
        if spec != self._head_spec:
            ours = self._head_spec or {}
            differ = "; ".join(f"{k}: {spec.get(k)!r} in the checkpoint, {ours.get(k)!r} here"
                               for k in sorted(set(spec) | set(ours)) if spec.get(k) != ours.get(k))
            raise ValueError(f"the checkpoint's head differs from this ReconAux's ({differ}); "
                             "use the same config and encoder (a head saved before recon-aux 0.2 "
                             "was capped at 512 channels: attach with head_max_width=512 to load "
                             "it).")

    # -- lifetime --------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook (model, layer, optimizer) and drop pending captures.

        The head's parameter group stays in the optimizer (torch cannot remove groups).
        """
        self.tap.remove()
        for handle in (self._step_handle, self._sync_handle):
            if handle is not None:
                handle.remove()
        self._step_handle = self._sync_handle = None
        model = self._model()
        if model is not None and _ATTACHED.get(model) is not None:
            if _ATTACHED[model]() is self:
                del _ATTACHED[model]
        self._removed = True

    def __enter__(self) -> ReconAux:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return f"layer={self.layer_name!r}, weight={self.config.weight}"


def _training_flags(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _restore_training_flags(model: nn.Module, flags: dict[nn.Module, bool]) -> None:
    for m, flag in flags.items():
        m.training = flag


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    layer: str | Sequence[str] | None = None,
    config: ReconAuxConfig | Mapping | str | Path | None = None,
    input_shape: Sequence[int] | None = None,
    prefix_tokens: int | None = None,
    grid: Sequence[int] | None = None,
    layout: str | None = None,
    **overrides: Any,
) -> ReconAux:
    """Attach the L2 + LPIPS reconstruction objective to ``model`` (line 1 of 2).

    Args:
        model: The encoder (any ``nn.Module`` whose forward, or ``forward_features``, receives
            the images): a conv net, a Vision Transformer, a Swin, a timm model.
        optimizer: The loop's optimizer; the head's parameters join it as a new param group when
            the head is built. None when the optimizer is created later (then use
            ``aux.parameters()``, or let a LightningModule that holds ``aux`` collect them).
        layer: Module name to tap (``"layer4"``, ``"blocks.11"``); None picks the encoder's
            representation at the first forward: its last block (residual, inception, dense,
            ConvNeXt or transformer block, or the stage ending with it), else its last Conv2d,
            never a stem (rule and table: :mod:`recon_aux.layers`); a list of names
            (``["layer3", "layer4"]``, ``["blocks.3", "blocks.7", "blocks.11"]``) feeds a head
            that fuses those levels.
        config: A :class:`ReconAuxConfig`, a dict, or a YAML file path.
        input_shape: ``(C, H, W)``: build the head now from a dry forward (no state of the
            model changes), e.g. before an LR scheduler or ``configure_optimizers`` exists.
        prefix_tokens: For a tapped layer returning ``N x L x D`` tokens: how many leading tokens
            are not patches (class, distillation, register tokens). None infers it
            (:mod:`recon_aux.tokens`).
        grid: ``(h, w)`` of the patch grid, for non-square grids the inference cannot find.
        layout: ``"nchw"`` or ``"nhwc"`` for a 4-D output whose shape does not say which.
        **overrides: Config fields (``weight=0.5``, ``net="vgg"``, ``mean=..., std=...``).

    Returns:
        The :class:`ReconAux`; ``aux.loss(images)`` is line 2.

    Example:
        A method's own loss stands in as ``logsumexp``; images in [0, 1].

        >>> import torch, torchvision, recon_aux
        >>> encoder = torchvision.models.resnet18(num_classes=10)
        >>> optimizer = torch.optim.SGD(encoder.parameters(), lr=0.1)
        >>> aux = recon_aux.attach(encoder, optimizer)
        >>> for images in torch.rand(2, 4, 3, 64, 64):  # a loader's batches
        ...     loss = encoder(images).logsumexp(1).mean()  # the method's loss
        ...     loss = loss + aux.loss(images)
        ...     optimizer.zero_grad(); loss.backward(); optimizer.step()
        >>> aux.layer_name, aux.calls  # the tapped layer; one aux.loss per batch
        ('layer4.1.conv2', 2)
    """
    return ReconAux(model, optimizer, layer=layer, config=config, input_shape=input_shape,
                    prefix_tokens=prefix_tokens, grid=grid, layout=layout, **overrides)


def _check_feature_dtype(feature: Tensor | tuple[Tensor, ...], layer: str | None) -> None:
    """Raise unless the tapped maps are float32, or of autocast's lower precision inside it: the
    head and the loss run in float32, under autocast in its precision."""
    for f in feature if isinstance(feature, tuple) else (feature,):
        if f.dtype != torch.float32 and not torch.is_autocast_enabled(f.device.type):
            raise TypeError(
                f"the tapped layer {layer!r} gave a {f.dtype} map; the head and the loss run in "
                "float32. Keep the encoder in float32 (model.float()) and get bf16/fp16 with "
                "torch.autocast, which the objective follows.")


def _legacy_head_spec(spec: dict, cfg: ReconAuxConfig) -> dict:
    """A head spec saved before ``head_max_width`` (default width capped at 512): the current
    cap when it gives the same first width, else 512 (and the spec comparison will say so)."""
    channels = spec["in_channels"]
    widest = max(channels) if isinstance(channels, list | tuple) else channels
    floor = spec.get("min_width", 16)
    same = (spec.get("width") is not None
            or min(max(widest // 4, floor), 512) == min(max(widest // 4, floor),
                                                        cfg.head_max_width))
    return {**spec, "max_width": cfg.head_max_width if same else 512}

