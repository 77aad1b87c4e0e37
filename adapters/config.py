"""Run configs: one YAML file per run, typed and validated, with dotted ``key=value`` overrides.

A run config has seven sections; every one but ``method`` has defaults::

    method:   {name: <a name of adapters.methods.METHODS>, ...that method's hyperparameters...}
    backbone: {name: <a name of adapters.backbones.BACKBONES>, ...its keyword arguments...}
    data:     DataConfig      {dataset, root, download, per_class, test_per_class, batch_size,
                               augment, eval_batch_size, resize, augment_on_device, prefetch}
    train:    TrainConfig     {epochs, lr, momentum, weight_decay, nesterov, lr_schedule,
                               milestones, gamma, seed, device, threads, precision,
                               channels_last, compile, compile_backend}
    eval:     EvalConfig      {knn: {layers, k, temperature, ...} | null,
                               linear: {layer, recipe, epochs, ...} | null,
                               nonlinear: {layer, epochs, ...} | null,
                               bn_recalibration_images: N | null}
    recon:    null (the base method) | {layer, ...recon_aux.ReconAuxConfig fields...}
    run:      RunSettings     {out_dir, resume, overwrite, progress, save_checkpoints,
                               stop_after_epoch}

:func:`load_run_config` reads one into a :class:`RunConfig`, whose sections are typed
dataclasses: unknown keys are errors that list the valid ones, values are checked for type and
range, method and backbone names against their registries, a method's hyperparameters against
its ``Config`` (e.g. :class:`~adapters.methods.SeLaConfig`), an evaluation protocol's keys and
values against its typed section (:class:`KnnSection`, :class:`LinearSection`,
:class:`NonlinearSection`, whose keys are the keyword arguments of the protocol's function), the
``recon`` block against :class:`recon_aux.ReconAuxConfig`. Every problem is a
:class:`RunConfigError`. What depends on the data or the backbone (``k`` against the size of the
kNN bank, the batch size against the number of training images, ``per_class`` against the class
sizes, probe layers against the backbone) is checked by the engine before the first step.

``run.stop_after_epoch: k`` ends the process after epoch k as a kill would (the checkpoint is
complete); ``run.resume: true`` continues it. A run folder that holds a run is never written
over: without ``run.resume`` the engine refuses it, unless ``run.overwrite: true`` (which first
deletes that run's files). ``run.*`` keys and ``data.download`` may differ between a checkpoint
and the config that resumes it; any other difference is refused (:func:`config_diff`).

Overrides use dots: ``train.epochs=3``, ``recon=null``, ``recon.weight=0.5``; values are parsed
as YAML (``safe_load``), so ``[conv5, fc7]`` is a list and ``null`` is None.

:meth:`RunConfig.to_dict` is the plain form that checkpoints (``weights_only``) and
``result.json`` store: each fixed section with every default filled in, and the keys of
``method``, ``backbone``, ``recon`` and the probes as they were written (the kNN probe with its
``k`` and ``temperature`` defaults).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from recon_aux import ConfigError, ReconAuxConfig
from recon_aux.config import safe_load

from .backbones import BACKBONES, backbone_class, check_backbone_arguments
from .data import PRESETS, BatchAugment, make_augment
from .evaluation import (
    knn_eval,
    linear_probe,
    linear_probe_eval,
    nonlinear_probe,
    nonlinear_probe_eval,
)
from .evaluation.features import POOL_MODES
from .evaluation.linear import LR_SCHEDULES, RECIPES, SEARCHES
from .methods import METHODS, MethodConfig, method_class
from .schema import SchemaError, Section, above, at_least, check_value, one_of, plain

__all__ = [
    "RunConfig", "RunConfigError", "DataConfig", "TrainConfig", "EvalConfig", "ProbeConfig",
    "KnnSection", "LinearSection", "NonlinearSection", "RunSettings", "MethodSection",
    "BackboneSection", "ReconSection", "SECTIONS", "protocol_keywords", "load_run_config",
    "read_yaml", "apply_overrides", "config_diff", "flatten", "yaml_problem",
    "IneffectiveSettingWarning",
]

SCHEDULES = ("constant", "cosine", "step")
PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")

#: Keys added after runs were recorded, with the default that reproduces the earlier code bit
#: for bit: a recorded config without the key is the same run as one with this value.
NEUTRAL_DEFAULTS: dict[str, Any] = {
    "train.precision": "fp32", "train.channels_last": False, "data.augment_on_device": False,
    "train.compile": None, "train.compile_backend": "inductor"}


class IneffectiveSettingWarning(UserWarning):
    """A setting that cannot take effect in its run (:meth:`RunConfig.ineffective`)."""


class RunConfigError(SchemaError):
    """A run config has an unknown key, a missing required key or a bad value."""


@dataclass(frozen=True)
class DataConfig(Section):
    """The ``data:`` section.

    Attributes:
        dataset: ``cifar10``, ``cifar100``, ``svhn``, ``fashion_mnist`` or an ImageFolder path
            (see :func:`adapters.data.load_dataset`).
        root: Data folder (default ``$RECON_AUX_DATA``).
        download: Let torchvision download ``cifar10``, ``cifar100``, ``svhn`` or
            ``fashion_mnist`` into the cache when no local copy is found (needs internet).
        per_class, test_per_class: Balanced subsets (seeded by ``train.seed``); None: all.
        batch_size: Training batch of each rank (the engine shards the data by rank).
        augment: One augmentation per view, each a preset name or ``{preset: NAME, <field>:
            value}`` (e.g. ``{preset: simclr, scale: [0.2, 1.0]}``); None: the method's views.
        eval_batch_size: Batch of the feature passes.
        resize: Side length the loader resizes images to (e.g. 224); None: the data's own.
        augment_on_device: Run the augmentations on ``train.device`` (a GPU): the uint8 batch
            is copied there first. The random draws stay on the CPU, so the same seed gives the
            same crops and jitter on either device.
        prefetch: Training batches built ahead on a background thread while the step computes
            (0: on demand). Batches, their order and the results do not depend on it. On CUDA
            the batches are also pinned, so their copy to the GPU overlaps compute.
    """

    label: ClassVar[str] = "data"
    dataset: str = "cifar10"
    root: str | None = None
    download: bool = False
    per_class: int | None = field(default=None, metadata=at_least(1))
    test_per_class: int | None = field(default=None, metadata=at_least(1))
    batch_size: int = field(default=128, metadata=at_least(1))
    augment: tuple[str | dict[str, Any], ...] | None = None
    eval_batch_size: int = field(default=500, metadata=at_least(1))
    resize: int | None = field(default=None, metadata=at_least(1))
    augment_on_device: bool = False
    prefetch: int = field(default=0, metadata=at_least(0))

    def check(self) -> None:
        for entry in self.augment or ():
            preset = entry.get("preset") if isinstance(entry, dict) else entry
            if isinstance(entry, dict) and "preset" not in entry:
                raise SchemaError(f"data.augment entry {entry!r} needs a 'preset' key (e.g. "
                                  "{preset: simclr, scale: [0.2, 1.0]}).")
            if preset not in PRESETS:
                raise SchemaError(f"data.augment preset {preset!r} is unknown; presets: "
                                  f"{', '.join(PRESETS)}.")
            if isinstance(entry, dict):
                _check_augment_fields(entry)


def _check_augment_fields(entry: Mapping[str, Any]) -> None:
    """A ``{preset: NAME, <BatchAugment field>: value}`` entry builds (at the images' size)."""
    fields = {f.name for f in dataclasses.fields(BatchAugment)} - {"size"}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in entry.items() if k != "preset"}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise SchemaError(f"data.augment entry {plain(dict(entry))!r}: unknown field(s) {unknown}; "
                          f"valid ones: preset, {', '.join(sorted(fields))} (the size is "
                          "data.resize's).")
    try:
        make_augment(entry["preset"], size=32, **given)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"data.augment entry {plain(dict(entry))!r}: {exc} (each field's type "
                          "and range: adapters.data.BatchAugment).") from None


