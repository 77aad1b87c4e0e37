"""Feature maps from any tapped layer: conv maps, channels-last maps and transformer tokens.

The head decodes an ``N x C x h x w`` map. A tapped layer may return one of three layouts:

- ``"nchw"``: a conv feature map, used as it is;
- ``"nhwc"``: a channels-last map ``N x H x W x C`` (torchvision's and timm's Swin stages,
  torchvision's ConvNeXt inside its blocks), permuted to ``N x C x H x W``;
- ``"tokens"``: a token sequence ``N x L x D`` (ViT, DeiT, DINO blocks): the ``p`` prefix tokens
  (class, distillation, register tokens) are dropped and the other ``L - p`` tokens, in row-major
  patch order, are reshaped to ``N x D x h x w``.

How the layout is decided, once per tapped layer (the first time its output is seen), never by a
silent guess:

- A 3-D output is tokens. The prefix count ``p`` is ``prefix_tokens=`` when given, else
  ``L - h*w`` for ``grid=(h, w)`` when given, else ``L - h*w`` where ``h x w`` is the output size of
  the model's stem (the first ``nn.Conv2d`` of the forward: a ViT's patch embedding) when that
  leaves at most :data:`MAX_PREFIX` tokens, else the one ``p <= MAX_PREFIX`` for which ``L - p``
  tokens tile the image as a patch grid (``floor(H/s) x floor(W/s)`` for an integer patch size
  ``s``). No such ``p``, or several (tiny grids: 5 tokens on a 32 px image are 1 + 2x2 or
  4 + 1x1), is an error that asks for ``prefix_tokens=`` or ``grid=``. The count is then fixed for
  the layer; each call's grid is ``grid=`` if it has ``L - p`` cells, else the stem's grid if it
  has, else the patch grid of that call's images (so multi-crop views of other sizes work); tokens
  that form none of these are an error asking for ``grid=``, never reshaped into a guessed grid.
- A 4-D output is ``layout=`` when given. Otherwise the shape decides: the pair of dimensions
  that can be the image's spatial grid (each at most the image side, with strides ``H/h`` and
  ``W/w`` within a factor 1.5 of each other) is the spatial one: dims 2-3 give ``"nchw"``, dims
  1-2 ``"nhwc"``. When both pairs can (``N x 8 x 8 x 8`` on a square image) the tapped module
  decides if it is unambiguous (Conv2d inside and no Linear: ``"nchw"``; Linear or
  ``nn.LayerNorm`` and no Conv2d: ``"nhwc"``), and otherwise it is an error asking for
  ``layout=``. When neither pair fits, the
  map is taken as ``"nchw"``, the layout of conv layers.

A tuple output is accepted when it holds one tensor (or a tensor followed by ``None`` s, as
Hugging Face blocks return); anything else is refused with the element shapes and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["MAX_PREFIX", "Layout", "as_tensor", "check_options", "resolve_layout", "to_map"]

#: Most prefix tokens (class + distillation + register tokens) inferred without ``prefix_tokens=``.
MAX_PREFIX = 16

LAYOUTS = ("nchw", "nhwc")


@dataclass(frozen=True)
class Layout:
    """How one tapped layer's output becomes a map (checkpointed with the head).

    Attributes:
        kind: ``"nchw"``, ``"nhwc"`` (permuted to channels first) or ``"tokens"`` (``N x L x D``,
            reshaped onto the patch grid).
        prefix: Leading tokens dropped (class, distillation, register tokens; tokens only).
    """

    kind: str
    prefix: int = 0

    def to_list(self) -> list:
        """``[kind, prefix]``, as a checkpoint stores it."""
        return [self.kind, self.prefix]

    @classmethod
    def from_list(cls, value: Sequence) -> Layout:
        """The layout :meth:`to_list` stored."""
        return cls(str(value[0]), int(value[1]))


def check_options(prefix_tokens: Any, grid: Any, layout: Any
                  ) -> tuple[int | None, tuple[int, int] | None, str | None]:
    """Validate ``attach``'s ``prefix_tokens``, ``grid`` and ``layout`` arguments."""
    if prefix_tokens is not None and (isinstance(prefix_tokens, bool)
                                      or not isinstance(prefix_tokens, int) or prefix_tokens < 0):
        raise ValueError(f"prefix_tokens={prefix_tokens!r} must be an int >= 0 (the class, "
                         "distillation and register tokens before the patch tokens).")
    if grid is not None:
        if (not isinstance(grid, Sequence) or len(grid) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                           for v in grid)):
            raise ValueError(f"grid={grid!r} must be (h, w): the patch grid's rows and columns.")
        grid = (int(grid[0]), int(grid[1]))
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} must be one of {LAYOUTS} (for 4-D outputs: "
                         "channels first, or channels last as in Swin stages).")
    return prefix_tokens, grid, layout


