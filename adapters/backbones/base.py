"""Shared machinery of the backbones: probe points, feature extraction, shape arithmetic."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["Backbone", "count_parameters", "round_width"]


def round_width(channels: int, width: float) -> int:
    """Scales a channel count by ``width`` and rounds it to the nearest int (at least 1)."""
    return max(1, int(round(channels * width)))


class Backbone(nn.Module):
    """Base class of the recon-aux backbones: a fixed sequence of named stages.

    A subclass registers its stages as child modules and lists their names, in execution order,
    in ``_stage_names``; the stages whose outputs can be read are listed in ``probe_points``.
    ``forward`` runs every stage and returns the final representation of shape
    ``(N, out_dim)``; ``forward_features`` runs only as far as the deepest requested probe point.

    Attributes:
        probe_points: Names of the stages whose outputs ``forward_features`` can return.
        output_layer: Name of the last stage, whose output ``forward`` returns.
        out_dim: Size of the representation returned by ``forward``.
        input_size: The input height and width the model is built for (CIFAR: 32, ImageNet: 224).
        in_channels: Number of input channels (3: RGB).

    Example:
        >>> import torch
        >>> from adapters.backbones import AlexNetCIFAR
        >>> net = AlexNetCIFAR(width=0.25)
        >>> net.probe_points, net.output_layer, net.out_dim
        (('conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7'), 'fc7', 1024)
        >>> maps = net.forward_features(torch.rand(2, 3, 32, 32), ["conv5", "fc7"])
        >>> {name: tuple(m.shape) for name, m in maps.items()}
        {'conv5': (2, 64, 4, 4), 'fc7': (2, 1024)}
    """

    probe_points: tuple[str, ...] = ()
    _stage_names: tuple[str, ...] = ()
    in_channels: int = 3
    input_size: int = 0
    #: If True, inputs must be exactly ``input_size`` x ``input_size`` (models with an fc layer).
    _fixed_input_size: bool = True
    #: Smallest input side the convolutional trunk accepts (used when the size is not fixed).
    _min_input_size: int = 1
    out_dim: int = 0

    # ------------------------------------------------------------------ forward passes
    def forward(self, x: Tensor) -> Tensor:
        """Returns the final representation.

        Args:
            x: Images, shape ``(N, 3, H, W)``.

        Returns:
            Tensor of shape ``(N, out_dim)``.
        """
        self._check_input(x)
        for name in self._stage_names:
            x = getattr(self, name)(x)
        return x

    def forward_features(self, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        """Runs one forward pass and returns the activations at the requested probe points.

        The pass stops after the deepest requested layer, so later stages (and any hook on them)
        do not run. Conv activations have shape ``(N, C, h, w)``, fc activations ``(N, D)``;
        :meth:`feature_shape` gives the shapes without running the model.

        Args:
            x: Images, shape ``(N, 3, H, W)``.
            layers: Names from ``probe_points`` (a single name is also accepted).

        Returns:
            Dict from each requested name to its activation, in the order of ``layers``.
        """
        wanted = self._check_layers(layers)
        self._check_input(x)
        deepest = max(self._stage_names.index(name) for name in wanted)
        found: dict[str, Tensor] = {}
        for name in self._stage_names[: deepest + 1]:
            x = getattr(self, name)(x)
            if name in wanted:
                found[name] = x
        return {name: found[name] for name in wanted}

    # ------------------------------------------------------------------ shapes
    def feature_shape(self, name: str, input_size: int | None = None) -> tuple[int, ...]:
        """Shape of one sample's activation at probe point ``name`` (no forward pass is run).

        Args:
            name: A probe point, or ``"out"`` for the output of ``forward``.
            input_size: Input side length; defaults to ``input_size``.

        Returns:
            ``(C, h, w)`` for conv probe points, ``(D,)`` for fc probe points and ``"out"``.
        """
        if name != "out":
            self._check_layers([name])
        size = self.input_size if input_size is None else int(input_size)
        self._check_size(size, size)
        return self._stage_shape(self._stage_names[-1] if name == "out" else name, size)

    def _stage_shape(self, name: str, size: int) -> tuple[int, ...]:
        """Output shape (one sample) of stage ``name`` for a ``size`` x ``size`` input."""
        shape: tuple[int, ...] = (self.in_channels, size, size)
        for stage in self._stage_names[: self._stage_names.index(name) + 1]:
            shape = _out_shape(getattr(self, stage), shape)
        return shape

    def feature_dim(self, name: str, input_size: int | None = None) -> int:
        """Number of values in one sample's activation at ``name`` (``prod(feature_shape)``)."""
        return math.prod(self.feature_shape(name, input_size))

    @property
    def output_layer(self) -> str:
        """Name of the stage whose output ``forward`` returns (``"fc7"`` for the AlexNets,
        ``"pool"`` for NIN and the CIFAR ResNet-18): the layer that feeds a method's heads."""
        if not self._stage_names:  # pragma: no cover - every backbone here has stages
            raise RuntimeError(f"{type(self).__name__} lists no stages")
        return self._stage_names[-1]

    @property
    def last_conv(self) -> nn.Conv2d:
        """The ``nn.Conv2d`` that runs last in ``forward`` (its output feeds the reconstructor)."""
        last = None
        for name in self._stage_names:
            for module in getattr(self, name).modules():
                if isinstance(module, nn.Conv2d):
                    last = module
        if last is None:  # pragma: no cover - every backbone here has convs
            raise RuntimeError(f"{type(self).__name__} has no nn.Conv2d")
        return last

    # ------------------------------------------------------------------ checks
    def _check_layers(self, layers: Sequence[str] | str) -> list[str]:
        if isinstance(layers, str):
            layers = [layers]
        wanted = list(dict.fromkeys(layers))  # drop duplicates, keep order
        if not wanted:
            raise ValueError(
                f"layers is empty; ask for at least one of {', '.join(self.probe_points)}"
            )
        unknown = [name for name in wanted if name not in self.probe_points]
        if unknown:
            raise ValueError(
                f"{type(self).__name__} has no probe point(s) {', '.join(map(repr, unknown))}; "
                f"valid names: {', '.join(self.probe_points)}"
            )
        return wanted

    def _check_input(self, x: Tensor) -> None:
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            hint = " (add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else ""
            raise ValueError(
                f"{name} expects a 4-D batch of shape (N, {self.in_channels}, H, W), "
                f"got shape {tuple(x.shape)}{hint}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{name} expects {self.in_channels} input channels (RGB, N x C x H x W layout), "
                f"got shape {tuple(x.shape)}; convert grayscale with x.expand(-1, 3, -1, -1) "
                "and channels-last images with x.permute(0, 3, 1, 2)"
            )
        self._check_size(x.shape[2], x.shape[3])

    def _check_size(self, height: int, width: int) -> None:
        name = type(self).__name__
        if self._fixed_input_size:
            if (height, width) != (self.input_size, self.input_size):
                raise ValueError(
                    f"{name} expects {self.input_size}x{self.input_size} inputs, got "
                    f"{height}x{width}; resize or crop the images to {self.input_size}x"
                    f"{self.input_size}{self._size_hint()}"
                )
        elif min(height, width) < self._min_input_size:
            raise ValueError(
                f"{name} needs inputs of at least {self._min_input_size}x{self._min_input_size}, "
                f"got {height}x{width}; it is built for {self.input_size}x{self.input_size}"
            )

    def _size_hint(self) -> str:
        return ""