@dataclass(frozen=True)
class TrainConfig(Section):
    """The ``train:`` section: one SGD optimizer for the backbone and the method's heads.

    Attributes:
        epochs: Training epochs (0: the untrained network, the random-init reference row).
        lr, momentum, weight_decay, nesterov: SGD's settings.
        lr_schedule: ``constant``, ``cosine`` (to 0 at the end) or ``step`` (x ``gamma`` at
            each epoch of ``milestones``).
        seed: Seeds the model init, the method's state, the data order and augmentations.
        device: ``auto`` (CUDA when there is one), ``cpu``, ``cuda``, ``cuda:1``, ...
        threads: ``torch.set_num_threads`` for the run; None leaves it.
        precision: ``fp32``; ``bf16`` (autocast to bfloat16, CPU or GPU); ``fp16`` (autocast to
            float16 with a gradient scaler, CUDA only). Autocast covers the forward passes and
            the losses (the method's and the reconstruction's); the weights, the optimizer and
            the evaluation stay in float32.
        channels_last: Keep the backbone's weights and the training batches in channels-last
            memory format (faster convolutions on recent GPUs; the same numbers up to rounding).
        compile: None (eager), or a ``torch.compile`` mode (``default``, ``reduce-overhead``,
            ``max-autotune``, ``max-autotune-no-cudagraphs``) for the training forward: the
            backbone (in place: parameter names, checkpoints and the objective's hooks are
            unchanged) and the objective's head and LPIPS network
            (:meth:`recon_aux.ReconAux.compile`). Evaluation stays eager. The same numbers up
            to rounding; the first steps pay for the compilation. A run compiles afresh: it
            clears the process's compiled graphs first (``torch.compiler.reset()``).
        compile_backend: ``inductor`` (the default; on the CPU it needs a C++ compiler),
            ``aot_eager`` or ``eager`` (tracing only, for debugging; ``compile`` must then be
            ``default``, as their modes do not exist).
    """

    label: ClassVar[str] = "train"
    epochs: int = field(default=1, metadata=at_least(0))
    lr: float = field(default=0.05, metadata=at_least(0))
    momentum: float = field(default=0.9, metadata=at_least(0))
    weight_decay: float = field(default=5e-4, metadata=at_least(0))
    nesterov: bool = False
    lr_schedule: str = field(default="constant", metadata=one_of(*SCHEDULES))
    milestones: tuple[int, ...] = ()
    gamma: float = field(default=0.1, metadata=above(0))
    seed: int = field(default=0, metadata=at_least(0))
    device: str = "auto"
    threads: int | None = field(default=None, metadata=at_least(1))
    precision: str = field(default="fp32", metadata=one_of(*PRECISIONS))
    channels_last: bool = False
    compile: str | None = field(default=None, metadata=one_of(*COMPILE_MODES))
    compile_backend: str = field(default="inductor", metadata=one_of(*COMPILE_BACKENDS))

    def check(self) -> None:
        bad = [m for m in self.milestones if m < 1]
        if bad:
            raise SchemaError(f"train.milestones={list(self.milestones)} must be epochs >= 1.")
        if self.compile not in (None, "default") and self.compile_backend != "inductor":
            raise SchemaError(f"train.compile={self.compile} is a mode of the inductor backend; "
                              f"with train.compile_backend={self.compile_backend} use "
                              "train.compile=default.")
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise SchemaError(f"train.device={self.device!r} is not a device; use auto, "
                                  "cpu, cuda or cuda:<index>.") from None


