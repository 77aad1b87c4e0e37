"""Frozen-feature extraction and pooling, shared by every evaluation protocol.

Every protocol in :mod:`adapters.evaluation` evaluates *frozen* features: the encoder runs once
over the train and the test batches in eval mode under ``torch.no_grad()``, the features of the
requested layer are (optionally) pooled per batch, kept on the CPU, and the probe is then trained
on these cached tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..progress import progress as progress_bar  # the functions' `progress` flag shadows the name
from ._common import resolve_device

PoolSpec = str | Callable[[Tensor], Tensor] | None
"""How to reduce a feature map per batch: a name accepted by :func:`pool_features`, a callable
``(B, ...) -> (B, D)``, or ``None`` (keep the raw layer output)."""

POOL_MODES = ("none", "flatten", "avg", "max", "deepcluster")


class Features(dict[str, Tensor]):
    """Features per layer name, plus the targets (and indices) they were extracted with.

    A plain ``dict[str, Tensor]`` (layer name -> CPU tensor of shape (N, ...)) with two extra
    attributes, so that features and labels always travel together:

    Attributes:
        targets: Int64 tensor of shape (N,), the class labels in extraction order.
        indices: Int64 tensor of shape (N,) with the dataset indices when the batches were
            ``(images, targets, indices)`` triples, else ``None``.
    """

    targets: Tensor
    indices: Tensor | None

    def __init__(self, data: dict[str, Tensor], targets: Tensor, indices: Tensor | None = None):
        super().__init__(data)
        self.targets = targets
        self.indices = indices


def pool_features(features: Tensor, mode: PoolSpec = "avg", *, target_dim: int = 9600) -> Tensor:
    """Reduce a batch of layer outputs to one row per sample.

    Args:
        features: Layer output of shape (B, C, H, W) (conv maps) or (B, D) (fc features).
        mode: One of

            - ``"avg"``: global average pooling, (B, C, H, W) -> (B, C). The default for kNN.
            - ``"max"``: global max pooling, (B, C, H, W) -> (B, C).
            - ``"deepcluster"``: average pooling of the conv map to the largest s x s grid whose
              flattened size C*s*s is at most ``target_dim`` (at least 1 x 1), then flatten.
              This generalises the per-layer ``AvgPool2d`` of DeepCluster's ``RegLog``
              (facebookresearch/deepcluster, eval_linear.py), which pools each AlexNet conv
              layer to about 9-10k dims (9216 or 9600), to any layer and input size. Maps that
              are already small enough (e.g. 256 x 4 x 4 on 32 x 32 inputs) are kept whole.
            - ``"flatten"``: (B, ...) -> (B, prod(...)), no pooling (AET's non-linear probe).
            - ``"none"`` or ``None``: unchanged.
            - a callable mapping (B, ...) to (B, D).

            2-D inputs (fc features) pass through every named mode unchanged.
        target_dim: Size budget of ``"deepcluster"`` pooling.

    Returns:
        Tensor of shape (B, D) (or the unchanged input for ``"none"``).

    Example:
        >>> x = torch.randn(8, 256, 13, 13)
        >>> pool_features(x, "avg").shape
        torch.Size([8, 256])
        >>> pool_features(x, "deepcluster").shape  # 256 * 6 * 6 = 9216 <= 9600
        torch.Size([8, 9216])
    """
    if mode is None or mode == "none":
        return features
    if callable(mode):
        return mode(features)
    if mode not in POOL_MODES:
        raise ValueError(f"unknown pool mode {mode!r}; use one of {POOL_MODES} or a callable.")
    if mode == "flatten" or features.ndim == 2:
        return features.flatten(1)
    if features.ndim != 4:
        raise ValueError(
            f"pool mode {mode!r} expects (B, C, H, W) or (B, D) features, got shape "
            f"{tuple(features.shape)}; pass pool='flatten' or a callable for other layouts."
        )
    if mode == "avg":
        return features.mean(dim=(2, 3))
    if mode == "max":
        return features.amax(dim=(2, 3))
    # "deepcluster"
    _, channels, height, width = features.shape
    side = 1
    while side < max(height, width) and channels * (side + 1) ** 2 <= target_dim:
        side += 1
    grid = (min(side, height), min(side, width))
    return F.adaptive_avg_pool2d(features, grid).flatten(1)


class _StopForward(Exception):
    """Raised by the capture hooks once every requested module has produced its output."""


def _split_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    if not isinstance(batch, list | tuple) or len(batch) not in (2, 3):
        raise TypeError(
            "each batch must be an (images, targets) or (images, targets, indices) tuple, got "
            f"{type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else "")
            + "; wrap your loader, e.g. ((x, y) for x, y, *_ in loader)."
        )
    images, targets = batch[0], batch[1]
    indices = batch[2] if len(batch) == 3 else None
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(
            "images must be a floating-point tensor (B, C, H, W), got "
            f"{getattr(images, 'dtype', type(images).__name__)}; convert uint8 images with "
            "images.float() / 255 (and the normalisation the encoder was trained with)."
        )
    targets = torch.as_tensor(targets)
    if indices is not None:
        indices = torch.as_tensor(indices)
    return images, targets, indices


def _route_layers(model: nn.Module, names: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split layer names into those served by ``forward_features`` and those needing hooks."""
    forward_features = getattr(model, "forward_features", None)
    probe_points = getattr(model, "probe_points", None)
    modules = dict(model.named_modules())
    via_forward_features, via_hooks = [], []
    for name in names:
        if callable(forward_features) and probe_points is not None and name in probe_points:
            via_forward_features.append(name)
        elif name and name in modules:
            via_hooks.append(name)
        elif callable(forward_features) and probe_points is None:
            via_forward_features.append(name)  # no declared probe points: trust the model
        else:
            module_names = [n for n in modules if n]
            shown = ", ".join(module_names[:25]) + (" ..." if len(module_names) > 25 else "")
            hint = f"probe_points: {list(probe_points)}; " if probe_points is not None else ""
            raise ValueError(
                f"unknown layer {name!r} for {type(model).__name__}; {hint}module names usable "
                f"via a forward hook: {shown or '(none)'}. Pass one of those names."
            )
    return via_forward_features, via_hooks


def extract_features(
    model: nn.Module,
    batches: Iterable[Any],
    layer: str | Sequence[str],
    device: str | torch.device | None = None,
    *,
    pool: PoolSpec = None,
    target_dim: int = 9600,
    progress: bool | None = None,
    total: int | None = None,
) -> Features:
    """Run a frozen encoder over ``batches`` and collect the outputs of one or more layers.

    The model is put in eval mode (BatchNorm uses its running statistics, dropout is off) and run
    under ``torch.no_grad()``; every module's previous ``training`` flag is restored afterwards,
    also when an error is raised. Two ways to name a layer:

    - a probe point of a recon-aux backbone: models exposing ``forward_features(x, layers) ->
      dict[str, Tensor]`` and ``probe_points`` are called through ``forward_features``;
    - the name of any submodule in ``model.named_modules()`` (e.g. ``"features.10"``, or ``"3"``
      in an ``nn.Sequential``): its output is captured with a forward hook, and the forward pass
      stops as soon as every requested module has run, so heads after it cost nothing.

    Args:
        model: The encoder; it must already live on ``device``.
        batches: Iterable of ``(images, targets)`` or ``(images, targets, indices)`` with float
            images of shape (B, C, H, W), e.g. a DataLoader without augmentation.
        layer: A layer name or a list of names.
        device: Where the forward pass runs; defaults to the device of the model's parameters.
        pool: Per-batch reduction applied before caching (see :func:`pool_features`); ``None``
            keeps the raw outputs (memory: N x C x H x W floats).
        target_dim: Budget for ``pool="deepcluster"``.
        progress: Show a tqdm bar (``None``: only on a terminal).
        total: Number of batches, for the bar when ``batches`` has no ``len``.

    Returns:
        :class:`Features`: ``{layer: CPU float tensor (N, ...)}`` with ``.targets`` (N,) and
        ``.indices`` (N,) or ``None``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        >>> data = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))]
        >>> feats = extract_features(net, data, "1", pool="avg")
        >>> feats["1"].shape, feats.targets.shape
        (torch.Size([4, 8]), torch.Size([4]))
    """
    names = [layer] if isinstance(layer, str) else list(layer)
    if not names:
        raise ValueError("layer must name at least one layer.")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate layer names in {names}.")
    device = resolve_device(device, model)
    elsewhere = sorted({str(t.device) for t in [*model.parameters(), *model.buffers()]
                        if t.device.type != device.type})
    if elsewhere:
        raise ValueError(f"extract_features: the model's weights are on {elsewhere}, the forward "
                         f"pass was asked to run on {device}; move the model first "
                         f"(model.to({str(device)!r})) or pass device=None.")
    via_forward_features, via_hooks = _route_layers(model, names)

    captured: dict[str, Tensor] = {}

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, list | tuple):
                output = output[0]
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"module {name!r} returned {type(output).__name__}, not a Tensor; hook a "
                    "submodule that returns a tensor."
                )
            captured[name] = output
            if len(captured) == len(via_hooks):
                raise _StopForward

        return hook

    modules = dict(model.named_modules())
    flags = {module: module.training for module in model.modules()}
    handles = [modules[name].register_forward_hook(make_hook(name)) for name in via_hooks]
    collected: dict[str, list[Tensor]] = {name: [] for name in names}
    all_targets: list[Tensor] = []
    all_indices: list[Tensor] = []
    saw_indices: set[bool] = set()
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)  # type: ignore[arg-type]
    try:
        model.eval()
        with torch.no_grad():
            for batch in progress_bar(batches, enabled=progress, total=total, desc="features"):
                images, targets, indices = _split_batch(batch)
                images = images.to(device, non_blocking=True)
                outputs: dict[str, Tensor] = {}
                if via_forward_features:
                    result = model.forward_features(images, via_forward_features)
                    missing = [n for n in via_forward_features if n not in result]
                    if missing:
                        raise KeyError(
                            f"{type(model).__name__}.forward_features did not return {missing}; "
                            f"it returned {list(result)}."
                        )
                    outputs.update({n: result[n] for n in via_forward_features})
                if via_hooks:
                    captured.clear()
                    try:
                        model(images)
                    except _StopForward:
                        pass
                    missing = [n for n in via_hooks if n not in captured]
                    if missing:
                        raise RuntimeError(
                            f"modules {missing} were not called by {type(model).__name__}."
                            "forward; hook a module that the forward pass uses."
                        )
                    outputs.update(captured)
                for name in names:
                    pooled = pool_features(outputs[name], pool, target_dim=target_dim)
                    if pooled.shape[0] != images.shape[0]:
                        raise ValueError(
                            f"layer {name!r} gave {pooled.shape[0]} rows for a batch of "
                            f"{images.shape[0]} images; pool must keep the batch dimension."
                        )
                    collected[name].append(pooled.detach().float().cpu())
                if targets.shape[:1] != images.shape[:1]:
                    raise ValueError(
                        f"batch has {images.shape[0]} images but targets of shape "
                        f"{tuple(targets.shape)}; yield one class index per image."
                    )
                all_targets.append(targets.reshape(-1).long().cpu())
                saw_indices.add(indices is not None)
                if indices is not None:
                    all_indices.append(indices.reshape(-1).long().cpu())
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
    if not all_targets:
        raise ValueError("batches was empty: no features were extracted.")
    if len(saw_indices) > 1:
        raise ValueError("some batches carried indices and others did not; be consistent.")
    return Features(
        {name: torch.cat(chunks) for name, chunks in collected.items()},
        targets=torch.cat(all_targets),
        indices=torch.cat(all_indices) if all_indices else None,
    )


