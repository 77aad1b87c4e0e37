"""BatchNorm statistics recalibration before a frozen-feature evaluation.

A network evaluated in eval mode normalises with its BatchNorm *running* statistics. Those of an
untrained network are the defaults (mean 0, var 1), so its features come out rescaled and nearly
parallel, and every probe reads a worse network than the weights define; those of a trained
network were accumulated over augmented batches while the weights moved. Recalibrating them on
clean training images, with no weight change, gives every row of a comparison (random init
included) the statistics of the images it is evaluated on. This follows the "precise BN" of
Wu & Johnson, *Rethinking "Batch" in BatchNorm* (2021), code ``facebookresearch/fvcore``
``fvcore/nn/precise_bn.py`` (``update_bn_stats``), and ``torch.optim.swa_utils.update_bn``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..progress import progress as progress_bar  # the functions' `progress` flag shadows the name
from ._common import resolve_device

__all__ = ["recalibrate_batchnorm", "recalibrated_batchnorm"]

_BN = nn.modules.batchnorm._BatchNorm


def _images(batch: Any) -> Tensor:
    images = batch[0] if isinstance(batch, list | tuple) else batch
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(
            "recalibration batches must be float images (B, C, H, W) or (images, targets[, "
            f"indices]) tuples, got {getattr(images, 'dtype', type(images).__name__)}; pass the "
            "un-augmented evaluation loader."
        )
    return images


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_images: int,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> dict[str, int]:
    """Re-estimate every BatchNorm layer's running statistics from ``batches``, in place.

    Each BatchNorm layer of ``model`` is reset and put in train mode while every other module
    stays in eval mode (dropout off), and the model runs forward under ``torch.no_grad()`` over
    the first ``max_images`` images of ``batches``. Weights never change. The running mean is the
    exact mean over all images (batch ``b`` of ``n_b`` images enters with momentum
    ``n_b / seen``, so a smaller last batch weighs what it holds); the running variance is the
    image-weighted mean of the per-batch (unbiased) variances, as in ``update_bn_stats``. The
    training flags and momenta are restored afterwards, also on error.

    Args:
        model: The network (on ``device``).
        batches: Un-augmented ``images`` or ``(images, targets[, indices])`` batches; shuffle
            them (seeded) when the data set is ordered by class.
        max_images: Images to use (> 0); the last batch is cut to reach exactly this many.
        device: Where the forward runs (default: the model's).
        progress: tqdm bar (``None``: only on a terminal).

    Returns:
        ``{"bn_layers": number of BatchNorm layers, "images": images used}``.

    Raises:
        ValueError: ``max_images`` is not a positive int, or a BatchNorm layer tracks no running
            statistics (nothing to recalibrate: its eval mode uses batch statistics).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> x = torch.randn(64, 3, 8, 8) * 5 + 2
        >>> recalibrate_batchnorm(net, [x], max_images=64)
        {'bn_layers': 1, 'images': 64}
        >>> conv, bn = net
        >>> torch.allclose(bn.running_mean, conv(x).mean((0, 2, 3)), atol=1e-5)
        True
    """
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max_images must be a positive int, got {max_images!r}.")
    layers = [m for m in model.modules() if isinstance(m, _BN)]
    if not layers:
        return {"bn_layers": 0, "images": 0}
    untracked = [name for name, m in model.named_modules()
                 if isinstance(m, _BN) and not m.track_running_stats]
    if untracked:
        raise ValueError(
            f"BatchNorm layer(s) {untracked} do not track running statistics, so there is "
            "nothing to recalibrate; turn recalibration off for this model."
        )
    device = resolve_device(device, model)
    flags = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    seen = 0
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.train()
        for batch in progress_bar(batches, enabled=progress, desc="BN recalibration"):
            images = _images(batch)[: max_images - seen]
            if images.shape[0] < 2:
                break  # a batch of one has no variance (BatchNorm refuses it)
            seen += images.shape[0]
            for m in layers:
                m.momentum = images.shape[0] / seen
            model(images.to(device, non_blocking=True))
            if seen >= max_images:
                break
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, flag in flags.items():
            m.training = flag
    if seen == 0:
        raise ValueError("recalibration got no batch of at least 2 images; pass the training "
                         "images.")
    return {"bn_layers": len(layers), "images": seen}


@contextlib.contextmanager
def recalibrated_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    max_images: int,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> Iterator[dict[str, int]]:
    """:func:`recalibrate_batchnorm` inside the block; the previous statistics come back after.

    So evaluating a network in training (the engine's end-of-run evaluation) leaves its state,
    and a checkpoint written later, as they were.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> with recalibrated_batchnorm(net, [torch.randn(8, 3, 8, 8)], max_images=8) as info:
        ...     info["images"]
        8
        >>> float(net[1].running_var.mean())  # the defaults are back
        1.0
    """
    saved = [(buf, buf.clone()) for m in model.modules() if isinstance(m, _BN)
             for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
             if buf is not None]
    try:
        yield recalibrate_batchnorm(model, batches, max_images=max_images, device=device,
                                    progress=progress)
    finally:
        for buf, value in saved:
            buf.copy_(value)
