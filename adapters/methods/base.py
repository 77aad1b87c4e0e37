"""What a self-supervised method plugs into the shared training engine (``adapters/engine.py``).

A method file (``deepcluster.py``, ``sela.py``, ``aet.py``, ...) holds only what is specific to
its method: its hyperparameters (a :class:`MethodConfig`), its pseudo-label or target step, its
heads, its loss; ``adapters/methods/__init__.py`` registers it by name. The engine owns
everything else (data, epochs, optimizer, LR schedule, seeds, checkpoints, logging, evaluation,
distributed plumbing) and the two lines of ``recon_aux``:

.. code-block:: python

    aux = recon_aux.attach(backbone, optimizer, config=cfg.recon.config)  # engine, once
    out = method.training_step(views, indices)                        # method
    loss = out.loss + sum(aux.loss(x) for x in out.recon_inputs)      # engine, each step

A batch's path through one step: ``BatchLoader`` yields ``views`` (one float tensor per augmented
view, in [0, 1]) -> ``method.training_step`` runs ``backbone(x)`` for the views it needs (the
forward hook captures conv5) and returns its loss and the tensors it fed the backbone ->
``aux.loss(x)`` reconstructs each of those from its captured feature map.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..schema import Section

__all__ = ["Method", "MethodConfig", "StepOutput", "EngineContext", "out_dim_of"]


@dataclass(frozen=True)
class MethodConfig(Section):
    """A method's hyperparameters: the keys of a run config's ``method:`` section besides
    ``name``. Each method subclasses it with its fields (this base has none); unknown keys,
    wrong types and values out of range are errors that name the key (see
    :mod:`adapters.schema`)."""

    label: ClassVar[str] = "method"
    noun: ClassVar[str] = "hyperparameter"


def out_dim_of(backbone: nn.Module, method: str) -> int:
    """``backbone.out_dim``, the size of ``backbone(x)``'s ``(N, D)`` output that a method's
    heads are sized with; a ValueError that says so when the backbone has none."""
    out_dim = getattr(backbone, "out_dim", None)
    if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
        raise ValueError(
            f"{method} needs backbone.out_dim, the size of backbone(x)'s (N, D) output, to size "
            f"its heads; {type(backbone).__name__} has out_dim={out_dim!r}. Use an "
            "adapters.backbones backbone (e.g. alexnet_cifar, nin) or set out_dim on yours.")
    return out_dim


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

    Subclasses set ``name`` (their registry key), ``views`` (augmentation presets of the views
    the loader yields, e.g. ``("crop_flip",)``) and ``Config`` (their :class:`MethodConfig`),
    and implement :meth:`training_step`; the hooks default to no-ops.

    Args:
        backbone: The encoder (shared with the engine, not a submodule of the method).
        num_samples: Size of the training set.
        config: The hyperparameters: a ``Config`` instance, a mapping of its keys, or None.
        **overrides: Hyperparameters that replace those of ``config``, e.g. ``k=10``.

    Attributes:
        config: The validated hyperparameters (a ``Config`` instance).

    Example:
        A toy method; a real one goes in ``adapters/methods/<name>.py`` and into ``METHODS``.

        >>> import torch
        >>> from adapters.backbones import AlexNetCIFAR
        >>> class Rotation(Method):  # predict which of 4 rotations an image went through
        ...     name = "rotation"
        ...     def __init__(self, backbone, num_samples, config=None, **overrides):
        ...         super().__init__(backbone, num_samples, config, **overrides)
        ...         self.head = torch.nn.Linear(backbone.out_dim, 4)
        ...     def training_step(self, views, indices):
        ...         k = indices % 4  # a fixed rotation per image, for the example
        ...         x = torch.stack([im.rot90(int(r), (1, 2)) for im, r in zip(views[0], k)])
        ...         loss = torch.nn.functional.cross_entropy(self.head(self.backbone(x)), k)
        ...         return StepOutput(loss, recon_inputs=[x])  # +recon reconstructs x
        >>> method = Rotation(AlexNetCIFAR(width=0.25), num_samples=100)
        >>> out = method.training_step([torch.rand(8, 3, 32, 32)], torch.arange(8))
        >>> out.loss.shape, out.recon_inputs[0].shape
        (torch.Size([]), torch.Size([8, 3, 32, 32]))
    """

    name: ClassVar[str] = "method"
    views: tuple[str, ...] = ("crop_flip",)
    Config: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, backbone: nn.Module, num_samples: int,
                 config: MethodConfig | Mapping[str, Any] | None = None,
                 **overrides: Any) -> None:
        super().__init__()
        self.config = self.Config.from_any(config, where=f"method {self.name!r}", **overrides)
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
