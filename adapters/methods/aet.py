"""AET-project (Zhang et al., CVPR 2019): regress the projective warp between an image and its
warped copy.

Follows ``maple-research-lab/AET`` ``cifar/projective/``; the provenance (paper, repository,
commit, what is followed) is in ``docs/methods/aet.md``, and each deviation is a comment at the
code it concerns.

"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.projective import INTERPOLATIONS, normalize_coeffs, sample_projective, warp_perspective
from ..schema import SchemaError, at_least, one_of
from .base import EngineContext, Method, MethodConfig, StepOutput, out_dim_of

__all__ = ["AET", "AETConfig"]

#: Mixed into every transformation seed, so AET's draws differ from other seeded streams.
_SEED_TAG = 0xAE7
#: Version of the seeding scheme, checkpointed: a resume under another scheme would draw
#: different transformations than the interrupted run.
_RNG_SCHEME = 1


@dataclass(frozen=True)
class AETConfig(MethodConfig):
    """AET-project's hyperparameters (defaults: ``cifar/projective/dataset.py``).

    Attributes:
        shift: Largest integer corner shift in pixels (AET: 4).
        scale: ``[low, high]`` of the corner scale factor, ``0 < low <= high`` (AET:
            ``[0.8, 1.2]``).
        fillcolor: Fill of the warped image outside the source, 0-255 (AET: 128), one value or
            one per channel.
        interpolation: ``"bilinear"`` (AET) or ``"nearest"``.
        recon_transformed: Also reconstruct the warped image (default False: ``x`` only; the
            warp's fill borders are the regression target, see ``docs/methods/aet.md``).
        feature_layer: Regress from the global average of this layer's (N, C, h, w) output (a
            module name of the backbone, e.g. ``"conv5"``) instead of ``backbone(x)``. For NIN,
            ``backbone(x)`` *is* the pooled last block, AET's own input to its regressor;
            AlexNet-CIFAR's ``backbone(x)`` is fc7 after two dropout layers whose masks differ
            between the image's and the warp's forwards, so ``feature_layer="conv5"`` is the
            pooled-conv analogue of AET's NIN regressor.
    """

    shift: int = field(default=4, metadata=at_least(0))
    scale: tuple[float, float] = (0.8, 1.2)
    fillcolor: float | tuple[float, ...] = 128
    interpolation: str = field(default="bilinear", metadata=one_of(*INTERPOLATIONS))
    recon_transformed: bool = False
    feature_layer: str | None = None

    def check(self) -> None:
        if not 0 < self.scale[0] <= self.scale[1]:
            raise SchemaError(f"method.scale must be [low, high] with 0 < low <= high "
                              f"(AET: [0.8, 1.2]), got {list(self.scale)!r}")
        fills = self.fills
        if len(fills) not in (1, 3) or not all(0 <= v <= 255 for v in fills):
            raise SchemaError(f"method.fillcolor must be a value in [0, 255] or three of them "
                              f"(AET: 128), got {self.fillcolor!r}")

    @property
    def fills(self) -> tuple[float, ...]:
        """``fillcolor`` as a tuple (one value or one per channel)."""
        return self.fillcolor if isinstance(self.fillcolor, tuple) else (self.fillcolor,)


class AET(Method):
    """AET-project: regress the projective transformation between an image and its warp.

    Paper: Zhang, Qi, Wang, Luo, "AET vs. AED: Unsupervised Representation Learning by
    Auto-Encoding Transformations rather than Data", CVPR 2019. Code followed:
    ``maple-research-lab/AET`` ``cifar/projective/`` (``dataset.py``, ``main.py``,
    ``NetworkInNetwork.py``; ``docs/methods/aet.md``).

    Shapes: ``views[0]`` ``(N, 3, H, W)`` in [0, 1] and its warp -> features ``(N, D)`` each ->
    ``(N, 8)`` predicted warp coefficients, regressed onto the drawn ones.

    Args:
        backbone: The encoder; ``backbone(x)`` must return ``(N, backbone.out_dim)`` features
            (``NIN``: the global-average-pooled last block, as AET).
        num_samples: Size of the training set (unused by AET; part of the engine's interface).
        config: The hyperparameters (:class:`AETConfig`), or a mapping of its keys.
        **overrides: Hyperparameters that replace those of ``config``.

    Attributes:
        regressor: ``nn.Linear(2 * backbone.out_dim, 8)``, AET's ``Regressor.fc``.
        shift, scale, fill, interpolation, recon_transformed: The hyperparameters in force
            (``fill`` in [0, 1] units).
        last: Detached ``pred`` and ``target`` ``(N, 8)`` and ``transformed`` (``xt``) of the
            latest step, for diagnostics and pictures.
        feature_layer: The backbone layer whose global average feeds the regressor (``None``:
            ``backbone(x)``), as configured.

    Example:
        >>> from adapters.backbones import NIN
        >>> method = AET(NIN(), num_samples=1000)
        >>> method.regressor  # AET's Regressor.fc: the pooled last block of both images -> 8
        Linear(in_features=384, out_features=8, bias=True)
    """

    name: ClassVar[str] = "aet"
    views = ("crop_flip",)  # main.py's transform_pre, shared by the image and its warp
    Config: ClassVar[type[MethodConfig]] = AETConfig
    config: AETConfig

    def __init__(self, backbone: nn.Module, num_samples: int,
                 config: AETConfig | dict[str, Any] | None = None, **overrides: Any) -> None:
        super().__init__(backbone, num_samples, config, **overrides)
        c = self.config
        self.feature_layer = c.feature_layer
        self._features: Tensor | None = None
        if c.feature_layer is not None:
            modules = dict(backbone.named_modules())
            if c.feature_layer not in modules or not c.feature_layer:
                raise SchemaError(f"method.feature_layer={c.feature_layer!r} is not a module of "
                                  f"{type(backbone).__name__}; e.g. "
                                  f"{[n for n in modules if n and '.' not in n][:8]}")
            out_dim = backbone.feature_shape(c.feature_layer)[0]
            modules[c.feature_layer].register_forward_hook(self._keep_features)
        else:
            out_dim = out_dim_of(backbone, "AET")
        self.shift = c.shift
        self.scale = c.scale
        # Deviation: the fill is 128 / 255 on every Pillow version; the original passes its
        # fillcolor only on Pillow 5.x and fills black elsewhere. It lies inside the [0, 1]
        # range the reconstruction objective checks.
        self.fill = tuple(float(v) / 255.0 for v in c.fills)
        self.interpolation = c.interpolation
        self.recon_transformed = c.recon_transformed
        self.regressor = nn.Linear(2 * out_dim, 8)  # AET's Regressor.fc (indim=384 for NIN)
        nn.init.zeros_(self.regressor.bias)
        self._rng_key: tuple[int, int, int, int] | None = None
        self._calls = 0
        self.last: dict[str, Tensor] = {}

    def _keep_features(self, _module: nn.Module, _inputs: Any, output: Tensor) -> None:
        self._features = output

    def _forward(self, x: Tensor) -> Tensor:
        """The (N, D) features the regressor reads (see ``feature_layer``)."""
        out = self.backbone(x)
        if self.feature_layer is None:
            return out
        feats, self._features = self._features, None
        return feats.mean(dim=(2, 3))

    # -- randomness ------------------------------------------------------------------------------
    def before_step(self, ctx: EngineContext) -> None:
        """Keys this step's transformations to ``(seed, epoch, step, rank)``.

        Deviation: the original draws from Python's global ``random`` in data-loader workers;
        keyed generators make a resumed run draw exactly the transformations of an
        uninterrupted one.
        """
        self._rng_key = (int(ctx.seed), int(ctx.epoch), int(ctx.step), int(ctx.rank))
        self._calls = 0

    def _generator(self) -> torch.Generator:
        if self._rng_key is None:
            raise RuntimeError(
                "AET.training_step draws its transformations from a generator keyed by the "
                "engine's (seed, epoch, step, rank); call method.before_step(ctx) before each "
                "step (the engine does)."
            )
        entropy = [_SEED_TAG, *self._rng_key, self._calls]
        state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
        self._calls += 1
        return torch.Generator().manual_seed(int(state >> np.uint64(1)))

    # -- the step --------------------------------------------------------------------------------
    def transform(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draws one transformation per image and warps ``x``.

        Returns:
            ``(xt, target)``: the warped batch (like ``x``) and the normalised coefficients
            ``(N, 8)`` float32 on ``x``'s device.
        """
        n, _, h, w = x.shape
        sample = sample_projective(n, h, w, generator, shift=self.shift, scale=self.scale)
        with torch.no_grad():
            xt = warp_perspective(x.detach(), sample.coeffs, self.fill, self.interpolation)
        target = normalize_coeffs(sample.coeffs).to(device=x.device, dtype=torch.float32)
        return xt, target

    def training_step(self, views: list[Tensor], indices: Tensor) -> StepOutput:
        """AET's loss on ``views[0]`` and its random projective warp (two backbone forwards)."""
        if len(views) < 1:
            raise ValueError("AET needs one view (the crop_flip batch); got none")
        x = views[0]
        if x.dim() != 4:
            raise ValueError(f"AET expects views[0] of shape (N, 3, H, W), got {tuple(x.shape)}")
        # Deviation: no per-channel Normalize(mean, std) of the inputs: the engine feeds [0, 1]
        # images to training, evaluation and the objective alike; the BatchNorm after conv1
        # absorbs a per-channel affine map except at the padded border.
        xt, target = self.transform(x, self._generator())
        f1 = self._forward(x)
        f2 = self._forward(xt)
        expected = (x.shape[0], self.regressor.in_features // 2)
        if f1.dim() != 2 or tuple(f1.shape) != expected:
            raise ValueError(
                f"backbone(x) returned shape {tuple(f1.shape)}; AET's regressor expects "
                f"{expected} (N, out_dim), the pooled features AET regresses from."
            )
        pred = self.regressor(torch.cat([f1, f2], dim=1))
        loss = F.mse_loss(pred.float(), target)
        self.last = {"pred": pred.detach(), "target": target, "transformed": xt}
        recon = [x, xt] if self.recon_transformed else [x]
        return StepOutput(loss=loss, recon_inputs=recon, logs={"aet_mse": loss.detach()})

    # -- checkpoints -----------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """The seeding scheme and the sampler's settings (the RNG itself is stateless: every
        step's generator is rebuilt from the engine's ``(seed, epoch, step, rank)``)."""
        return {
            "rng_scheme": _RNG_SCHEME,
            "shift": self.shift,
            "scale": list(self.scale),
            "fill": list(self.fill),
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Checks that a checkpoint was made with the same seeding scheme and sampler."""
        mine = self.extra_state()
        if set(state) != set(mine):
            raise ValueError(f"AET checkpoint state has keys {sorted(state)}, expected "
                             f"{sorted(mine)}; it was not written by this AET version: resume "
                             "with the code version that wrote it, or start the run again.")
        if state["rng_scheme"] != _RNG_SCHEME:
            raise ValueError(
                f"the checkpoint draws AET transformations with seeding scheme "
                f"{state['rng_scheme']}, this code with {_RNG_SCHEME}; resume with the code "
                "version that wrote it."
            )
        diff = [k for k in ("shift", "scale", "fill")
                if not np.allclose(np.asarray(state[k], dtype=float),
                                   np.asarray(mine[k], dtype=float))]
        if diff:
            raise ValueError(
                "the checkpoint's AET sampler differs from this run's: "
                + ", ".join(f"{k}={state[k]} (now {mine[k]})" for k in diff)
                + "; resume with the same method settings."
            )