@dataclass(frozen=True)
class RunSettings(Section):
    """The ``run:`` section (may differ between a checkpoint and the config that resumes it).

    Attributes:
        out_dir: Where the checkpoint, ``log.jsonl``, ``result.json`` and pictures go (default
            ``runs/<config name>/<method>-<base|recon>-seed<seed>``). In a config file only a
            folder below the working directory; any other from the command line (``--out-dir``).
        resume: Continue from ``out_dir``'s checkpoint.
        overwrite: Start again in an ``out_dir`` that holds a run (its checkpoint, log, results
            and pictures are deleted first); without it (or ``resume``) such a folder is refused.
        progress: Progress bars (None: only on a terminal).
        save_checkpoints: Write a checkpoint after every epoch.
        stop_after_epoch: End the process after this epoch, as a kill would.
    """

    label: ClassVar[str] = "run"
    out_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    progress: bool | None = None
    save_checkpoints: bool = True
    stop_after_epoch: int | None = field(default=None, metadata=at_least(1))

    def check(self) -> None:
        if self.resume and self.overwrite:
            raise SchemaError("run.resume and run.overwrite exclude each other: resume continues "
                              "the run in run.out_dir, overwrite deletes it and starts again.")


#: Keyword arguments an evaluation protocol's function takes that a config may not set.
_NOT_CONFIGURABLE = frozenset({"device", "progress", "return_classifier", "plateau"})


def _in_open_unit_interval() -> dict[str, Any]:
    return {"check": (lambda v: 0 < v < 1, "in (0, 1)")}


@dataclass(frozen=True)
class KnnSection(Section):
    """``eval.knn``: the keyword arguments of :func:`~adapters.evaluation.knn_eval`, typed.

    Attributes:
        layers: The probe points whose features are voted on (at least one).
        pool, k, temperature, num_classes, chunk_size: As in
            :func:`~adapters.evaluation.knn_eval` (``k`` must also be at most the number of
            training images, the bank; the engine checks that before training).
    """

    label: ClassVar[str] = "eval.knn"
    layers: tuple[str, ...] = ("conv5",)
    pool: str = field(default="avg", metadata=one_of(*POOL_MODES))
    k: int = field(default=200, metadata=at_least(1))
    temperature: float = field(default=0.1, metadata=above(0))
    num_classes: int | None = field(default=None, metadata=at_least(1))
    chunk_size: int = field(default=256, metadata=at_least(1))

    def check(self) -> None:
        if not self.layers:
            raise SchemaError("eval.knn.layers is empty; name at least one layer (e.g. "
                              "layers: [conv5]), or set eval.knn: null to switch kNN off.")
        twice = sorted({x for x in self.layers if self.layers.count(x) > 1})
        if twice:
            raise SchemaError(f"eval.knn.layers={list(self.layers)} names {twice} twice; name "
                              "each layer once.")


