"""What a self-supervised method plugs into the shared training engine (``adapters/engine.py``).

A method file (``deepcluster.py``, ``sela.py``, ``aet.py``) holds only what is specific to its
method: its pseudo-label or target step, its heads, its loss. The engine owns everything else
(data, epochs, optimizer, LR schedule, seeds, checkpoints, logging, evaluation, distributed
plumbing) and the two lines of ``recon_aux``:

.. code-block:: python

    aux = recon_aux.attach(backbone, optimizer, config=cfg["recon"])  # engine, once
    out = method.training_step(views, indices)                        # method
    loss = out.loss + sum(aux.loss(x) for x in out.recon_inputs)      # engine, each step

A batch's path through one step: ``BatchLoader`` yields ``views`` (one float tensor per augmented
view, in [0, 1]) -> ``method.training_step`` runs ``backbone(x)`` for the views it needs (the
forward hook captures conv5) and returns its loss and the tensors it fed the backbone ->
``aux.loss(x)`` reconstructs each of those from its captured feature map.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["Method", "StepOutput", "EngineContext"]


@dataclass
class StepOutput:
    """What :meth:`Method.training_step` returns.

    Attributes:
        loss: Scalar loss of the method (float32).
        recon_inputs: The exact tensors the step passed to ``backbone(...)`` whose features
            the auxiliary generator should reconstruct (empty: no reconstruction this step).
        logs: Scalars to log (floats or 0-d tensors), e.g. ``{"ce": ...}``.
    """

    loss: Tensor
    recon_inputs: list[Tensor] = field(default_factory=list)
    logs: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineContext:
    """What the engine lends a method at its hooks.

    Attributes:
        backbone: The encoder (the bare module, not the DDP wrapper).
        device: Where training runs.
        epoch, step: Current epoch (0-based) and global optimizer step.
        epochs, steps_per_epoch: Schedule length.
        batch_size: Samples per optimizer step over all ranks (0 in hand-made contexts).
        num_samples: Size of the training set (global, all ranks); positions 0..num_samples-1.
        targets: True labels of the training set (``num_samples``), for diagnostics such as
            NMI only; never for training.
        seed: The run's base seed.
        rank, world_size: Distributed position (0, 1 when not distributed).
        extract: ``extract(layer, augmented=False) -> (features, indices)``: features of every
            training image under no_grad, gathered from all ranks (identical on every rank),
            rows ordered by ``indices`` (positions in the training set); un-augmented in eval
            mode, or (``augmented=True``) through the first training view in train mode.
        broadcast: ``broadcast(tensor) -> tensor``: rank 0's value on every rank (identity when
            not distributed). Use it for anything random that all ranks must agree on.
        optimizer: The engine's optimizer (to reset a re-initialised head's state).
        log: ``log(dict)``: record scalars for this epoch's log line.
    """

    backbone: nn.Module
    device: torch.device
    epoch: int
    step: int
    epochs: int
    steps_per_epoch: int
    num_samples: int
    targets: Tensor
    seed: int
    rank: int
    world_size: int
    extract: Callable[..., tuple[Tensor, Tensor]]
    broadcast: Callable[[Tensor], Tensor]
    optimizer: torch.optim.Optimizer
    log: Callable[[dict], None]
    batch_size: int = 0


class Method(nn.Module, ABC):
    """Base class of a method: its heads are submodules; its pseudo-labels are buffers.

    Everything registered on the method (parameters, buffers, and what :meth:`extra_state`
    returns) is checkpointed by the engine and restored on resume. Parameters are optimised by the
    engine's optimizer together with the backbone.

    Subclasses set ``name`` and ``views`` (augmentation presets of the views the loader yields,
    e.g. ``("crop_flip",)``) and implement :meth:`training_step`; the hooks default to no-ops.
    """

    name: str = "method"
    views: tuple[str, ...] = ("crop_flip",)

    def __init__(self, backbone: nn.Module, num_samples: int, **hparams: Any) -> None:
        super().__init__()
        self.hparams = hparams
        self.num_samples = num_samples
        object.__setattr__(self, "backbone", backbone)  # shared, not a submodule of the method

    # -- hooks called by the engine ----------------------------------------------------------------
    def on_train_start(self, ctx: EngineContext) -> None:
        """Once, before the first epoch (after a resume too)."""

    def on_epoch_start(self, ctx: EngineContext) -> None:
        """Before each epoch's batches (DeepCluster clusters and reassigns labels here)."""

    def before_step(self, ctx: EngineContext) -> None:
        """Before each optimizer step (SeLa spaces its label updates over steps)."""

    def epoch_indices(self, ctx: EngineContext) -> np.ndarray | None:
        """Training-set positions to iterate this epoch (None: all, shuffled by the loader)."""
        return None

    @abstractmethod
    def training_step(self, views: list[Tensor], indices: Tensor) -> StepOutput:
        """One step's loss. ``views``: float ``N x 3 x H x W`` in [0, 1], one per entry of
        ``self.views``; ``indices``: ``N`` positions of the samples in the training set."""

    def extra_state(self) -> dict[str, Any]:
        """Plain data (ints, floats, lists, tensors) to checkpoint beyond parameters/buffers."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    def modules_for_eval(self) -> Iterable[nn.Module]:
        """Modules to put in eval mode during evaluation besides the backbone."""
        return [self]