def _shape(x) -> str:
    return str(tuple(x.shape)) if torch.is_tensor(x) else type(x).__name__


def as_tensor(output: Any, name: str) -> Tensor:
    """The tensor in a tapped layer's output (itself, or the one tensor of a tuple)."""
    if torch.is_tensor(output):
        return output
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]) \
            and all(o is None for o in output[1:]):
        return output[0]
    if isinstance(output, (tuple, list)):
        tensors = [o for o in output if torch.is_tensor(o)]
        if len(tensors) == 1:
            return tensors[0]
        raise ValueError(
            f"the tapped layer {name!r} returned a {type(output).__name__} of "
            f"[{', '.join(_shape(o) for o in output)}]; recon_aux needs one tensor. Tap a "
            "submodule that returns the features alone (e.g. the block's last sublayer, or the "
            "block itself when its sublayer returns extra outputs).")
    raise ValueError(f"the tapped layer {name!r} returned {type(output).__name__}; recon_aux "
                     "needs a tensor (N x C x h x w, N x H x W x C or N x L x D tokens). Tap the "
                     "submodule that computes the features (attach(..., layer=NAME)), not one "
                     "that packs them with other outputs.")


def _fits(a: int, b: int, image: Sequence[int]) -> bool:
    H, W = image
    if not (1 <= a <= H and 1 <= b <= W):
        return False
    sa, sb = H / a, W / b
    return max(sa, sb) / min(sa, sb) < 1.5