@dataclass(frozen=True)
class LinearSection(Section):
    """``eval.linear``: the keyword arguments of :func:`~adapters.evaluation.linear_probe_eval`
    and :func:`~adapters.evaluation.linear_probe`, typed (None: the recipe's value).

    Each key is documented once, at those functions' arguments (``layer``, ``recipe``,
    ``num_classes``, ``pool``, ``target_dim``, ``standardize``, ``epochs``, ``batch_size``,
    ``lr``, ``momentum``, ``weight_decay``: one value or a list to choose from on held-out
    training features, ``lr_schedule``, ``milestones``, ``gamma``, ``val_fraction``, ``seed``,
    ``search``); the defaults are this class's fields.
    """

    label: ClassVar[str] = "eval.linear"
    layer: str
    recipe: str = field(default="standardized", metadata=one_of(*RECIPES))
    num_classes: int | None = field(default=None, metadata=at_least(1))
    pool: str = field(default="deepcluster", metadata=one_of(*POOL_MODES))
    target_dim: int = field(default=9600, metadata=at_least(1))
    standardize: bool | None = None
    epochs: int | None = field(default=None, metadata=at_least(1))
    batch_size: int = field(default=256, metadata=at_least(2))
    lr: float | None = field(default=None, metadata=above(0))
    momentum: float = field(default=0.9, metadata=at_least(0))
    weight_decay: float | tuple[float, ...] | None = None
    lr_schedule: str | None = field(default=None, metadata=one_of(*LR_SCHEDULES))
    milestones: tuple[int, ...] | None = None
    gamma: float = field(default=0.1, metadata=above(0))
    val_fraction: float = field(default=0.2, metadata=_in_open_unit_interval())
    seed: int = field(default=31, metadata=at_least(0))
    search: str = field(default="auto", metadata=one_of(*SEARCHES))

    def check(self) -> None:
        wd = self.weight_decay
        values = wd if isinstance(wd, tuple) else () if wd is None else (wd,)
        if isinstance(wd, tuple) and not wd:
            raise SchemaError("eval.linear.weight_decay=[] needs at least one value (a list is "
                              "chosen from on held-out features).")
        if any(v < 0 or v != v for v in values):
            raise SchemaError(f"eval.linear.weight_decay={plain(wd)!r} must be >= 0 (or a list "
                              "of such values).")
        _check_milestones(self.milestones, self.label)


@dataclass(frozen=True)
class NonlinearSection(Section):
    """``eval.nonlinear``: the keyword arguments of
    :func:`~adapters.evaluation.nonlinear_probe_eval` and
    :func:`~adapters.evaluation.nonlinear_probe`, typed.

    Each key is documented once, at those functions' arguments (``layer``, ``num_classes``,
    ``pool``, ``hidden``, ``epochs``, ``batch_size``, ``lr``, ``momentum``, ``nesterov``,
    ``weight_decay``, ``milestones``, ``gamma``, ``seed``); the defaults are this class's
    fields (AET's recipe).
    """

    label: ClassVar[str] = "eval.nonlinear"
    layer: str
    num_classes: int | None = field(default=None, metadata=at_least(1))
    pool: str = field(default="flatten", metadata=one_of(*POOL_MODES))
    hidden: int | None = field(default=None, metadata=at_least(1))
    epochs: int = field(default=200, metadata=at_least(1))
    batch_size: int = field(default=128, metadata=at_least(2))
    lr: float = field(default=0.1, metadata=above(0))
    momentum: float = field(default=0.9, metadata=at_least(0))
    nesterov: bool = True
    weight_decay: float = field(default=5e-4, metadata=at_least(0))
    milestones: tuple[int, ...] | None = None
    gamma: float = field(default=0.1, metadata=above(0))
    seed: int = field(default=0, metadata=at_least(0))

    def check(self) -> None:
        _check_milestones(self.milestones, self.label)


def _check_milestones(milestones: tuple[int, ...] | None, label: str) -> None:
    if milestones is not None and any(m < 1 for m in milestones):
        raise SchemaError(f"{label}.milestones={list(milestones)} must be epochs >= 1.")


