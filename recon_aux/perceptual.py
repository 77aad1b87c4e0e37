"""L2 + LPIPS: the reconstruction loss of the paper (section 3.2, Figure 2)."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MIN_SIZE, ReconAuxConfig
from .weights import CONV_INDICES, resolve_backbone_weights

__all__ = ["PerceptualLoss", "RangeError", "NonFiniteLossError", "build_lpips", "check_images"]

# Conv index -> LPIPS slice, for lpips.pretrained_networks (slices keep torchvision's indices).
_SLICE_BOUNDS = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}


class RangeError(ValueError):
    """Images are not in the range the loss was told about."""


class NonFiniteLossError(FloatingPointError):
    """The reconstruction or one of the loss components is NaN or infinite."""


def check_images(images: Tensor, name: str = "images") -> None:
    """Raise a ValueError unless ``images`` is a float ``N x 3 x H x W`` tensor."""
    if not torch.is_tensor(images):
        raise ValueError(f"{name} must be a float N x 3 x H x W tensor, got "
                         f"{type(images).__name__}.")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{name} must be a float N x 3 x H x W tensor, got a {images.dim()}-D "
                         f"{images.dtype} tensor of shape {tuple(images.shape)}. Batch single "
                         "images with x[None] and convert uint8 pixels with .float() / 255.")
    if images.shape[1] != 3:
        raise ValueError(f"{name} has {images.shape[1]} channel(s), shape {tuple(images.shape)}; "
                         "the loss needs RGB N x 3 x H x W (replicate grey images to 3 channels).")


# (net, weights) -> a built, frozen CPU metric; each PerceptualLoss gets its own deep copy.
_BUILT: dict[tuple[str, str], nn.Module] = {}


def build_lpips(net: str = "alex", weights: str = "auto") -> nn.Module:
    """An ``lpips.LPIPS`` metric (v0.1 linear layers) with ImageNet backbone weights found offline.

    LPIPS: Zhang, Isola, Efros, Shechtman, Wang, "The Unreasonable Effectiveness of Deep
    Features as a Perceptual Metric", CVPR 2018; the ``lpips`` package of
    ``richzhang/PerceptualSimilarity`` builds the network and ships the linear layers; the
    backbone weights come from :func:`~recon_aux.weights.resolve_backbone_weights`.

    The network is frozen (``requires_grad=False``) and in eval mode. ``weights="random"``
    leaves the backbone at random init (plumbing tests only) and warns. Built once per process
    and (net, weights); later calls return a copy.
    """
    if weights == "random":
        warnings.warn(
            "PerceptualLoss(weights='random'): the LPIPS backbone is RANDOMLY initialised. This "
            "is not LPIPS and only fit for tests of plumbing; never report numbers made with it.",
            UserWarning, stacklevel=3,
        )
    key = (net, str(weights))
    if key not in _BUILT:
        _BUILT[key] = _build_lpips(net, weights)
    return copy.deepcopy(_BUILT[key])


def _build_lpips(net: str, weights: str) -> nn.Module:
    import lpips  # imported lazily: building the network is the only use

    if net not in CONV_INDICES:
        raise ValueError(f"net={net!r} is not supported; choose one of {sorted(CONV_INDICES)}.")
    # pnet_rand=True: the package would otherwise ask torchvision to download the backbone.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation notices
        # use_dropout=True: the shipped linear weights are keyed 'linK.model.1.weight' (after a
        # Dropout), and lpips loads them with strict=False: without it they would silently stay
        # random. Dropout is inactive in eval mode.
        metric = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=True,
                             use_dropout=True, verbose=False)
    if weights != "random":
        state, source = resolve_backbone_weights(net, weights)
        bounds = _SLICE_BOUNDS[net]
        mapped = {}
        for key, value in state.items():
            idx = int(key.split(".")[0])
            slice_no = next(i for i, b in enumerate(bounds) if idx < b) + 1
            mapped[f"slice{slice_no}.{key}"] = value
        missing, unexpected = metric.net.load_state_dict(mapped, strict=False)
        convs = [k for k in missing if k.endswith(("weight", "bias"))]
        if convs or unexpected:
            raise RuntimeError(f"LPIPS backbone load from {source}: missing {convs}, "
                               f"unexpected {unexpected}: these are not torchvision's {net} "
                               "weights; pass weights=PATH naming that file")
        metric.weights_source = source
    for p in metric.parameters():
        p.requires_grad_(False)
    # channels_last: about 1.6x faster LPIPS-alex fwd+bwd on CPU at 32x32 (oneDNN), same values.
    return metric.to(memory_format=torch.channels_last).eval()


def _on(device: torch.device, t: Tensor) -> Tensor:
    """``t``, drawn on the host, on ``device``; to a GPU from pinned memory without waiting (a
    plain copy would first wait for the work queued there: a synchronisation per call)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _as_tuple(value):
    """Sequences (lists, tuples, arrays, tensors) as tuples of Python numbers; others unchanged."""
    if value is None or isinstance(value, (int, float, str)):
        return value
    if hasattr(value, "tolist"):
        value = value.tolist()
    return tuple(value) if isinstance(value, (list, tuple)) else value