def _patch_grids(n: int, image: Sequence[int]) -> list[tuple[int, int]]:
    """Grids ``floor(H/s) x floor(W/s)`` (integer patch size ``s``) with ``n`` cells."""
    H, W = image
    found = []
    for s in range(1, max(H, W) + 1):
        g = (H // s, W // s)
        if g[0] * g[1] == n and g not in found:
            found.append(g)
    return found


def resolve_layout(x: Tensor, name: str, image: Sequence[int], *,
                   stem: Sequence[int] | None = None, prefix_tokens: int | None = None,
                   grid: Sequence[int] | None = None, layout: str | None = None,
                   has_conv: bool = False, has_linear: bool = False) -> Layout:
    """Decide how ``x`` (the layer ``name``'s output for images of size ``image``) becomes a map.

    ``stem`` is the spatial size of the stem conv's output in the same forward, if one ran;
    ``has_conv`` and ``has_linear`` describe the tapped module (they only break shape ties).
    """
    if x.dim() == 3:
        return Layout("tokens", _prefix(int(x.shape[1]), name, image, stem, prefix_tokens, grid))
    if x.dim() != 4:
        raise ValueError(
            f"the tapped layer {name!r} returned {tuple(x.shape)}; recon_aux needs an "
            "N x C x h x w map, an N x H x W x C map (layout='nhwc') or N x L x D tokens. Tap a "
            "conv layer or a block (layer='NAME').")
    if layout is not None:
        return Layout(layout)
    first, last = _fits(x.shape[2], x.shape[3], image), _fits(x.shape[1], x.shape[2], image)
    if first and last:
        if has_conv and not has_linear:
            return Layout("nchw")
        if has_linear and not has_conv:
            return Layout("nhwc")
        raise ValueError(
            f"the tapped layer {name!r} returned {tuple(x.shape)} for {tuple(image)} images: "
            "that is channels first (N x C x h x w) or channels last (N x h x w x C) alike. Say "
            "which: attach(..., layout='nchw') or layout='nhwc'.")
    return Layout("nhwc" if last and not first else "nchw")


def _prefix(L: int, name: str, image, stem, prefix_tokens, grid) -> int:
    fix = ("Pass prefix_tokens=P (the class, distillation and register tokens before the patch "
           "tokens) or grid=(h, w) to attach().")
    if prefix_tokens is not None:
        if prefix_tokens >= L:
            raise ValueError(f"prefix_tokens={prefix_tokens} but the tapped layer {name!r} "
                             f"returned {L} tokens; pass the number of tokens before the patch "
                             "tokens (fewer than all of them), or prefix_tokens=None to infer "
                             "it.")
        return prefix_tokens
    if grid is not None:
        p = L - grid[0] * grid[1]
        if p < 0:
            raise ValueError(f"grid={tuple(grid)} has {grid[0] * grid[1]} cells but the tapped "
                             f"layer {name!r} returned {L} tokens; pass the patch grid (h, w) "
                             "of that layer's tokens, or grid=None to infer it.")
        return p
    if stem is not None and 0 <= L - stem[0] * stem[1] <= MAX_PREFIX:
        return L - stem[0] * stem[1]
    found = [p for p in range(0, min(MAX_PREFIX, L - 1) + 1) if _patch_grids(L - p, image)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise ValueError(
            f"the tapped layer {name!r} returned {L} tokens for {tuple(image)} images, and no "
            f"patch grid of the image plus at most {MAX_PREFIX} prefix tokens makes {L}. {fix}")
    options = ", ".join(f"{p} prefix + {'x'.join(map(str, _patch_grids(L - p, image)[0]))}"
                        for p in found)
    raise ValueError(f"the tapped layer {name!r} returned {L} tokens for {tuple(image)} images, "
                     f"which is ambiguous ({options}). {fix}")


def _grid(n: int, name: str, image, stem, grid) -> tuple[int, int]:
    # grid= is the grid of the images it was given for; views of another size (multi-crop)
    # have another token count and take their own patch grid
    for g in (grid, stem):
        if g is not None and g[0] * g[1] == n:
            return int(g[0]), int(g[1])
    found = _patch_grids(n, image)
    if found:
        return found[0]
    # no guess: any factor pair of n would reshape the tokens into a grid they may not have
    given = f" (grid={tuple(grid)} has {grid[0] * grid[1]} cells)" if grid is not None else ""
    raise ValueError(f"the tapped layer {name!r} has {n} patch tokens{given}, which form no "
                     f"patch grid of {tuple(image)} images (floor(H/s) x floor(W/s) for a patch "
                     "size s); pass its grid=(h, w) to attach().")


#: The fix for a tapped layer whose output changed form between forwards.
_SAME_FORM = ("the head needs the same form every forward: tap a layer whose output keeps its "
              "form (layer=...).")


def to_map(x: Tensor, layout: Layout, name: str, image: Sequence[int], *,
           stem: Sequence[int] | None = None, grid: Sequence[int] | None = None) -> Tensor:
    """``x`` as an ``N x C x h x w`` map, by ``layout`` (see :func:`resolve_layout`)."""
    if layout.kind == "tokens":
        if x.dim() != 3:
            raise ValueError(f"the tapped layer {name!r} returned tokens before and now "
                             f"{tuple(x.shape)}; {_SAME_FORM}")
        n = int(x.shape[1]) - layout.prefix
        if n < 1:
            raise ValueError(f"the tapped layer {name!r} returned {x.shape[1]} tokens, no more "
                             f"than its {layout.prefix} prefix tokens: no patch token is left "
                             "to decode; pass a smaller prefix_tokens, or tap a layer that "
                             "returns patch tokens (layer=...).")
        h, w = _grid(n, name, image, stem, grid)
        tokens = x[:, layout.prefix:, :]
        return tokens.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
    if x.dim() != 4:
        raise ValueError(f"the tapped layer {name!r} returned a 4-D map before and now "
                         f"{tuple(x.shape)}; {_SAME_FORM}")
    return x.permute(0, 3, 1, 2) if layout.kind == "nhwc" else x