@dataclass(frozen=True)
class ProbeConfig:
    """One evaluation protocol of the ``eval:`` section: the layer(s) it reads and the keyword
    arguments of its function, as written; every key and value is checked by the protocol's
    typed section (:class:`KnnSection`, :class:`LinearSection`, :class:`NonlinearSection`).

    Attributes:
        kind: ``knn``, ``linear`` or ``nonlinear``.
        layers: What the protocol reads (kNN: ``layers``; the probes: their one ``layer``).
        options: The other keys, passed to the protocol's function as keyword arguments.
        settings: The typed section (every key, defaults filled in).
    """

    kind: str
    layers: tuple[str, ...]
    options: Mapping[str, Any]
    settings: Section

    #: kind -> (the functions whose keyword arguments a config may set, the key of the layers)
    PROTOCOLS: ClassVar[dict[str, tuple[tuple[Callable, ...], str]]] = {
        "knn": ((knn_eval,), "layers"),
        "linear": ((linear_probe_eval, linear_probe), "layer"),
        "nonlinear": ((nonlinear_probe_eval, nonlinear_probe), "layer"),
    }
    #: kind -> its typed section.
    SECTIONS: ClassVar[dict[str, type[Section]]] = {
        "knn": KnnSection, "linear": LinearSection, "nonlinear": NonlinearSection}
    #: The kNN protocol's defaults (the bench protocol: k=200, T=0.1).
    KNN_DEFAULTS: ClassVar[dict[str, Any]] = {"layers": ["conv5"], "k": 200, "temperature": 0.1}

    @classmethod
    def from_any(cls, kind: str, data: Mapping[str, Any]) -> ProbeConfig:
        where = f"eval.{kind}"
        if not isinstance(data, Mapping):
            raise SchemaError(f"{where} must be null or a mapping, got {data!r}.")
        _, layer_key = cls.PROTOCOLS[kind]
        if kind == "knn":
            data = {**cls.KNN_DEFAULTS, **data}
        if layer_key not in data:
            raise SchemaError(f"{where} needs {layer_key!r} (e.g. {layer_key}: conv5).")
        settings = cls.SECTIONS[kind].from_any(data, where=where)
        options = {k: v for k, v in data.items() if k != layer_key}
        layers = getattr(settings, layer_key)
        layers = tuple(layers) if kind == "knn" else (layers,)
        return cls(kind, layers, copy.deepcopy(dict(options)), settings)

    @property
    def layer(self) -> str:
        """The one layer of a linear or non-linear probe."""
        return self.layers[0]

    def to_dict(self) -> dict[str, Any]:
        layers = list(self.layers) if self.kind == "knn" else self.layers[0]
        return {self.PROTOCOLS[self.kind][1]: layers, **plain(self.options)}


def protocol_keywords(kind: str) -> dict[str, Any]:
    """Type hints of the keyword arguments with defaults of a protocol's functions (minus
    :data:`_NOT_CONFIGURABLE`): the keys its typed section must have besides the layer(s)."""
    hints: dict[str, Any] = {}
    for fn in ProbeConfig.PROTOCOLS[kind][0]:
        annotations = typing.get_type_hints(fn)
        for name, param in inspect.signature(fn).parameters.items():
            if param.default is not inspect.Parameter.empty and name not in _NOT_CONFIGURABLE:
                hints.setdefault(name, annotations.get(name, Any))
    return hints


@dataclass(frozen=True)
class EvalConfig:
    """The ``eval:`` section: the protocols every run is evaluated with.

    Attributes:
        knn: Weighted kNN (:func:`~adapters.evaluation.knn_eval`) on ``layers``, or None.
        linear: Linear probe (:func:`~adapters.evaluation.linear_probe_eval`), or None.
        nonlinear: AET's non-linear probe (:func:`~adapters.evaluation.nonlinear_probe_eval`),
            or None.
        bn_recalibration_images: BatchNorm statistics re-estimated on at most this many clean
            training images (a seeded sample, at least 2) before every protocol; None or 0: not.
    """

    knn: ProbeConfig | None = None
    linear: ProbeConfig | None = None
    nonlinear: ProbeConfig | None = None
    bn_recalibration_images: int | None = 10_000

    KEYS: ClassVar[tuple[str, ...]] = ("knn", "linear", "nonlinear", "bn_recalibration_images")

    @classmethod
    def from_any(cls, data: Mapping[str, Any] | None) -> EvalConfig:
        data = {"knn": {}, **(data or {})}  # kNN on by default (its own defaults fill in)
        unknown = sorted(set(data) - set(cls.KEYS))
        if unknown:
            raise SchemaError(f"unknown key(s) {unknown} in section 'eval'; valid ones: "
                              f"{', '.join(cls.KEYS)}.")
        probes = {kind: None if data.get(kind) is None else ProbeConfig.from_any(kind, data[kind])
                  for kind in ProbeConfig.PROTOCOLS}
        images = check_value(data.get("bn_recalibration_images", 10_000), int | None,
                             "eval.bn_recalibration_images")
        if images is not None and (images < 0 or images == 1):
            raise SchemaError(f"eval.bn_recalibration_images={images} must be 0 or null (off), "
                              "or at least 2: BatchNorm estimates a variance from a batch.")
        return cls(**probes, bn_recalibration_images=images)

    def to_dict(self) -> dict[str, Any]:
        return {"knn": self.knn and self.knn.to_dict(),
                "linear": self.linear and self.linear.to_dict(),
                "nonlinear": self.nonlinear and self.nonlinear.to_dict(),
                "bn_recalibration_images": self.bn_recalibration_images}