class PerceptualLoss(nn.Module):
    """``l2_weight * L2 + lpips_weight * LPIPS`` between a reconstruction and its target images.

    Follows the paper (Hizioglu, 2020, section 3.2: "the addition of L2 and perceptual similarity
    gave the best results") with LPIPS v0.1 (Zhang et al., CVPR 2018; the ``lpips`` package of
    richzhang/PerceptualSimilarity) on ImageNet-pretrained AlexNet or VGG16 features.

    Images may be given in ``input_range`` or normalised with ``mean``/``std`` as training
    pipelines do; the loss maps them to [0, 1] for L2 and to LPIPS's [-1, 1] itself. Images that
    stray outside the declared range by more than ``range_tolerance`` raise :class:`RangeError`
    (never clamped: the most common LPIPS bug is feeding [0, 1] images as if they were [-1, 1]).
    Arguments follow :class:`~recon_aux.config.ReconAuxConfig`'s rules (``weights`` is its
    ``lpips_weights``); a refused value raises its ``ConfigError`` (a ValueError) at construction.

    The LPIPS network is frozen, in eval mode, and held outside the module's registry: it has no
    entry in ``parameters()`` or ``state_dict()``, so it never reaches an optimizer or a checkpoint.
    ``.to(device)`` moves it; it always computes in float32, also under autocast.

    Attributes:
        l2_weight, lpips_weight: The mix. L2 is the mean squared error in [0, 1] pixel units.
        net: "alex" or "vgg".
        input_range, mean, std: How the images are encoded.
        resize_to: Size both images are bilinearly upsampled to before LPIPS (None: as given).
        lpips_crop, lpips_fraction: What LPIPS reads of a batch: one random window per image
            when it is larger than ``lpips_crop``, and a random share of the images (see
            :class:`~recon_aux.config.ReconAuxConfig`). The class default is the whole batch
            (``lpips_crop=None``); ``attach`` passes the config's (128).
        generator: The ``torch.Generator`` those draws come from (seeded by ``seed``).
        range_tolerance: How far outside ``input_range`` (in its units) an image may stray
            before :class:`RangeError`; ``check_inputs=False`` skips that check (and its
            device read).
        lpips: The frozen ``lpips.LPIPS`` module, or None when ``lpips_weight == 0``; its
            backbone weights come from ``weights`` (``"auto"``: the search of
            :mod:`recon_aux.weights`; a path; ``"random"`` for plumbing tests only), and
            ``lpips.weights_source`` says where they were found.

    Example:
        >>> import torch
        >>> loss_fn = PerceptualLoss(input_range=(0, 1))
        >>> images = torch.rand(4, 3, 32, 32)
        >>> reconstruction = (images + 0.1 * torch.randn_like(images)).clamp(0, 1)
        >>> loss = loss_fn(reconstruction, images)  # both N x 3 x H x W in [0, 1]
        >>> loss.shape, bool(loss > 0), float(loss_fn(images, images))
        (torch.Size([]), True, 0.0)
    """

    def __init__(
        self,
        l2_weight: float = 1.0,
        lpips_weight: float = 1.0,
        net: str = "alex",
        input_range: Sequence[float] = (0.0, 1.0),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        resize_to: int | Sequence[int] | None = None,
        weights: str = "auto",
        range_tolerance: float = 0.01,
        check_inputs: bool = True,
        lpips_crop: int | None = None,
        lpips_fraction: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        # The same rules as attach()'s config (recon_aux.config): a refused value raises a
        # ConfigError (a ValueError) that names the argument, the value and the fix.
        v = ReconAuxConfig.check_values(dict(
            l2_weight=l2_weight, lpips_weight=lpips_weight, net=net,
            input_range=_as_tuple(input_range), mean=_as_tuple(mean), std=_as_tuple(std),
            resize_to=_as_tuple(resize_to), lpips_weights=str(weights),
            range_tolerance=range_tolerance, check_inputs=check_inputs, lpips_crop=lpips_crop,
            lpips_fraction=lpips_fraction,
        ))
        self.lpips_crop, self.lpips_fraction = v["lpips_crop"], v["lpips_fraction"]
        # Crop windows and batch subsets come from a generator of their own, so LPIPS's
        # sampling draws nothing from the global RNG (a seeded run keeps its data order,
        # augmentations and dropout masks with or without the objective); its state is
        # checkpointed with the head (ReconAux's extra state) for an exact resume.
        self.generator = torch.Generator().manual_seed(int(seed))
        self.l2_weight, self.lpips_weight = v["l2_weight"], v["lpips_weight"]
        self.net, self.input_range = v["net"], v["input_range"]
        self.range_tolerance, self.check_inputs = v["range_tolerance"], v["check_inputs"]
        resize_to = v["resize_to"]
        self.resize_to = (resize_to, resize_to) if isinstance(resize_to, int) else resize_to
        stats = (None if v["mean"] is None
                 else torch.tensor([v["mean"], v["std"]], dtype=torch.float32))
        self.register_buffer("_norm", stats, persistent=False)
        lp = build_lpips(self.net, weights) if self.lpips_weight > 0 else None
        object.__setattr__(self, "lpips", lp)  # not registered: no parameters, no state_dict

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.lpips is not None:
            self.lpips._apply(fn)
            self.lpips.float()  # device moves only; LPIPS stays float32
        if self._norm is not None:
            self._norm = self._norm.float()
        return self

    def to_unit(self, images: Tensor, name: str = "images") -> Tensor:
        """Map images from their encoding to [0, 1] (float32). Shape N x 3 x H x W."""
        check_images(images, name)
        x = images.float()
        if self._norm is not None:  # 3 values each, checked at construction
            n = self._norm.to(x.device)
            x = x * n[1].view(1, -1, 1, 1) + n[0].view(1, -1, 1, 1)
        lo, hi = self.input_range
        return (x - lo) / (hi - lo)

    SPAN = ("target images", "reconstruction")  # the images in ``components()``'s "span"

    def check_span(self, span: Sequence[float]) -> None:
        """Raise unless the images of :data:`SPAN` lie in [0, 1] up to the tolerance.

        ``span`` is ``components()``'s ``"span"`` read on the host: (min, max) after mapping to
        [0, 1], for each image of :data:`SPAN` in turn.
        """
        tol = self.range_tolerance
        for i, name in enumerate(self.SPAN):
            umin, umax = span[2 * i], span[2 * i + 1]
            if umin >= -tol and umax <= 1 + tol:
                continue
            if not (math.isfinite(umin) and math.isfinite(umax)):
                raise NonFiniteLossError(f"{name} contains NaN or Inf (min {umin}, max {umax}).")
            lo, hi = self.input_range
            seen = (lo + umin * (hi - lo), lo + umax * (hi - lo))
            how = "after undoing mean/std " if self._norm is not None else ""
            raise RangeError(
                f"{name} {how}span [{seen[0]:.3g}, {seen[1]:.3g}], outside the declared "
                f"input_range={self.input_range} (tolerance {tol:g} of the range). Declare the "
                "encoding your images really have: input_range=(0, 1) for ToTensor images, "
                "(-1, 1) for images scaled to [-1, 1], (0, 255) for raw pixels, and mean=/std= "
                "when the pipeline normalised them. Values are never clamped."
            )

    def check_size(self, images: Tensor) -> None:
        """Raise unless LPIPS can read images of this size (after ``resize_to``); shape only."""
        size = self.resize_to if self.resize_to is not None else tuple(images.shape[-2:])
        if self.lpips is not None and min(size) < MIN_SIZE[self.net]:
            raise ValueError(
                f"LPIPS-{self.net} needs images of at least {MIN_SIZE[self.net]}x"
                f"{MIN_SIZE[self.net]} pixels, got {tuple(images.shape[-2:])}. Set resize_to="
                f"{MIN_SIZE[self.net] + 1 if self.net == 'alex' else 32} (or larger) to "
                "upsample before LPIPS."
            )

    def check_target(self, images: Tensor) -> None:
        """Raise unless ``images`` lie in the declared encoding's range and are finite: one host
        read, before anything is built from them (``ReconAux`` calls it at its first loss)."""
        with torch.autocast(images.device.type, enabled=False):
            t = self.to_unit(images, "target images")
            lo, hi = torch.stack([t.amin(), t.amax()]).tolist()
        try:
            self.check_span([lo, hi, 0.0, 1.0])  # the reconstruction's half is not read here
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"{exc} Check the data pipeline: the images given to the "
                                     "loss are not finite.") from None

    def components(self, reconstruction: Tensor, target: Tensor, *,
                   check: bool = True) -> dict[str, Tensor]:
        """``{"l2", "lpips", "total"}`` as scalar float32 tensors (with grad), for
        ``reconstruction`` and ``target`` of one shape ``N x 3 x H x W`` in the declared encoding.

        With ``check_inputs``, ``"span"`` holds both images' range on the device (see
        :meth:`check_span`), and one host sync checks it before returning; ``check=False``
        leaves that read to the caller (``ReconAux`` reads it together with the loss's
        finiteness: one sync per call for both).
        """
        check_images(reconstruction, "reconstruction")
        check_images(target, "target images")
        with torch.autocast(reconstruction.device.type, enabled=False):
            r = self.to_unit(reconstruction, "reconstruction")
            t = self.to_unit(target, "target images")
            if r.shape != t.shape:
                raise ValueError(f"reconstruction {tuple(r.shape)} and target {tuple(t.shape)} "
                                 "must have the same shape.")
            parts = {}
            if self.check_inputs:
                rd = r.detach()
                parts["span"] = torch.stack([t.amin(), t.amax(), rd.amin(), rd.amax()])
                if check:
                    self.check_span(parts["span"].tolist())
            l2 = F.mse_loss(r, t)
            if self.lpips is not None:
                self.check_size(r)
                if self.resize_to is not None and tuple(r.shape[-2:]) != self.resize_to:
                    r = F.interpolate(r, size=self.resize_to, mode="bilinear", align_corners=False)
                    t = F.interpolate(t, size=self.resize_to, mode="bilinear", align_corners=False)
                r, t = self._sample(r, t)
                self.lpips.to(r.device)
                cl = torch.channels_last
                lp = self.lpips((2 * r - 1).contiguous(memory_format=cl),
                                (2 * t - 1).contiguous(memory_format=cl)).mean()
            else:
                lp = torch.zeros((), device=r.device)
            total = self.l2_weight * l2 + self.lpips_weight * lp
        return {"l2": l2, "lpips": lp, "total": total, **parts}

    def _sample(self, r: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """What LPIPS reads: a random subset of the batch (``lpips_fraction``) and one random
        window per image (``lpips_crop``), the same in ``r`` and ``t``."""
        n, _, h, w = r.shape
        if self.lpips_fraction < 1:
            keep = torch.randperm(n, generator=self.generator)[:math.ceil(self.lpips_fraction * n)]
            keep = _on(r.device, keep)
            # index_select and gather, not advanced indexing: the same values and gradients (no
            # index repeats), but their backward is a scatter-add, where indexing's is a sorted
            # index_put (4.1 ms a step for the windows below on an H200, 256 images at 224 px)
            r, t, n = r.index_select(0, keep), t.index_select(0, keep), int(keep.numel())
        size = self.lpips_crop
        if size is not None and max(h, w) > size:
            sh, sw = min(size, h), min(size, w)
            top = _on(r.device, torch.randint(0, h - sh + 1, (n,), generator=self.generator))
            left = _on(r.device, torch.randint(0, w - sw + 1, (n,), generator=self.generator))
            rows = (top[:, None] + torch.arange(sh, device=r.device))[:, None, :, None]
            cols = (left[:, None] + torch.arange(sw, device=r.device))[:, None, None, :]
            rows, cols = rows.expand(n, 3, sh, w), cols.expand(n, 3, sh, sw)
            r, t = r.gather(2, rows).gather(3, cols), t.gather(2, rows).gather(3, cols)
        return r, t

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        """Scalar loss. Both inputs N x 3 x H x W in the declared encoding."""
        return self.components(reconstruction, target)["total"]

    def extra_repr(self) -> str:
        return (f"l2_weight={self.l2_weight}, lpips_weight={self.lpips_weight}, net={self.net!r}, "
                f"input_range={self.input_range}, resize_to={self.resize_to}, "
                f"lpips_crop={self.lpips_crop}, lpips_fraction={self.lpips_fraction}")
