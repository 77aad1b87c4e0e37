"""The shared training engine of the methods in :mod:`adapters.methods`.

Everything that is not specific to a method lives here: data, backbone, one SGD optimizer, the LR
schedule, seeds, per-epoch atomic checkpoints and exact resume, logging and progress bars,
evaluation, distributed training, and the two lines of ``recon_aux``::

    aux = recon_aux.attach(backbone, optimizer, ...)              # line 1: in Trainer.__init__
    loss = out.loss + sum(aux.loss(x) for x in out.recon_inputs)  # line 2: in Trainer._step

With ``recon: null`` in the config the run is the base method and neither line runs.

Reproducibility: the model init, the method's state, the data order and augmentations all derive
from ``train.seed``; attaching ``recon_aux`` draws nothing from the global RNG, so a base run and
its +recon twin see the same batches. A run killed at any moment (``kill -9``, at every
file-system operation of its writes included) and resumed with ``run.resume=true`` ends with
bitwise the same metrics and weights on the CPU (tested).

The run folder (``run.out_dir``): every file in it is written atomically
(:func:`adapters.files.atomic_write`); the checkpoint verifies itself
(:mod:`adapters.checkpoint`); ``log.jsonl`` is rewritten from the run's history, so it never
holds an epoch twice; temporaries of a killed run are deleted when the folder is used again.
Which folder may take a run is :mod:`adapters.runs`' rule, checked before anything is loaded.
Settings that depend on the data or the backbone (the batch size against the number of training
images, ``eval.knn.k`` against the bank, probe layers, ``data.resize``) are checked before the
first step (:class:`~adapters.config.RunConfigError`). A full disk is a
:class:`~adapters.files.DiskFullError` that names the file and the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import math
import random
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import recon_aux
from recon_aux import NonFiniteLossError
from recon_aux.perceptual import build_lpips
from recon_aux.weights import WeightsError

from . import distributed as D
from . import files
from .backbones import Backbone, build_backbone
from .checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import (
    CUDA_GRAPH_MODES,
    IneffectiveSettingWarning,
    RunConfig,
    RunConfigError,
    config_diff,
)
from .data import (
    BatchAugment,
    BatchLoader,
    ImageArrays,
    balanced_subset,
    load_dataset,
    make_augment,
)
from .devices import has_cxx_compiler, machine
from .evaluation import (
    extract_features,
    knn_eval,
    linear_probe_eval,
    nonlinear_probe_eval,
    recalibrated_batchnorm,
)
from .evaluation.linear import RECIPES as LINEAR_RECIPES
from .methods import EngineContext, Method, StepOutput, method_class
from .progress import progress
from .runs import CHECKPOINT, LOG, PICTURE, RESULT, RunFolderError, prepare_run_folder, run_dir
from .schema import SchemaError

__all__ = ["Trainer", "train", "StopTraining", "RunSetup", "prepare_run", "plain_loader",
           "evaluation_batchnorm", "check_run", "warn_ineffective", "check_layers", "check_data",
           "train_device"]


class StopTraining(RuntimeError):
    """Raised by ``run.stop_after_epoch``: the process ends as a kill would, with the epoch's
    checkpoint intact (unless ``run.save_checkpoints=false``).

    Attributes:
        epoch: The last epoch trained.
        remedy: How to go on; a command line replaces the config key with its own way.
        checkpoint: Whether that epoch's checkpoint was written (not with
            ``run.save_checkpoints=false``, where a resume starts from scratch).
    """

    def __init__(self, epoch: int, remedy: str = "continue with run.resume=true",
                 checkpoint: bool = True) -> None:
        super().__init__(epoch, remedy, checkpoint)  # all in args: it crosses processes
        self.epoch, self.remedy, self.checkpoint = epoch, remedy, checkpoint

    def __str__(self) -> str:
        return f"stopped after epoch {self.epoch} (run.stop_after_epoch); {self.remedy}"


class _StepModule(nn.Module):
    """Backbone + method heads as one module, so DDP can wrap the training step."""

    def __init__(self, backbone: nn.Module, method: Method) -> None:
        super().__init__()
        self.backbone, self.method = backbone, method

    def forward(self, views: list[Tensor], indices: Tensor) -> StepOutput:
        return self.method.training_step(views, indices)


def plain_loader(arrays: ImageArrays, batch_size: int, size: int, rank: int = 0,
                 world_size: int = 1) -> BatchLoader:
    """Un-augmented batches of ``arrays`` in order (resized to ``size``), optionally this rank's
    shard: what evaluation and the label passes read."""
    return BatchLoader(arrays, batch_size, augment=make_augment("none", size=size),
                       shuffle=False, rank=rank, world_size=world_size)


def evaluation_batchnorm(backbone: nn.Module, train_set: ImageArrays, cfg: RunConfig, size: int,
                         device: torch.device) -> contextlib.AbstractContextManager:
    """The BatchNorm scope every evaluation of a run reads the encoder in: statistics
    recalibrated on ``eval.bn_recalibration_images`` clean training images (shuffled with
    ``train.seed``; restored on exit), or, with 0, the statistics as training left them. It
    yields ``{"bn_layers": ..., "images": ...}`` (``bn_layers`` None when off)."""
    recal = cfg.eval.bn_recalibration_images
    if not recal:
        return contextlib.nullcontext({"bn_layers": None, "images": 0})
    calibration = BatchLoader(train_set, cfg.data.eval_batch_size,
                              augment=make_augment("none", size=size), shuffle=True,
                              seed=cfg.train.seed)
    return recalibrated_batchnorm(backbone, calibration, device=device,
                                  max_images=min(int(recal), len(train_set)))


@dataclass
class RunSetup:
    """A run's data and freshly initialised backbone, as the engine prepares them.

    Attributes:
        train_set, test_set: The (subset) training and test images.
        backbone: The backbone as the run initialises it (seeded by ``train.seed``), on
            ``device``.
        size: Side length the images are fed at (``data.resize`` or the data's own).
        device: Where the run computes.
    """

    train_set: ImageArrays
    test_set: ImageArrays
    backbone: Backbone
    size: int
    device: torch.device

    def plain_loader(self, arrays: ImageArrays, batch_size: int) -> BatchLoader:
        """Un-augmented ordered batches of ``arrays`` (see :func:`plain_loader`)."""
        return plain_loader(arrays, batch_size, self.size)


def prepare_run(cfg: RunConfig, device: torch.device | None = None,
                datasets: dict[tuple, ImageArrays] | None = None) -> RunSetup:
    """Seed everything from ``train.seed``, load the data and build the backbone, in the order
    :class:`Trainer` does, so the backbone is the run's random init (e.g. to re-evaluate a
    finished run's checkpoint next to the untrained network it started from).

    ``datasets``: a cache of loaded splits shared between calls (e.g. checking many runs)."""
    device = device or train_device(cfg.train.device)
    _seed_everything(cfg.train.seed)
    d = cfg.data

    def load(train: bool) -> ImageArrays:
        key = (str(d.dataset), d.root, d.download, train)
        if datasets is not None and key in datasets:
            return datasets[key]
        arrays = load_dataset(d.dataset, data_root=d.root, train=train, download=d.download)
        if datasets is not None:
            datasets[key] = arrays
        return arrays

    train, test = load(True), load(False)
    if d.per_class:
        train = train.subset(_balanced(train, d.per_class, cfg.train.seed, "data.per_class",
                                       "training"))
    if d.test_per_class:
        test = test.subset(_balanced(test, d.test_per_class, cfg.train.seed,
                                     "data.test_per_class", "test"))
    size = int(d.resize or train.image_size[0])  # e.g. SeLa/DeepCluster upsample CIFAR to 224
    try:  # a backbone checks its own arguments (e.g. width > 0)
        backbone = build_backbone(cfg.backbone.name, **cfg.backbone.options).to(device)
    except ValueError as exc:
        raise RunConfigError(f"backbone {cfg.backbone.name!r} with {cfg.backbone.options}: "
                             f"{exc}") from None
    try:
        backbone._check_size(size, size)
    except ValueError as exc:
        key = "data.resize" if d.resize else "the images' size (data.resize: null)"
        raise RunConfigError(f"{key}={size} does not fit backbone {cfg.backbone.name!r}: "
                             f"{exc}") from None
    return RunSetup(train, test, backbone, size, device)


def _balanced(arrays: ImageArrays, per_class: int, seed: int, key: str, split: str):
    counts = np.bincount(arrays.targets, minlength=arrays.num_classes)
    present = counts[counts > 0]
    smallest = int(present.min()) if len(present) else 0
    if per_class > smallest:
        cls = int(np.flatnonzero(counts == smallest)[0])
        raise RunConfigError(
            f"{key}={per_class} but class {arrays.classes[cls]!r} has only {smallest} {split} "
            f"images; use {key} <= {smallest} (or null for every image).")
    return balanced_subset(arrays.targets, per_class, seed)


def train_device(want: str) -> torch.device:
    """``train.device`` as a device: ``"auto"`` is CUDA when torch sees one, else the CPU.

    Raises:
        RunConfigError: CUDA asked for where torch sees none.
    """
    if want == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(want)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunConfigError(f"train.device={want!r} but torch sees no CUDA device; use "
                             "train.device=auto or cpu.")
    return device


def check_layers(cfg: RunConfig, backbone: nn.Module) -> None:
    """Every layer the evaluation and the objective read exists on the backbone (a probe point,
    or for the evaluation also any module name).

    Raises:
        RunConfigError: Naming the key, the layer and the valid names.
    """
    points = tuple(getattr(backbone, "probe_points", ()))
    modules = [name for name, _ in backbone.named_modules() if name]
    ecfg, name = cfg.eval, cfg.backbone.name
    for key, probe in (("eval.knn.layers", ecfg.knn), ("eval.linear.layer", ecfg.linear),
                       ("eval.nonlinear.layer", ecfg.nonlinear)):
        for layer in (probe.layers if probe else ()):
            if layer not in points and layer not in modules:
                raise RunConfigError(
                    f"{key}: {layer!r} is not a layer of backbone {name!r}; its probe points: "
                    f"{', '.join(points)} (or a module name: {_listed(modules)}).")
    if cfg.recon is not None and cfg.recon.layer is not None:
        wanted = cfg.recon.layer
        for layer in (wanted,) if isinstance(wanted, str) else wanted:
            if layer not in modules:
                raise RunConfigError(f"recon.layer: {layer!r} is not a module of backbone "
                                     f"{name!r}; its modules: {_listed(modules)}.")


def check_data(cfg: RunConfig, train_set: ImageArrays, test_set: ImageArrays,
               steps_per_epoch: int, world: int = 1) -> None:
    """What depends on the data, checked before the first step: an epoch trains at least one
    step (incomplete batches are dropped), the kNN bank (the training images) holds at least
    ``eval.knn.k`` images, and a protocol's ``num_classes`` covers the labels of both splits.

    Raises:
        RunConfigError: Naming the key, the value, the data's size and the fix.
    """
    n = len(train_set)
    if cfg.train.epochs > 0 and steps_per_epoch == 0:
        per_rank = f" ({-(-n // world)} per rank of {world})" if world > 1 else ""
        raise RunConfigError(
            f"data.batch_size={cfg.data.batch_size} is larger than the {n} training "
            f"images{per_rank}: with incomplete batches dropped, an epoch would train 0 steps. "
            f"Use data.batch_size <= {n // world} or more images (data.per_class).")
    if cfg.eval.knn is not None and cfg.eval.knn.settings.k > n:
        raise RunConfigError(
            f"eval.knn.k={cfg.eval.knn.settings.k} but the kNN bank holds the {n} training "
            f"images; use eval.knn.k <= {n} or more images (data.per_class).")
    if cfg.eval.linear is not None:
        lin = cfg.eval.linear.settings
        wd = lin.weight_decay if lin.weight_decay is not None else \
            LINEAR_RECIPES[lin.recipe]["weight_decay"]
        held = round(lin.val_fraction * n)
        if isinstance(wd, (list, tuple)) and len(wd) > 1 and not 1 <= held < n:
            raise RunConfigError(
                f"eval.linear.val_fraction={lin.val_fraction} holds out {held} of the {n} "
                "training images to choose the weight decay among "
                f"{[float(w) for w in wd]}; use more images (data.per_class), another "
                "val_fraction, or one eval.linear.weight_decay.")
    largest_label = max((int(s.targets.max()) for s in (train_set, test_set) if len(s)),
                        default=None)
    for probe in (cfg.eval.knn, cfg.eval.linear, cfg.eval.nonlinear):
        classes = probe.settings.num_classes if probe is not None else None
        if classes is not None and largest_label is not None and largest_label >= classes:
            raise RunConfigError(
                f"eval.{probe.kind}.num_classes={classes} but the data's labels go up to "
                f"{largest_label}; use eval.{probe.kind}.num_classes >= {largest_label + 1}, "
                "or leave it out (null) to count them.")


def check_run(cfg: RunConfig, datasets: dict[tuple, ImageArrays] | None = None) -> None:
    """Everything :class:`Trainer` checks before its first step, without training: the data
    (loaded), the backbone's layers, the batch size and ``k`` against the data, the method's
    hyperparameters against the data (what ``recon-aux bench`` runs for every planned run
    before it trains the first).

    ``datasets``: as in :func:`prepare_run`.

    Raises:
        RunConfigError, DatasetError: What is wrong and how to fix it.
    """
    device = train_device(cfg.train.device)
    _precision(cfg.train.precision, device)
    check_compiler(cfg.train.compile, cfg.train.compile_backend, device)
    check_lpips_weights(cfg)
    setup = prepare_run(cfg, torch.device("cpu"), datasets)
    check_layers(cfg, setup.backbone)
    steps = len(BatchLoader(setup.train_set, cfg.data.batch_size, drop_last=True))
    check_data(cfg, setup.train_set, setup.test_set, steps)
    build_method(cfg, setup.backbone, len(setup.train_set))


def check_lpips_weights(cfg: RunConfig) -> None:
    """Find and verify the LPIPS backbone weights the run's objective will use (once per
    process and source), so that a missing or unverifiable file fails before the data loads,
    not when the first +recon run of a matrix builds its loss.

    Raises:
        RunConfigError: The weights cannot be used; the message says where they were looked
            for and how to get them.
    """
    c = cfg.recon.config if cfg.recon is not None else None
    if c is None or c.lpips_weight == 0 or c.lpips_weights == "random":
        return
    try:
        _verified_lpips_weights(c.net, c.lpips_weights)
    except WeightsError as exc:
        raise RunConfigError(f"recon.lpips_weights={c.lpips_weights!r}: {exc}") from None


@functools.cache
def _verified_lpips_weights(net: str, weights: str) -> None:
    build_lpips(net, weights)  # built once per process: attach's later build reuses it


def warn_ineffective(cfg: RunConfig) -> None:
    """An :class:`~adapters.config.IneffectiveSettingWarning` for each setting of ``cfg`` that
    cannot take effect (:meth:`~adapters.config.RunConfig.ineffective`)."""
    for problem in cfg.ineffective():
        warnings.warn(f"{problem} (config {cfg.name!r}).", IneffectiveSettingWarning,
                      stacklevel=2)


def build_method(cfg: RunConfig, backbone: nn.Module, num_train: int) -> Method:
    """``cfg``'s method on ``backbone``; the arguments it refuses against the data (e.g. k <
    images) or the backbone (e.g. ``method.layer``) as a :class:`RunConfigError`."""
    try:
        return method_class(cfg.method.name)(backbone, num_train, cfg.method.config)
    except SchemaError as exc:
        raise RunConfigError(str(exc)) from None
    except ValueError as exc:
        raise RunConfigError(f"method {cfg.method.name!r}: {exc}") from None


class Trainer:
    """Runs one config: ``Trainer(cfg).fit()`` returns the final result dict.

    Attributes:
        cfg: The validated run config (see :mod:`adapters.config`).
        out_dir: Where the checkpoint, ``log.jsonl``, ``result.json`` and pictures go.
        backbone, method, optimizer: The pieces being trained.
        aux: The :class:`recon_aux.ReconAux`, or None for the base method.
        history: One dict of averaged scalars per finished epoch.
        eval_details: What :meth:`evaluate` did besides the metrics (set by it).
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = train_device(cfg.train.device)
        D.init(self.device)
        self.rank, self.world = D.rank(), D.world_size()
        self.seed = cfg.train.seed
        self.out_dir = run_dir(cfg)
        self.precision = _precision(cfg.train.precision, self.device)
        check_compiler(cfg.train.compile, cfg.train.compile_backend, self.device)
        self._prepare_folder()  # before anything is loaded: a refused folder costs nothing
        if self.rank == 0:
            warn_ineffective(cfg)
        method_class(cfg.method.name)  # an unknown method is refused before the data load
        check_lpips_weights(cfg)  # and weights that cannot be found or verified
        setup = prepare_run(cfg, self.device)  # seeds, then data, then the backbone
        check_layers(cfg, setup.backbone)
        self.train_set, self.test_set, self.size = setup.train_set, setup.test_set, setup.size
        steps = len(BatchLoader(self.train_set, cfg.data.batch_size, rank=self.rank,
                                world_size=self.world, drop_last=True))
        check_data(cfg, self.train_set, self.test_set, steps, self.world)  # before step 1
        self.backbone = setup.backbone
        if cfg.train.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.method = build_method(cfg, self.backbone, len(self.train_set))
        self.method.to(self.device)
        self.views = [_augment(v, self.size) for v in (cfg.data.augment or self.method.views)]
        params = [p for p in [*self.backbone.parameters(), *self.method.parameters()]
                  if p.requires_grad]
        t = cfg.train
        self.optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum,
                                         weight_decay=t.weight_decay, nesterov=t.nesterov)
        self.aux = None
        if cfg.recon is not None:
            self.aux = recon_aux.attach(  # line 1 of 2
                self.backbone, self.optimizer, layer=cfg.recon.options.get("layer"),
                config=cfg.recon.config, input_shape=(3, self.size, self.size),
                **cfg.recon.tap)
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        if t.compile is not None:  # in place: names, checkpoints and the hooks stay as they are
            # torch.compile does not guard on hooks: without a reset, a graph compiled for an
            # earlier run of this process (a bench's base row) would run this backbone without
            # the objective's hooks
            torch.compiler.reset()
            options = ({"mode": t.compile} if t.compile_backend == "inductor" else {})
            self.backbone.compile(backend=t.compile_backend, **options)
            if self.aux is not None:
                self.aux.compile(backend=t.compile_backend, **options)
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range
        self.scaler = (torch.amp.GradScaler(self.device.type)
                       if cfg.train.precision == "fp16" else None)
        self.step_module: nn.Module = _StepModule(self.backbone, self.method)
        if self.world > 1:
            self.step_module = nn.parallel.DistributedDataParallel(self.step_module)

        self.history: list[dict[str, Any]] = []
        self.eval_details: dict[str, Any] = {}
        self._augmented_passes = 0  # checkpointed: a resumed run draws the same augmentations
        self.start_epoch, self.global_step = 0, 0
        self._checkpoint_epoch: int | None = None  # the epoch of the last good checkpoint
        self._epoch_logs: dict[str, float] = {}
        self.steps_per_epoch = len(self._loader(None))
        self._prepare_folder(clear=True)  # every check passed: now replace the old run's files

    def _prepare_folder(self, clear: bool = False) -> None:
        """Rank 0 checks (``clear``: then clears) the run folder, see
        :func:`prepare_run_folder`; every rank learns the outcome."""
        error: BaseException | None = None
        if self.rank == 0:
            try:
                # the result's config is compared in the first check only (clear=False)
                prepare_run_folder(self.out_dir, self.cfg.run.resume, self.cfg.run.overwrite,
                                   clear=clear, config=None if clear else self.cfg)
            except (RunFolderError, OSError) as exc:
                error = exc
        if self.world > 1:
            flag = D.broadcast(torch.tensor([float(error is not None)], device=self.device))
            if error is None and float(flag[0]):
                raise RunFolderError(f"rank 0 refused the run folder {self.out_dir} (see its "
                                     "message).")
        if error is not None:
            raise error

    # -- pieces ----------------------------------------------------------------------------------
    def _loader(self, indices) -> BatchLoader:
        data, cuda = self.cfg.data, self.device.type == "cuda"
        return BatchLoader(self.train_set, data.batch_size, indices=indices,
                           augment=self.views, seed=self.seed, rank=self.rank,
                           world_size=self.world, drop_last=True,
                           device=self.device if data.augment_on_device else None,
                           pin_memory=cuda and (data.prefetch > 0 or data.augment_on_device),
                           prefetch=data.prefetch)

    def _plain_loader(self, arrays: ImageArrays, shard: bool) -> BatchLoader:
        return plain_loader(arrays, self.cfg.data.eval_batch_size, self.size,
                            rank=self.rank if shard else 0, world_size=self.world if shard else 1)

    def extract(self, layer: str, augmented: bool = False) -> tuple[Tensor, Tensor]:
        """Features of every training image, gathered from all ranks.

        ``augmented=False``: un-augmented images, the model in eval mode. ``augmented=True``:
        the first training view's augmentation (fresh at every call) with the model in train
        mode (BatchNorm normalises with batch statistics and updates its running ones, dropout
        is on), as SeLa's ``cifar.py`` computes its pseudo-labels; no gradient either way.
        Both tensors (``N x D`` features, ``N`` dataset indices in order) are on the training
        device.
        """
        if augmented:
            feats, indices = self._extract_augmented(layer)
        else:
            plain = extract_features(self.backbone,
                                     self._plain_loader(self.train_set, shard=True), layer,
                                     self.device, progress=False)
            feats, indices = plain[layer], plain.indices
        x = D.all_gather_cat(feats.to(self.device))
        idx = D.all_gather_cat(indices.to(self.device))
        order = torch.argsort(idx, stable=True)
        x, idx = x[order], idx[order]
        keep = torch.ones_like(idx, dtype=torch.bool)
        keep[1:] = idx[1:] != idx[:-1]  # padding repeats a few samples across ranks
        return x[keep], idx[keep]

    @torch.no_grad()
    def _extract_augmented(self, layer: str) -> tuple[Tensor, Tensor]:
        self._augmented_passes += 1
        loader = BatchLoader(self.train_set, self.cfg.data.eval_batch_size,
                             augment=self.views[0], seed=self.seed + 104_729, rank=self.rank,
                             world_size=self.world)
        loader.set_epoch(self._augmented_passes)  # new augmentations at every pass
        flags = {m: m.training for m in self.backbone.modules()}
        self.backbone.train()
        feats, indices = [], []
        try:
            for images, _, idx in loader:
                out = self.backbone.forward_features(images.to(self.device), [layer])[layer]
                feats.append(out.float())
                indices.append(idx)
        finally:
            for m, flag in flags.items():
                m.training = flag
        return torch.cat(feats), torch.cat(indices)

    def _context(self, epoch: int) -> EngineContext:
        return EngineContext(
            backbone=self.backbone, device=self.device, epoch=epoch, step=self.global_step,
            epochs=self.cfg.train.epochs, steps_per_epoch=self.steps_per_epoch,
            batch_size=self.cfg.data.batch_size * self.world,
            num_samples=len(self.train_set),
            targets=torch.as_tensor(self.train_set.targets), seed=self.seed, rank=self.rank,
            world_size=self.world, extract=self.extract, broadcast=D.broadcast,
            optimizer=self.optimizer, log=self._log,
        )

    def _log(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self._epoch_logs[k] = float(v)

    def _set_lr(self, epoch: int) -> None:
        t = self.cfg.train
        if t.lr_schedule == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * epoch / max(1, t.epochs)))
        elif t.lr_schedule == "step":
            factor = t.gamma ** sum(epoch >= m for m in t.milestones)
        else:
            factor = 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor

    # -- training --------------------------------------------------------------------------------
    def _step(self, views: list[Tensor], indices: Tensor, ctx: EngineContext) -> dict[str, float]:
        if self.cfg.train.compile in CUDA_GRAPH_MODES:
            # CUDA graphs: the previous step's outputs are no longer read; their memory is reused
            torch.compiler.cudagraph_mark_step_begin()
        self.method.before_step(ctx)
        with _autocast(self.precision, self.device):  # a no-op for fp32
            out: StepOutput = self.step_module(views, indices)
            parts = {"method_loss": out.loss}
            loss = out.loss
            if self.aux is not None:
                for x in out.recon_inputs:
                    loss = loss + self.aux.loss(x)  # line 2 of 2
                parts["recon_loss"] = loss - out.loss
        logged = {**parts, **out.logs}
        if self.aux is not None:
            logged.update(recon_l2=self.aux.last["l2"], recon_lpips=self.aux.last["lpips"])
        logs = read_scalars(logged)  # one read of the device a step, before backward
        for name in parts:
            if not math.isfinite(logs[name]):
                raise NonFiniteLossError(
                    f"non-finite {name} ({logs[name]}) at epoch {ctx.epoch + 1}, step "
                    f"{self.global_step + 1}; the last good checkpoint is "
                    f"{self.out_dir / CHECKPOINT} (written at the end of the previous epoch). "
                    "Lower train.lr or recon.weight.")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()  # under DDP, recon_aux averages its head's gradients first
        else:  # fp16: a step whose scaled gradients overflowed is skipped, the scale lowered
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.global_step += 1
        return logs

    def _check_ranks_agree(self) -> None:
        if self.world == 1:
            return
        for name, buf in self.method.named_buffers():
            total = buf.double().sum().reshape(1).to(self.device)
            gathered = D.all_gather_cat(total)
            if not torch.all(gathered == gathered[0]):
                raise RuntimeError(f"ranks disagree on the method's {name}: {gathered.tolist()}")

    def fit(self) -> dict[str, Any]:
        """Train the remaining epochs (all of them, or those after the checkpoint with
        ``run.resume``), evaluate, and write the run's files (rank 0).

        Returns:
            What ``result.json`` holds: ``method``, ``recon`` (the objective's config or None),
            ``seed``, ``metrics`` (top-1 % per protocol and layer, e.g. ``knn_conv5``,
            ``linear_conv5``, and ``final_method_loss``), ``evaluation`` (:attr:`eval_details`),
            ``history`` (one row per epoch), ``config`` (the whole run config), ``tapped`` (the
            objective's layer), ``wall_s``, ``machine``, ``train_images``, ``test_images``.

        Raises:
            StopTraining: ``run.stop_after_epoch`` reached (its checkpoint written, unless
                ``run.save_checkpoints=false``).
        """
        t0 = time.perf_counter()
        cfg = self.cfg
        if cfg.run.resume:
            self._resume()
        ctx = self._context(self.start_epoch)
        self.method.on_train_start(ctx)
        epochs = cfg.train.epochs
        for epoch in range(self.start_epoch, epochs):
            self._epoch_logs = {}
            ctx = self._context(epoch)
            self.backbone.train()
            self.method.train()
            self.method.on_epoch_start(ctx)
            self._check_ranks_agree()
            self._set_lr(epoch)
            indices = self.method.epoch_indices(ctx)
            loader = self._loader(indices)
            loader.set_epoch(epoch)
            self.backbone.train()
            self.method.train()
            sums: dict[str, float] = {}
            n = 0
            desc = f"{cfg.method.name} epoch {epoch + 1}/{epochs}"
            for views, _, idx in progress(loader, enabled=cfg.run.progress, total=len(loader),
                                          desc=desc):
                views = [v.to(self.device, non_blocking=True) for v in views]
                if cfg.train.channels_last:
                    views = [v.contiguous(memory_format=torch.channels_last) for v in views]
                ctx.step = self.global_step
                logs = self._step(views, idx.to(self.device), ctx)
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v
                n += 1
            means = torch.tensor([v / max(n, 1) for v in sums.values()], dtype=torch.float64)
            D.all_reduce_mean_([means])  # the epoch's averages over every rank's batches
            row = {"epoch": epoch + 1, "step": self.global_step,
                   "lr": self.optimizer.param_groups[0]["lr"],
                   **dict(zip(sums, means.tolist())), **self._epoch_logs}
            # a non-finite diagnostic (the losses are finite: _step stops otherwise) is kept as
            # None, which JSON can hold (NaN is not JSON)
            row = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                   for k, v in row.items()}
            self.history.append(row)
            if self.rank == 0:
                print("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                for k, v in row.items()), flush=True)
                if cfg.run.save_checkpoints:
                    self._save_checkpoint(epoch + 1)
                self._write_log()
            D.barrier()
            if cfg.run.stop_after_epoch == epoch + 1 and epoch + 1 < epochs:
                if cfg.run.save_checkpoints:
                    raise StopTraining(epoch + 1)
                raise StopTraining(epoch + 1, "no checkpoint was written "
                                   "(run.save_checkpoints=false): the run can only start again",
                                   checkpoint=False)
        with self._eager():
            metrics = self.evaluate()
        plain = cfg.to_dict()
        result = {
            "method": cfg.method.name, "recon": plain["recon"], "seed": self.seed,
            "metrics": metrics, "evaluation": self.eval_details, "history": self.history,
            "config": plain,
            # the layer(s) the objective tapped (recon.layer, or what layer=None chose)
            "tapped": self.aux.layer_name if self.aux is not None else None,
            "wall_s": round(time.perf_counter() - t0, 1), "machine": machine(),
            "train_images": len(self.train_set), "test_images": len(self.test_set),
        }
        if self.rank == 0:
            self._write(RESULT, files.json_text(result, indent=2).encode())
            if self.aux is not None:
                with self._eager():
                    self.save_reconstructions(self.out_dir / PICTURE)
        return result

    def _eager(self):
        """With ``train.compile``: run the compiled modules eagerly inside (the evaluation's
        passes differ from training's, in modes and batch sizes, and would each compile anew)."""
        if self.cfg.train.compile is None:
            return contextlib.nullcontext()
        return torch.compiler.set_stance("force_eager")

    # -- evaluation ------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """The configured protocols on the final encoder (rank 0's; ranks hold equal weights).

        Every protocol reads the encoder with its BatchNorm statistics recalibrated on clean
        training images (``eval.bn_recalibration_images``; the statistics in the model and in
        the checkpoint are left as training made them). What each protocol did beyond its
        top-1 (images recalibrated on, a probe's final training loss and top-1, whether it
        levelled off) is kept in :attr:`eval_details`.
        """
        ecfg, metrics = self.cfg.eval, {}
        train = self._plain_loader(self.train_set, shard=False)
        test = self._plain_loader(self.test_set, shard=False)
        details: dict[str, Any] = {}
        with evaluation_batchnorm(self.backbone, self.train_set, self.cfg, self.size,
                                  self.device) as info:
            details["bn_recalibration"] = info
            if ecfg.knn:
                layers = list(ecfg.knn.layers)
                res = knn_eval(self.backbone, train, test, layers, self.device, progress=False,
                               **ecfg.knn.options)
                for layer in layers:
                    metrics[f"knn_{layer}"] = res[layer]["top1"]
            for probe, fn in ((ecfg.linear, linear_probe_eval),
                              (ecfg.nonlinear, nonlinear_probe_eval)):
                if probe:
                    kind, layer = probe.kind, probe.layer
                    res = fn(self.backbone, train, test, layer, self.device, progress=False,
                             **probe.options)
                    metrics[f"{kind}_{layer}"] = res["top1"]
                    details[f"{kind}_{layer}"] = {
                        key: res.get(key) for key in (
                            "recipe", "train_top1", "train_loss", "epochs_run", "levelled_off",
                            "feature_dim", "weight_decay")}
        if self.history and "method_loss" in self.history[-1]:
            metrics["final_method_loss"] = self.history[-1]["method_loss"]
        self.eval_details = details
        return metrics

    def save_reconstructions(self, path: Path, n: int = 16) -> None:
        """Write a PNG of ``n`` test images (evenly spaced over the test set; top rows) above
        their reconstructions by the current encoder and head (bottom rows) to ``path``.

        Raises:
            ValueError: The run has no objective (``recon: null``), or ``n`` is not even.
        """
        from torchvision.utils import save_image

        if self.aux is None:
            raise ValueError("save_reconstructions needs the objective: this run has recon: "
                             "null, so nothing reconstructs its images.")
        if n < 2 or n % 2:
            raise ValueError(f"n={n}: give an even number of images (two rows of n // 2).")

        pick = np.linspace(0, len(self.test_set) - 1, n).astype(np.int64)
        raw = torch.from_numpy(self.test_set.images[pick]).permute(0, 3, 1, 2)
        images = make_augment("none", size=self.size)(raw, torch.Generator()).to(self.device)
        recon = self.aux.reconstruct(images)
        rows = torch.stack([images.view(2, n // 2, *images.shape[1:]),
                            recon.view(2, n // 2, *images.shape[1:])], 1)
        picture = io.BytesIO()
        save_image(rows.reshape(-1, *images.shape[1:]).cpu(), picture, nrow=n // 2, padding=2,
                   format="png")
        self._write(Path(path).name, picture.getvalue(), Path(path).parent)

    # -- files ---------------------------------------------------------------------------------
    def _write(self, name: str, data: bytes, folder: Path | None = None) -> None:
        """Write a file of the run atomically; a full disk says which checkpoint is intact."""
        folder = self.out_dir if folder is None else folder
        try:
            files.atomic_write(folder / name, data)
        except files.DiskFullError as exc:
            raise files.DiskFullError(self._disk_full(folder / name), exc.filename) from exc

    def _disk_full(self, path: Path) -> str:
        ckpt = self.out_dir / CHECKPOINT
        if self._checkpoint_epoch is None:
            last = "no checkpoint of this run was written yet"
        else:
            last = (f"the last good checkpoint, {ckpt} (after epoch {self._checkpoint_epoch}), "
                    "is intact")
        return (f"disk full: could not write {path}; {last}. Free some space, then continue "
                "with --resume (run.resume=true).")

    def _write_log(self) -> None:
        """``log.jsonl``: one JSON line per finished epoch, rewritten whole from the history (so
        it never holds an epoch twice, even after a kill and a resume)."""
        self._write(LOG, "".join(files.json_text(row) + "\n" for row in self.history).encode())

    def _save_checkpoint(self, epochs_done: int) -> None:
        try:
            save_checkpoint(self.out_dir / CHECKPOINT, self._state(epochs_done))
        except files.DiskFullError as exc:
            raise files.DiskFullError(self._disk_full(self.out_dir / CHECKPOINT),
                                      exc.filename) from exc
        self._checkpoint_epoch = epochs_done

    # -- checkpoints -----------------------------------------------------------------------------
    def _state(self, epochs_done: int) -> dict[str, Any]:
        return {
            "format": 1, "config": self.cfg.to_dict(), "epoch": epochs_done,
            "step": self.global_step, "backbone": self.backbone.state_dict(),
            "method": self.method.state_dict(), "method_extra": self.method.extra_state(),
            "optimizer": self.optimizer.state_dict(),
            "aux": self.aux.state_dict() if self.aux is not None else None,
            "rng": rng_state(), "history": self.history,
            "augmented_passes": self._augmented_passes,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def _resume(self) -> None:
        path = self.out_dir / CHECKPOINT
        if not path.is_file():
            if self.rank == 0:
                print(f"no checkpoint at {path}: starting from scratch", flush=True)
            return
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:  # how a train run starts again; bench says its own way
            raise CheckpointError(f"{exc} To start it again: --overwrite (run.overwrite=true)."
                                  ) from None
        diff = config_diff(state["config"], self.cfg)
        if diff:
            raise CheckpointError(
                f"{path} was written by a different config; differing keys: {diff}. Resume with "
                "the config the checkpoint was made with, start the run again with --overwrite "
                "(run.overwrite=true), or choose another --out-dir (run.out_dir).")
        self.backbone.load_state_dict(state["backbone"])
        self.method.load_state_dict(state["method"])
        self.method.load_extra_state(state["method_extra"])
        if self.aux is not None:
            self.aux.load_state_dict(state["aux"])  # before the optimizer: head group exists
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        self.start_epoch, self.global_step = state["epoch"], state["step"]
        self.history = list(state["history"])
        self._augmented_passes = int(state.get("augmented_passes", 0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self._checkpoint_epoch = self.start_epoch
        if self.rank == 0:
            self._write_log()  # the log holds exactly the checkpoint's epochs
            print(f"resumed from {path} after epoch {self.start_epoch}", flush=True)


def reported_metrics(cfg: RunConfig) -> set[str]:
    """The names of the metrics a run of ``cfg`` can report (:meth:`Trainer.evaluate`'s keys)."""
    e = cfg.eval
    names = {f"knn_{layer}" for layer in e.knn.layers} if e.knn else set()
    names |= {f"{probe.kind}_{probe.layer}" for probe in (e.linear, e.nonlinear) if probe}
    return names | {"final_method_loss"}


def read_scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """``values`` (one-element tensors or numbers) as Python floats, in their order. The tensors
    of each device are read in one copy: a read waits for the work queued on the device, so one
    read a step instead of one per value lets the host run ahead of a GPU. The floats are those
    ``float(value)`` gives (through float64, which holds every float32, bfloat16 and float16)."""
    by_device: dict[torch.device, list[str]] = {}
    for name, value in values.items():
        if torch.is_tensor(value):
            by_device.setdefault(value.device, []).append(name)
    read: dict[str, float] = {}
    for names in by_device.values():
        stacked = torch.stack([values[n].detach().reshape(()).double() for n in names])
        read.update(zip(names, stacked.tolist(), strict=True))
    return {name: read[name] if name in read else float(value) for name, value in values.items()}


def _precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (None: float32, no autocast)."""
    if name == "fp32":
        return None
    if name == "fp16" and device.type != "cuda":
        raise RunConfigError(f"train.precision=fp16 needs a CUDA device (this run computes on "
                             f"{device}); use bf16 (autocast to bfloat16 works on the CPU) or "
                             "fp32.")
    return torch.bfloat16 if name == "bf16" else torch.float16


def check_compiler(mode: str | None, backend: str, device: torch.device) -> None:
    """``torch.compile`` with inductor on the CPU builds C++ kernels: a :class:`RunConfigError`
    before any work when no C++ compiler is found (inductor would fail at the first step)."""
    if mode is None or backend != "inductor" or device.type != "cpu":
        return
    if not has_cxx_compiler():
        raise RunConfigError(
            f"train.compile={mode} with the inductor backend on the CPU needs a C++ compiler "
            "(g++, c++ or clang++ on the PATH, or $CXX), and none was found. Install one, set "
            "train.compile_backend=aot_eager (tracing only, no speed-up), or train.compile=null.")


def _autocast(dtype: torch.dtype | None, device: torch.device):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or nothing when ``dtype`` is None
    (fp32: the code path of a run without the option, bit for bit)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _listed(names: list[str], most: int = 40) -> str:
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def _augment(spec: str | dict[str, Any], size: int) -> BatchAugment:
    """A ``data.augment`` entry (checked by :class:`~adapters.config.DataConfig`): a preset
    name, or ``{preset: NAME, <BatchAugment field>: value}`` (e.g. ``{preset: simclr, scale:
    [0.2, 1.0]}``)."""
    if isinstance(spec, str):
        return make_augment(spec, size=size)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
    return make_augment(fields.pop("preset"), size=size, **fields)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run a validated config to the end; returns the result dict (see :meth:`Trainer.fit`)."""
    trainer = Trainer(cfg)
    finished = False
    try:
        result = trainer.fit()
        finished = True
        return result
    finally:
        if trainer.aux is not None:
            trainer.aux.remove()
        trainer.step_module = None  # the DDP reducer holds the process group: drop it first
        gc.collect()
        D.shutdown(wait=finished)