@dataclass(frozen=True)
class MethodSection:
    """The ``method:`` section: a registered method and its hyperparameters.

    Attributes:
        name: A key of :data:`adapters.methods.METHODS`.
        config: Its validated hyperparameters (the method's ``Config``).
        options: The hyperparameters as written (the plain form keeps them so).
    """

    name: str
    config: MethodConfig
    options: Mapping[str, Any]

    @classmethod
    def from_any(cls, data: Mapping[str, Any] | None) -> MethodSection:
        if not isinstance(data, Mapping) or not data.get("name"):
            raise SchemaError(f"method.name is required (one of: {', '.join(METHODS)}).")
        options = {k: v for k, v in data.items() if k != "name"}
        method = method_class(data["name"])
        config = method.Config.from_any(options, where=f"method {method.name!r}")
        return cls(method.name, config, copy.deepcopy(options))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **plain(self.options)}


@dataclass(frozen=True)
class BackboneSection:
    """The ``backbone:`` section: a registered backbone and its keyword arguments.

    Attributes:
        name: A key of :data:`adapters.backbones.BACKBONES`.
        options: Its keyword arguments (e.g. ``width: 0.25``), as written.
    """

    name: str = "alexnet_cifar"
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_any(cls, data: Mapping[str, Any] | None) -> BackboneSection:
        data = {"name": "alexnet_cifar", **(data or {})}
        if not data["name"]:
            raise SchemaError(f"backbone.name is required (one of: {', '.join(BACKBONES)}).")
        options = {k: v for k, v in data.items() if k != "name"}
        backbone_class(data["name"])  # a ValueError listing the names
        check_backbone_arguments(data["name"], options)  # a TypeError listing the arguments
        return cls(data["name"], copy.deepcopy(options))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **plain(self.options)}


@dataclass(frozen=True)
class ReconSection:
    """The ``recon:`` block: where the objective taps the backbone and its settings.

    The tap keys (``layer``, ``prefix_tokens``, ``grid``, ``layout``) are ``recon_aux.attach``'s
    keyword arguments; every other key is a :class:`recon_aux.ReconAuxConfig` field.

    Attributes:
        layer: The tapped layer(s) (None: ``recon_aux``'s rule, the last block or conv).
        tap: The tap keywords as given (``prefix_tokens``, ``grid``, ``layout``).
        config: The objective's settings (:class:`recon_aux.ReconAuxConfig`).
        options: The block as written.
    """

    layer: str | tuple[str, ...] | None
    tap: Mapping[str, Any]
    config: ReconAuxConfig
    options: Mapping[str, Any]

    #: Keys that go to ``recon_aux.attach`` as keywords, with their types.
    TAP_KEYS: ClassVar[dict[str, Any]] = {
        "layer": str | tuple[str, ...] | None, "prefix_tokens": int | None,
        "grid": tuple[int, int] | None, "layout": str | None}

    @classmethod
    def from_any(cls, data: Mapping[str, Any]) -> ReconSection:
        if not isinstance(data, Mapping):
            raise SchemaError(f"recon must be null or a mapping, got {data!r}.")
        tap = {key: check_value(data.get(key), hint, f"recon.{key}")
               for key, hint in cls.TAP_KEYS.items() if key in data}
        config = ReconAuxConfig.from_any({k: v for k, v in data.items()
                                          if k not in cls.TAP_KEYS})
        layer = tap.pop("layer", None)
        return cls(layer, tap, config, copy.deepcopy(dict(data)))

    def to_dict(self) -> dict[str, Any]:
        return plain(self.options)


#: The sections of a run config, in order.
SECTIONS = ("method", "backbone", "data", "train", "eval", "recon", "run")


