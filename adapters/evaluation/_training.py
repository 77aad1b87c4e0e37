"""Mini-batch training of a probe head on cached feature tensors (not public API)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..progress import progress as progress_bar  # the functions' `progress` flag shadows the name
from ._common import topk_correct


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed the CPU RNG inside the block without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def step_lr(lr: float, epoch: int, milestones: Sequence[int], gamma: float) -> float:
    """Learning rate after multiplying by ``gamma`` at each milestone epoch already reached."""
    return lr * gamma ** sum(epoch >= m for m in milestones)


def inverse_sqrt_lr(lr: float, iteration: int, weight_decay: float) -> float:
    """DeepCluster's ``learning_rate_decay``: lr / sqrt(1 + lr * weight_decay * iteration)."""
    return lr / math.sqrt(1.0 + lr * weight_decay * iteration)


def scaled_milestones(epochs: int, milestones: Sequence[int] | None, fractions: Sequence[float]):
    """Explicit milestones if given, else ``fractions`` of ``epochs`` (rounded)."""
    if milestones is not None:
        return [int(m) for m in milestones]
    return [max(1, round(f * epochs)) for f in fractions]


@torch.no_grad()
def evaluate(
    head: nn.Module, features: Tensor, targets: Tensor, device: torch.device, batch_size: int = 1024
) -> tuple[float, float, float]:
    """(top1 %, top5 %, mean cross-entropy) of ``head`` on cached features, in eval mode."""
    head.eval()
    hits1 = hits5 = 0
    loss_sum = 0.0
    for start in range(0, features.shape[0], batch_size):
        x = features[start : start + batch_size].to(device)
        y = targets[start : start + batch_size].to(device)
        logits = head(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        c1, c5 = topk_correct(logits, y)
        hits1 += c1
        hits5 += c5
    n = features.shape[0]
    return 100.0 * hits1 / n, 100.0 * hits5 / n, loss_sum / n


@dataclasses.dataclass(frozen=True)
class Plateau:
    """Train "until the training loss has levelled off": lower the lr on a plateau, then stop.

    After each epoch the epoch's mean training loss is compared with the best so far; an epoch
    that does not improve on it by more than ``tol`` (in nats) counts towards ``patience``.
    When ``patience`` such epochs follow each other, the lr is multiplied by ``factor``
    (``torch.optim.lr_scheduler.ReduceLROnPlateau``'s rule); after ``drops`` reductions the next
    plateau ends training, and the fit reports ``levelled_off=True``. Reaching ``epochs`` first
    reports ``levelled_off=False``. (Exported as ``adapters.evaluation.Plateau``.)

    Attributes:
        patience: Epochs in a row without improvement that make a plateau.
        tol: Improvement (nats of mean training loss) that counts as one.
        factor: The lr's multiplier at each plateau before the last.
        drops: lr reductions before the plateau that stops training.

    Example:
        >>> from adapters.evaluation import Plateau
        >>> Plateau(patience=5)  # linear_probe(..., lr_schedule="plateau", plateau=...)
        Plateau(patience=5, tol=0.001, factor=0.1, drops=2)
    """

    patience: int = 3
    tol: float = 1e-3
    factor: float = 0.1
    drops: int = 2

    def __post_init__(self) -> None:
        if self.patience < 1 or self.drops < 0 or not 0 < self.factor < 1 or not self.tol >= 0:
            raise ValueError(f"bad plateau rule {self}: need patience >= 1, drops >= 0, "
                             "0 < factor < 1, tol >= 0.")


@dataclasses.dataclass
class PlateauState:
    """Where one probe's training stands under a :class:`Plateau` rule: the best epoch loss so
    far, the epochs waited since, the lr reductions made and the lr's factor (``scale``)."""

    rule: Plateau
    best: float = math.inf
    waited: int = 0
    drops: int = 0
    scale: float = 1.0

    def end_epoch(self, loss: float) -> bool:
        """Record an epoch's mean training loss; True when training is over (levelled off)."""
        if loss < self.best - self.rule.tol:
            self.best, self.waited = loss, 0
        else:
            self.waited += 1
        if self.waited >= self.rule.patience:
            if self.drops == self.rule.drops:
                return True
            self.drops, self.waited = self.drops + 1, 0
            self.scale *= self.rule.factor
        return False


def resident(features: Tensor, device: torch.device, share: float = 0.5) -> Tensor:
    """``features`` moved to a CUDA ``device`` once when they take at most ``share`` of its free
    memory, so that mini-batches are gathered there; else returned as they are, and every
    mini-batch is gathered on the host and copied over on its own (the only way on other
    devices). The values are the same either way."""
    if device.type != "cuda" or features.device == device:
        return features
    free, _ = torch.cuda.mem_get_info(device)
    if features.element_size() * features.numel() > share * free:
        return features
    return features.to(device)


def fit(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_features: Tensor,
    train_targets: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr_at: Callable[[int, int], float],
    seed: int,
    device: torch.device,
    progress: bool | None,
    desc: str,
    plateau: Plateau | None = None,
) -> dict[str, Any]:
    """Train ``head`` with cross-entropy on shuffled mini-batches of the cached features.

    ``lr_at(epoch, iteration)`` gives the learning rate of every step (iteration counts steps
    from 0 over all epochs), times the reductions of ``plateau`` when given (which may also end
    training before ``epochs``). Batches of a single sample are skipped (BatchNorm cannot train
    on them). Returns the mean loss and accuracy (%) of the last epoch, the epochs run, the
    per-epoch losses, and whether the loss levelled off (``None`` without ``plateau``). On a
    GPU the features move there once when they fit (:func:`resident`).
    """
    generator = torch.Generator().manual_seed(seed)
    n = train_features.shape[0]
    train_features = resident(train_features, device)
    train_targets = train_targets.to(train_features.device)
    iteration = 0
    loss_sum, correct, seen = 0.0, 0, 0
    curve: list[float] = []
    state = PlateauState(plateau) if plateau is not None else None
    levelled = None
    for epoch in progress_bar(range(epochs), enabled=progress, total=epochs, desc=desc):
        head.train()
        # The epoch's sums stay on the device until its end: a float() or int() per step would
        # wait for the GPU at every step. float64 sums of float32 losses times batch sizes are
        # the same numbers as Python's float arithmetic gave.
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        hits = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        order = torch.randperm(n, generator=generator).to(train_features.device)
        for start in range(0, n, batch_size):
            index = order[start : start + batch_size]
            if index.numel() < 2:
                continue
            lr = lr_at(epoch, iteration) * (state.scale if state is not None else 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x = train_features[index].to(device, non_blocking=True)
            y = train_targets[index].to(device, non_blocking=True)
            logits = head(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            iteration += 1
            loss_total += loss.detach().double() * index.numel()
            hits += (logits.detach().argmax(1) == y).sum()
            seen += index.numel()
        loss_sum, correct = float(loss_total), int(hits)
        if seen and not math.isfinite(loss_sum):
            raise FloatingPointError(
                f"{desc}: training loss became {loss_sum} in epoch {epoch + 1}; lower lr or "
                "check the features for huge values."
            )
        curve.append(loss_sum / max(seen, 1))
        if state is None:
            continue
        levelled = state.end_epoch(curve[-1])
        if levelled:
            break
    return {
        "train_loss": curve[-1] if curve else math.nan,
        "train_top1": 100.0 * correct / max(seen, 1),
        "epochs_run": len(curve),
        "levelled_off": levelled,
        "lr_drops": state.drops if state is not None else None,
        "loss_curve": [round(v, 5) for v in curve],
    }


def fit_and_report(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    settings: dict,
    *,
    reference: str,
    return_classifier: bool,
    **fit_kwargs,
) -> dict:
    """Train a probe on cached features, test it, and return ``settings`` plus the sizes, the
    fit's record and the accuracies: the result dict shared by the linear and non-linear probes."""
    fitted = fit(module, optimizer, train_x, train_y, **fit_kwargs)
    top1, top5, test_loss = evaluate(module, test_x, test_y, fit_kwargs["device"])
    result = {
        **settings,
        "feature_dim": int(train_x.shape[1]),
        "num_train": int(train_x.shape[0]),
        "num_test": int(test_x.shape[0]),
        "augmentation": "none (cached features)",
        **fitted,
        "top1": top1,
        "top5": top5,
        "test_loss": test_loss,
        "reference": reference,
    }
    if return_classifier:
        result["classifier"] = module.cpu()
    return result