def pool_name(pool: PoolSpec) -> str:
    """Printable name of a pool spec, for the ``"pool"`` entry of protocol results."""
    if pool is None:
        return "none"
    if callable(pool):
        return getattr(pool, "__name__", type(pool).__name__)
    return pool


def evaluate_layers(
    protocol: str,
    probe: Callable[..., dict[str, Any]],
    model: nn.Module,
    train_batches: Iterable[Any],
    test_batches: Iterable[Any],
    layer: str | Sequence[str],
    device: str | torch.device | None,
    pool: PoolSpec,
    progress: bool | None,
    **extract_kwargs: Any,
) -> dict[str, Any]:
    """Extract the train and test features of every layer once, then run ``probe`` per layer.

    ``probe(train_x, train_y, test_x, test_y, device)`` returns a result dict, to which
    ``"protocol"``, ``"feature"`` and ``"pool"`` are added. Returns that dict for one layer name,
    ``{layer: result}`` for a list. Shared by the ``*_eval`` functions of every protocol.
    """
    names = [layer] if isinstance(layer, str) else list(layer)
    device = resolve_device(device, model)
    kwargs = {"pool": pool, "progress": progress, **extract_kwargs}
    train = extract_features(model, train_batches, names, device, **kwargs)
    test = extract_features(model, test_batches, names, device, **kwargs)
    results = {}
    for name in names:
        result = probe(train[name], train.targets, test[name], test.targets, device)
        results[name] = {"protocol": protocol, "feature": name, **result, "pool": pool_name(pool)}
    return results[names[0]] if isinstance(layer, str) else results