@dataclass(frozen=True)
class RunConfig:
    """A validated run config (see the module docstring for the sections).

    Attributes:
        name: The config's name (the YAML file's stem), used for default output folders.
        method, backbone, data, train, eval, recon, run: The sections; ``recon`` is None for
            the base method.

    Example:
        >>> cfg = load_run_config({"method": {"name": "sela", "k": 10}})
        >>> cfg.method.config.k, cfg.train.epochs, cfg.recon is None
        (10, 1, True)
        >>> cfg.with_run(progress=False).run.progress
        False
    """

    name: str
    method: MethodSection
    backbone: BackboneSection
    data: DataConfig
    train: TrainConfig
    eval: EvalConfig
    recon: ReconSection | None
    run: RunSettings

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = "run") -> RunConfig:
        """Validate a mapping of sections and fill in the defaults.

        Raises:
            RunConfigError: Naming the section, the key and what is valid.
        """
        if not isinstance(data, Mapping):
            raise RunConfigError(f"a run config is a mapping of sections, got {data!r}.")
        unknown = sorted(set(data) - set(SECTIONS) - {"name"})
        if unknown:
            raise RunConfigError(f"unknown top-level section(s) {unknown}; valid: "
                                 f"{', '.join(SECTIONS)}.{other_command_hint(unknown, 'train')}")
        parts: dict[str, Any] = {}
        builders: dict[str, Callable[[Any], Any]] = {
            "method": MethodSection.from_any,
            "backbone": BackboneSection.from_any,
            "data": DataConfig.from_any,
            "train": TrainConfig.from_any,
            "eval": EvalConfig.from_any,
            "recon": lambda d: None if d is None else ReconSection.from_any(d),
            "run": RunSettings.from_any,
        }
        for section, build in builders.items():
            try:
                parts[section] = build(data.get(section))
            except (SchemaError, ConfigError, ValueError, TypeError) as exc:
                raise RunConfigError(str(exc)) from exc
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise RunConfigError(f"config name {name!r} is not a plain name: it names the run "
                                 "folder runs/<name>/...; use a name without '/' or '..'.")
        return cls(name=name, **parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, scalars) for JSON and ``weights_only`` checkpoints."""
        out = {s: None if getattr(self, s) is None else getattr(self, s).to_dict()
               for s in SECTIONS}
        out["name"] = self.name
        return out

    def with_run(self, **changes: Any) -> RunConfig:
        """A copy with ``run.<key>`` replaced (checked like the section)."""
        return dataclasses.replace(self, run=RunSettings.from_any(self.run, **changes))

    def override(self, *items: str) -> RunConfig:
        """A copy with dotted overrides applied, e.g. ``cfg.override("train.epochs=2")``."""
        return load_run_config(self.to_dict(), items, name=self.name)

    def ineffective(self) -> list[str]:
        """The settings that cannot take effect in this run, each with what to change.

        They are not errors: a short override of a long recipe (``train.epochs=2`` on a config
        with ``milestones: [160, 240]``) is a legitimate smoke run. The engine warns of them
        (:class:`IneffectiveSettingWarning`) before the first step. A run with no epochs (the
        untrained reference) trains nothing, so its training settings are not listed.

        Example:
            >>> cfg = load_run_config({"method": {"name": "supervised"}, "train": {
            ...     "epochs": 2, "lr_schedule": "step", "milestones": [1, 5]}})
            >>> cfg.ineffective()  # doctest: +NORMALIZE_WHITESPACE
            ['train.milestones [5] are at or after train.epochs=2: the learning rate never
              drops there (a milestone m takes effect from epoch m+1 on)']
        """
        t, r, found = self.train, self.run, []
        if t.epochs > 0:
            if t.milestones and t.lr_schedule != "step":
                found.append(f"train.milestones {list(t.milestones)} are read by "
                             f"train.lr_schedule=step only, not by {t.lr_schedule}")
            elif t.lr_schedule == "step" and not t.milestones:
                found.append("train.lr_schedule=step without train.milestones keeps the "
                             "learning rate constant; give the epochs at which it drops")
            late = [m for m in t.milestones if m >= t.epochs]
            if late and t.lr_schedule == "step":
                found.append(f"train.milestones {late} are at or after train.epochs="
                             f"{t.epochs}: the learning rate never drops there (a milestone m "
                             "takes effect from epoch m+1 on)")
            if r.stop_after_epoch is not None and r.stop_after_epoch >= t.epochs:
                found.append(f"run.stop_after_epoch={r.stop_after_epoch} is not before "
                             f"train.epochs={t.epochs}: the run ends without stopping")
            elif r.stop_after_epoch is not None and not r.save_checkpoints:
                found.append(f"run.stop_after_epoch={r.stop_after_epoch} with "
                             "run.save_checkpoints=false leaves no checkpoint: a resume starts "
                             "from scratch")
        probe = self.eval.nonlinear
        if probe is not None:
            epochs, milestones = probe.settings.epochs, probe.settings.milestones or ()
            late = [m for m in milestones if m >= epochs]
            if late:
                found.append(f"eval.nonlinear.milestones {late} are at or after "
                             f"eval.nonlinear.epochs={epochs}: the probe's learning rate never "
                             "drops there")
        return found


#: The top-level key that only one command's configs have, and that command.
COMMAND_KEYS = {"methods": "bench", "axes": "ablate"}


def other_command_hint(unknown: Sequence[str], command: str) -> str:
    """For the unknown top-level keys of a config given to ``command``: a sentence naming the
    command the config is for, when one of them says so (:data:`COMMAND_KEYS`), else ""."""
    key = next((k for k in unknown if COMMAND_KEYS.get(k, command) != command), None)
    return ("" if key is None else f" Its '{key}' says it is a config for recon-aux "
            f"{COMMAND_KEYS[key]}: run it with that.")


def read_yaml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file is an empty mapping).

    Raises:
        RunConfigError: The file is missing or unreadable, is not valid YAML (the line and
            column are named), or does not hold a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise RunConfigError(f"{what} file {path} does not exist"
                             + (" (it is a folder)." if path.is_dir() else "."))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise RunConfigError(f"cannot read {what} file {path}: {exc}.") from None
    try:
        raw = safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise RunConfigError(f"{what} file {path} is not valid YAML: "
                             f"{yaml_problem(exc)}.") from None
    if not isinstance(raw, dict):
        raise RunConfigError(f"{path} must hold a mapping of sections.")
    return raw


def yaml_problem(exc: yaml.YAMLError) -> str:
    """One line saying what is wrong in a YAML text and where (line and column, from 1)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{problem}{where}"


def apply_overrides(cfg: Mapping[str, Any], overrides: Sequence[str],
                    sections: Collection[str] | None = SECTIONS) -> dict[str, Any]:
    """Apply ``["train.epochs=3", "recon=null", ...]`` to a copy of ``cfg``.

    Values are YAML (``safe_load``); a dotted key creates the sections it names. ``sections``:
    the valid top-level keys (an unknown one is an error that lists them); None: any.
    """
    cfg = copy.deepcopy(dict(cfg))
    for item in overrides:
        if "=" not in item:
            raise RunConfigError(f"override {item!r} is not key=value (e.g. train.epochs=3).")
        key, raw = item.split("=", 1)
        try:
            value = safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise RunConfigError(f"override {item!r}: the value is not valid YAML "
                                 f"({yaml_problem(exc)}).") from None
        parts = key.strip().split(".")
        if sections is not None and parts[0] not in sections:
            raise RunConfigError(f"override {item!r}: unknown top-level section {parts[0]!r}; "
                                 f"valid: {sorted(sections)}.")
        node = cfg
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}  # a section absent (or recon: null) in the file
            if not isinstance(node.get(part), dict):
                raise RunConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a "
                                     "section.")
            node = node[part]
        node[parts[-1]] = value
    return cfg


