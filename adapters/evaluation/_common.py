"""Small helpers shared by the evaluation protocols (not public API)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def resolve_device(
    device: str | torch.device | None, model: nn.Module | None = None
) -> torch.device:
    """``device`` if given, else the device of ``model``'s first parameter/buffer, else CPU."""
    if device is not None:
        return torch.device(device)
    if model is not None:
        for tensor in [*model.parameters(), *model.buffers()]:
            return tensor.device
    return torch.device("cpu")


def check_features_targets(features: Tensor, targets: Tensor, name: str) -> None:
    """Raise a ValueError naming the problem if features/targets do not pair up."""
    if not isinstance(features, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(
            f"{name}: features and targets must be torch.Tensor, got "
            f"{type(features).__name__} and {type(targets).__name__}; convert with "
            "torch.as_tensor(...)."
        )
    if targets.ndim != 1:
        raise ValueError(
            f"{name}: targets must have shape (N,), got {tuple(targets.shape)}; pass class "
            "indices, not one-hot vectors (use targets.argmax(1))."
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(
            f"{name}: targets must be integer class indices, got dtype {targets.dtype}; "
            "convert with targets.long()."
        )
    if features.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{name}: feature/label count mismatch: {features.shape[0]} feature rows but "
            f"{targets.shape[0]} targets; extract both from the same batches "
            "(extract_features returns them together)."
        )
    if features.shape[0] == 0:
        raise ValueError(f"{name}: no samples; the batch iterable was empty.")
    if targets.min() < 0:
        raise ValueError(f"{name}: targets contain negative class indices ({int(targets.min())}).")


def infer_num_classes(num_classes: int | None, *target_sets: Tensor) -> int:
    """``num_classes`` if given (validated against the targets), else max target + 1."""
    largest = max(int(t.max()) for t in target_sets)
    if num_classes is None:
        return largest + 1
    if largest >= num_classes:
        raise ValueError(
            f"a target equals {largest} but num_classes={num_classes}; pass "
            f"num_classes >= {largest + 1} or leave it as None to infer it."
        )
    return int(num_classes)


def topk_correct(
    logits_or_ranking: Tensor, targets: Tensor, ranked: bool = False
) -> tuple[int, int]:
    """Number of top-1 and top-5 hits (top-min(5, C) when there are fewer than 5 classes).

    ``ranked=True`` means the input already holds class indices sorted by score (as returned by
    lightly's ``knn_predict``); otherwise it holds scores of shape (B, C).
    """
    if ranked:
        ranking = logits_or_ranking
    else:
        kmax = min(5, logits_or_ranking.shape[1])
        ranking = logits_or_ranking.topk(kmax, dim=1).indices
    hits = ranking[:, :5] == targets.view(-1, 1)
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())
