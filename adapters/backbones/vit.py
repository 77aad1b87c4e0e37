"""A Vision Transformer small enough for a CPU: 4x4 patches on 32x32 images (the vit-cpu bench)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import EncoderBlock

from .base import Backbone

__all__ = ["PatchEmbedding", "ViTCIFAR"]


class PatchEmbedding(nn.Module):
    """Patches -> tokens: a strided conv, a learned class token in front, position embeddings.

    The embedding of Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, as
    torchvision's ``VisionTransformer`` (``conv_proj``, ``class_token``,
    ``encoder.pos_embedding``; init: class token 0, positions N(0, 0.02)).

    Shapes: ``(N, 3, H, W) -> (N, 1 + (H / patch) * (W / patch), dim)``.

    Args:
        image_size: Side of the square input images.
        patch_size: Side of a patch (the conv's kernel and stride).
        dim: Token width.

    Attributes:
        grid: Patches per side (``image_size // patch_size``).
        proj: The patch conv, ``Conv2d(3, dim, patch_size, stride=patch_size)``.
        class_token: ``(1, 1, dim)``, put in front of the patch tokens.
        pos_embedding: ``(1, 1 + grid ** 2, dim)``, added to every token.
    """

    def __init__(self, image_size: int, patch_size: int, dim: int) -> None:
        super().__init__()
        self.grid = image_size // patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, 1 + self.grid ** 2, dim).normal_(std=0.02))
        fan_in = 3 * patch_size ** 2  # torchvision's conv_proj init
        nn.init.trunc_normal_(self.proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        cls = self.class_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embedding


class _ClassToken(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


class ViTCIFAR(Backbone):
    """ViT for 32x32 images: 4x4 patches (an 8x8 grid and a class token), pre-norm blocks.

    The blocks are torchvision's ``EncoderBlock`` (Dosovitskiy et al., ICLR 2021; the
    ``VisionTransformer`` of torchvision), without dropout. The defaults (width 96, 4 blocks, 3
    heads, MLP 384; 0.46 M parameters, ~32 M multiply-adds per image) cost about as much as the
    CIFAR ResNet-18 at width 0.25 of simclr-cpu, so the vit-cpu matrix fits a 2-core CPU.

    Probe points: ``block1`` .. ``blockN`` (tokens, ``(N, 65, dim)``), ``norm`` (the final
    LayerNorm's tokens) and ``pool`` (the class token after the norm, ``(N, dim)``: the
    representation ``forward`` returns). ``recon_aux.attach(..., layer=None)`` taps ``norm``,
    read as a 96 x 8 x 8 map (the class token dropped).

    Attributes:
        dim, depth, heads, mlp_dim, patch_size: The architecture.
        out_dim: ``dim``.

    Example:
        >>> model = ViTCIFAR()
        >>> model(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 96])
    """

    input_size = 32

    def __init__(self, dim: int = 96, depth: int = 4, heads: int = 3, mlp_dim: int = 384,
                 patch_size: int = 4) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("depth", depth), ("heads", heads),
                            ("mlp_dim", mlp_dim), ("patch_size", patch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim % heads:
            raise ValueError(f"dim={dim} must be a multiple of heads={heads}")
        if self.input_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide the input size "
                             f"{self.input_size}")
        self.dim, self.depth, self.heads = dim, depth, heads
        self.mlp_dim, self.patch_size = mlp_dim, patch_size
        self.embed = PatchEmbedding(self.input_size, patch_size, dim)
        blocks = [f"block{i}" for i in range(1, depth + 1)]
        for name in blocks:
            setattr(self, name, EncoderBlock(heads, dim, mlp_dim, dropout=0.0,
                                             attention_dropout=0.0))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pool = _ClassToken()
        self._stage_names = ("embed", *blocks, "norm", "pool")
        self.probe_points = (*blocks, "norm", "pool")
        self.out_dim = dim

    def _stage_shape(self, name: str, size: int) -> tuple[int, ...]:
        tokens = 1 + (size // self.patch_size) ** 2
        return (self.dim,) if name == "pool" else (tokens, self.dim)

    @property
    def last_conv(self) -> nn.Conv2d:
        """The patch embedding's conv (the only one): not what recon_aux taps, see the class
        docstring."""
        return self.embed.proj

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, depth={self.depth}, heads={self.heads}, "
                f"mlp_dim={self.mlp_dim}, patch_size={self.patch_size}")