def load_run_config(source: str | Path | Mapping[str, Any], overrides: Sequence[str] = (),
                    name: str | None = None) -> RunConfig:
    """Read a run config (a YAML path or a mapping), apply overrides, validate, fill defaults.

    Args:
        source: The YAML file, or its mapping of sections.
        overrides: Dotted ``key=value`` items (see :func:`apply_overrides`).
        name: The config's name (default: the file's stem; for a mapping its ``name`` entry,
            else ``"run"``).

    Raises:
        RunConfigError: What is wrong and what is valid.
    """
    if isinstance(source, Mapping):  # a plain form (RunConfig.to_dict) keeps its name
        raw = dict(source)
        stem = raw.pop("name", None) or "run"
    else:
        raw = read_yaml(source)
        raw.pop("name", None)
        stem = Path(source).stem
        _check_file_out_dir(raw, source)
    return RunConfig.from_dict(apply_overrides(raw, overrides), name=name or stem)


def _check_file_out_dir(raw: Mapping[str, Any], source: str | Path) -> None:
    """A config file may name its run folder only below the working directory (a relative path
    without ``..``): ``run.overwrite`` deletes a run's files there. Anywhere else is the
    command line's to say (``--out-dir``, or the override ``run.out_dir=DIR``)."""
    run = raw.get("run")
    out_dir = run.get("out_dir") if isinstance(run, Mapping) else None
    if isinstance(out_dir, str) and (Path(out_dir).is_absolute() or ".." in Path(out_dir).parts):
        raise RunConfigError(
            f"{source}: run.out_dir={out_dir!r} leaves the working directory; a config file may "
            "name only a folder below it (e.g. runs/mine). Give any other folder on the command "
            "line: --out-dir DIR (or the override run.out_dir=DIR).")


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}`` (empty mappings stay values)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(a: Mapping[str, Any] | RunConfig, b: Mapping[str, Any] | RunConfig,
                ignore: tuple[str, ...] = ("run.", "name", "data.download", "data.prefetch"),
                ) -> list[str]:
    """Dotted keys whose values differ between two configs' plain forms (``run.*``,
    ``data.download`` and ``data.prefetch``, which change where things go or come from or when,
    not the run, are ignored; a key of :data:`NEUTRAL_DEFAULTS` missing from one side reads as
    its neutral value)."""
    fa, fb = (flatten(c.to_dict() if isinstance(c, RunConfig) else c) for c in (a, b))
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if not k.startswith(ignore) and
            fa.get(k, NEUTRAL_DEFAULTS.get(k, "<absent>")) !=
            fb.get(k, NEUTRAL_DEFAULTS.get(k, "<absent>"))]