def _out_shape(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape (without the batch dim) of ``module`` for an input of ``shape``."""
    custom = getattr(module, "out_shape", None)
    if callable(custom):
        return custom(shape)
    if isinstance(module, nn.Sequential):
        for child in module:
            shape = _out_shape(child, shape)
        return shape
    if isinstance(module, nn.Conv2d):
        _, h, w = shape
        return (module.out_channels, *_conv_hw((h, w), module))
    if isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
        _, h, w = shape
        return (shape[0], *_conv_hw((h, w), module))
    if isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        _, h, w = shape
        out_h, out_w = _pair(module.output_size)
        return (shape[0], h if out_h is None else out_h, w if out_w is None else out_w)
    if isinstance(module, nn.Flatten):
        return (math.prod(shape),)
    if isinstance(module, nn.Linear):
        return (module.out_features,)
    if isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d | nn.ReLU | nn.Dropout | nn.Identity):
        return shape
    raise TypeError(f"no shape rule for {type(module).__name__}")  # pragma: no cover


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def _conv_hw(hw: tuple[int, int], module: nn.Module) -> tuple[int, int]:
    kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
    padding = _pair(module.padding)
    dilation = _pair(getattr(module, "dilation", 1))
    ceil = getattr(module, "ceil_mode", False)
    out = []
    for i in range(2):
        span = hw[i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1
        n = (math.ceil if ceil else math.floor)(span / stride[i]) + 1
        out.append(int(n))
    return out[0], out[1]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values in ``model`` (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
