"""AET-project (Auto-Encoding Transformations, projective) as a method of the shared engine.

Paper: Zhang, Qi, Wang and Luo, "AET vs. AED: Unsupervised Representation Learning by
Auto-Encoding Transformations rather than Data", CVPR 2019 (arXiv:1901.04596), section 3 and
4.1: "AET-project + FC" on CIFAR-10, the setup Hizioglu (2020, Table 3, "Perceptual Image
Similarity for Unsupervised Representation Learning") adds the reconstruction generator to.

Code followed (read, not copied): ``maple-research-lab/AET`` at commit
``042be3361490ae1e839c881a4211ba5fe5125407`` (these files last changed in ``96ef428``),
``cifar/projective/``:

- ``dataset.py`` (``CIFAR10.__getitem__``, ``find_coeffs``): the transformation sampler and
  the warp, in :mod:`adapters.ops.projective` (see there for the exact distribution: corner scale
  ``U(0.8, 1.2)`` about ``(W/2 + 0.5, H/2 + 0.5)``, corner order rotated by a random multiple of
  90 degrees, independent integer corner shifts in ``[-4, 4]``, bilinear, fill 128);
- ``main.py``: ``transform_pre = RandomCrop(32, padding=4) + RandomHorizontalFlip`` *before* the
  transformation (both images of a pair share it; here the engine's ``crop_flip`` view),
  target ``Normalize((0,0,16,0,0,16,0,0), (1,1,20,1,1,20,0.015,0.015))`` of the 8 coefficients,
  ``nn.MSELoss()`` (mean over the batch and the 8 outputs, no further scaling), SGD lr 0.1,
  momentum 0.9, Nesterov, weight decay 5e-4, batch 512, 1500 epochs, lr x0.2 at epochs 240,
  480, 640, 800, then a linear decay from epoch 1000 (``benchmarks/configs/paper/aet.yaml``);
- ``NetworkInNetwork.py`` (``Regressor``): two separate forwards of the NIN (4 blocks) on the
  original and the transformed image, each to its default output (the global average pool of
  the last block, 192-d), concatenated (original first) and fed to one ``nn.Linear(384, 8)``
  whose bias is zeroed (weight: PyTorch's default init) -- the "+ FC" head.

One step: ``x = views[0]`` (crop + flip) -> ``xt = warp(x, H)`` with ``H`` drawn per sample ->
``f1 = backbone(x)``, ``f2 = backbone(xt)`` -> ``pred = regressor([f1, f2])`` ->
``loss = mse(pred, normalize(H))``.

Reconstruction (the engine adds ``aux.loss(t)`` for ``t`` in ``recon_inputs``):

- both forwards are full ``backbone(...)`` calls, as in AET, so the conv that runs last in
  ``forward`` runs each time and the engine's capture hook (which fires on ``backbone(...)``
  calls only, not on ``forward_features``) files both. For ``NIN(4)``
  ``recon_aux.attach(NIN(), input_shape=(3, 32, 32))`` taps ``conv4.2.0``: block 4's final 1x1
  conv, 192 x 8 x 8 for a 32 x 32 input, which is the paper's "output of the last convolutional
  layer" (section 3.2). No ``recon.layer`` is needed.
- by default only the original ``x`` is reconstructed (``recon_inputs=[x]``): the paper's
  generator "reconstructs the input images" and AET's input image is ``x``; ``xt`` is ``x``
  resampled, so a second reconstruction would double the generator and LPIPS cost for little
  new information, and it would ask the generator to paint the fill borders, whose geometry *is*
  the regression target. ``recon_transformed=True`` reconstructs ``xt`` as well (its fill,
  ``128 / 255``, lies inside the [0, 1] range the objective checks).

Deviations, and why:

- no per-channel ``Normalize(mean, std)`` of the inputs: the engine feeds ``[0, 1]`` images to
  training, evaluation and the reconstruction objective alike (a normalised training input would
  disagree with the un-normalised features the engine's kNN / probes extract). BatchNorm after
  the first conv absorbs a per-channel affine map of the input except at the zero-padded border
  and in the effective learning rate of conv1.
- the fill colour is ``128 / 255`` in [0, 1] units. The original passes ``fillcolor`` only on
  Pillow 5.x (``PILLOW_VERSION[0] == '5'``) and fills black on other versions; 128 is its intent.
- transformations are drawn from ``torch.Generator``s seeded by
  ``(seed, epoch, step, rank, call)`` instead of Python's global ``random`` in data-loader
  workers, so a resumed run draws exactly the transformations of an uninterrupted one; the warp
  is a batched ``grid_sample`` that matches Pillow to uint8 rounding (``tests/test_aet.py``).
- the optimizer, batch and lr schedule are set in the run config (``train.nesterov: true``,
  lr 0.1, momentum 0.9, wd 5e-4): ``benchmarks/configs/paper/aet.yaml`` has the original's batch
  512, 1500 epochs and its x0.2 steps at 240/480/640/800; the engine's ``step`` schedule cannot
  express the final linear decay from epoch 1000 (lr x0.0016 -> x0.0001), held flat there. The
  smoke config uses batch 128 and 640 images for a CPU minute.

Attributes:
    regressor: ``nn.Linear(2 * backbone.out_dim, 8)``, AET's ``Regressor.fc``.
    shift, scale, fill, interpolation, recon_transformed: The hyperparameters in force.
    last: Detached ``pred`` and ``target`` ``(N, 8)`` and ``transformed`` (``xt``) of the latest
        step, for diagnostics and pictures.

Example:
    >>> from adapters.backbones import NIN
    >>> method = AET(NIN(), num_samples=1000)
    >>> method.before_step(ctx)  # doctest: +SKIP  (the engine's EngineContext)
    >>> out = method.training_step([torch.rand(8, 3, 32, 32)], torch.arange(8))  # doctest: +SKIP
    >>> out.loss.shape, len(out.recon_inputs)  # doctest: +SKIP
    (torch.Size([]), 1)

Shapes: ``views[0]`` ``(N, 3, H, W)`` in [0, 1] -> features ``(N, D)`` twice -> ``(N, 8)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.projective import INTERPOLATIONS, normalize_coeffs, sample_projective, warp_perspective
from .base import EngineContext, Method, StepOutput

__all__ = ["AET", "METHOD"]

#: Mixed into every transformation seed, so AET's draws differ from other seeded streams.
_SEED_TAG = 0xAE7
#: Version of the seeding scheme, checkpointed: a resume under another scheme would draw
#: different transformations than the interrupted run.
_RNG_SCHEME = 1


class AET(Method):
    """AET-project: regress the projective transformation between an image and its warp.

    Args:
        backbone: The encoder; ``backbone(x)`` must return ``(N, backbone.out_dim)`` features
            (``NIN``: the global-average-pooled last block, as AET).
        num_samples: Size of the training set (unused by AET; part of the engine's interface).
        shift: Largest integer corner shift in pixels (AET: 4).
        scale: ``[low, high]`` of the corner scale factor (AET: ``[0.8, 1.2]``).
        fillcolor: Fill of the warped image outside the source, 0-255 (AET: 128), an int or
            one per channel.
        interpolation: ``"bilinear"`` (AET) or ``"nearest"``.
        recon_transformed: Also reconstruct the warped image (default False: ``x`` only).
        feature_layer: Regress from the global average of this layer's (N, C, h, w) output
            (a module name of the backbone, e.g. ``"conv5"``) instead of ``backbone(x)``. For
            NIN, ``backbone(x)`` *is* the pooled last block, AET's own input to its regressor;
            AlexNet-CIFAR's ``backbone(x)`` is fc7 after two dropout layers whose masks differ
            between the image's and the warp's forwards, so ``feature_layer="conv5"`` is the
            pooled-conv analogue of AET's NIN regressor.

    See the module docstring for the original code followed and the deviations.
    """

    name = "aet"
    views = ("crop_flip",)

    def __init__(
        self,
        backbone: nn.Module,
        num_samples: int,
        shift: int = 4,
        scale: Sequence[float] = (0.8, 1.2),
        fillcolor: int | Sequence[int] = 128,
        interpolation: str = "bilinear",
        recon_transformed: bool = False,
        feature_layer: str | None = None,
    ) -> None:
        super().__init__(
            backbone, num_samples, shift=shift, scale=scale, fillcolor=fillcolor,
            interpolation=interpolation, recon_transformed=recon_transformed,
            feature_layer=feature_layer,
        )
        if isinstance(shift, bool) or not isinstance(shift, int) or shift < 0:
            raise ValueError(f"method.shift must be an int >= 0 (pixels; AET uses 4), "
                             f"got {shift!r}")
        if (not isinstance(scale, Sequence) or isinstance(scale, str) or len(scale) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in scale)
                or not 0 < scale[0] <= scale[1]):
            raise ValueError(f"method.scale must be [low, high] with 0 < low <= high "
                             f"(AET: [0.8, 1.2]), got {scale!r}")
        fills = [fillcolor] if isinstance(fillcolor, int | float) else fillcolor
        if (isinstance(fillcolor, bool) or not isinstance(fills, Sequence)
                or len(fills) not in (1, 3)
                or not all(isinstance(v, int | float) and not isinstance(v, bool)
                           and 0 <= v <= 255 for v in fills)):
            raise ValueError(f"method.fillcolor must be a value in [0, 255] or three of them "
                             f"(AET: 128), got {fillcolor!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"method.interpolation must be one of {INTERPOLATIONS} "
                             f"(AET: 'bilinear'), got {interpolation!r}")
        if not isinstance(recon_transformed, bool):
            raise ValueError(f"method.recon_transformed must be true or false, "
                             f"got {recon_transformed!r}")
        self.feature_layer = feature_layer
        self._features: Tensor | None = None
        if feature_layer is not None:
            modules = dict(backbone.named_modules())
            if feature_layer not in modules or not feature_layer:
                raise ValueError(f"method.feature_layer={feature_layer!r} is not a module of "
                                 f"{type(backbone).__name__}; e.g. "
                                 f"{[n for n in modules if n and '.' not in n][:8]}")
            shape = backbone.feature_shape(feature_layer)
            out_dim = shape[0]
            modules[feature_layer].register_forward_hook(self._keep_features)
        else:
            out_dim = getattr(backbone, "out_dim", None)
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(
                f"AET needs backbone.out_dim, the size of backbone(x)'s (N, D) output, to size "
                f"its regressor; {type(backbone).__name__} has out_dim={out_dim!r}. Use a "
                "adapters.backbones backbone (e.g. nin) or set out_dim on yours."
            )
        self.shift = shift
        self.scale = (float(scale[0]), float(scale[1]))
        self.fill = tuple(float(v) / 255.0 for v in fills)
        self.interpolation = interpolation
        self.recon_transformed = recon_transformed
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
        """Keys this step's transformations to ``(seed, epoch, step, rank)``."""
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
                             f"{sorted(mine)}; it was not written by this AET version.")
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


METHOD = AET
