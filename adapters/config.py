"""Run configs: one YAML file per run, dotted ``key=value`` overrides, validation.

Schema (every section but ``method`` has defaults; see :data:`DEFAULTS`)::

    method:   {name: deepcluster | sela | aet, ...the method's hyperparameters...}
    backbone: {name: alexnet_cifar | alexnet | nin, ...its keyword arguments...}
    data:     {dataset, root, per_class, test_per_class, batch_size, augment, eval_batch_size,
               resize (side length the loader resizes/crops images to, e.g. 224)}
    train:    {epochs, lr, momentum, weight_decay, nesterov, lr_schedule, milestones, gamma,
               seed, device, threads}
    eval:     {knn: {layers, k, temperature} | null,
               linear: {layer, recipe (standardized | reglog), epochs, ...} | null,
               nonlinear: {layer, epochs, ...} | null,
               bn_recalibration_images: N | null (BatchNorm statistics re-estimated on at most
               N clean training images, a seeded random sample, before every protocol)}
    recon:    null (the base method) | {layer, ...recon_aux.ReconAuxConfig fields...}
    run:      {out_dir, resume, progress, save_checkpoints, stop_after_epoch}

``run.stop_after_epoch: k`` ends the process after epoch k as a kill would (the checkpoint is
complete); ``run.resume: true`` continues it. ``run.*`` keys may differ between a checkpoint and
the config that resumes it; any other difference is refused.

Overrides use dots: ``train.epochs=3``, ``recon=null``, ``recon.weight=0.5``; values are parsed
as YAML (``safe_load``), so ``[conv5, fc7]`` is a list and ``null`` is None.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from recon_aux import ReconAuxConfig

__all__ = ["DEFAULTS", "RunConfigError", "load_run_config", "apply_overrides", "config_diff"]

DEFAULTS: dict[str, Any] = {
    "method": {},
    "backbone": {"name": "alexnet_cifar"},
    "data": {
        "dataset": "cifar10", "root": None, "per_class": None, "test_per_class": None,
        "batch_size": 128, "augment": None, "eval_batch_size": 500, "resize": None,
    },
    "train": {
        "epochs": 1, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": False,
        "lr_schedule": "constant", "milestones": [], "gamma": 0.1, "seed": 0, "device": "auto",
        "threads": None,
    },
    "eval": {"knn": {"layers": ["conv5"], "k": 200, "temperature": 0.1}, "linear": None,
             "nonlinear": None, "bn_recalibration_images": 10_000},
    "recon": None,
    "run": {"out_dir": None, "resume": False, "progress": None, "save_checkpoints": True,
            "stop_after_epoch": None},
}
# Sections whose keys are free (passed to the method, the backbone, the probes).
FREE_SECTIONS = {"method", "backbone"}
SCHEDULES = ("constant", "cosine", "step")


class RunConfigError(ValueError):
    """A run config has an unknown key, a missing required key or a bad value."""


def _merge(base: dict, update: Mapping, path: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        where = f"{path}{key}"
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, where + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_overrides(cfg: dict, overrides: Sequence[str]) -> dict:
    """Apply ``["train.epochs=3", "recon=null", ...]`` to a copy of ``cfg``."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise RunConfigError(f"override {item!r} is not key=value (e.g. train.epochs=3).")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise RunConfigError(f"override {item!r}: value is not valid YAML ({exc}).") from exc
        parts = key.strip().split(".")
        if parts[0] not in DEFAULTS:
            raise RunConfigError(f"override {item!r}: unknown top-level section {parts[0]!r}; "
                                 f"valid: {sorted(DEFAULTS)}.")
        node = cfg
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None and i == 0:
                node[part] = {}  # a section absent (or recon: null) in the file
            if not isinstance(node.get(part), dict):
                raise RunConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a "
                                     "section.")
            node = node[part]
        node[parts[-1]] = value
    return cfg


def validate(cfg: dict) -> dict:
    """Check sections and keys; return the config with defaults filled in."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise RunConfigError(f"unknown top-level section(s) {unknown}; valid: {sorted(DEFAULTS)}.")
    full = _merge(DEFAULTS, {k: v for k, v in cfg.items() if k != "recon"})
    full["recon"] = copy.deepcopy(cfg.get("recon"))
    for section, defaults in DEFAULTS.items():
        if section in FREE_SECTIONS or not isinstance(defaults, dict):
            continue
        value = full[section]
        if not isinstance(value, dict):
            raise RunConfigError(f"section {section!r} must be a mapping, got {value!r}.")
        extra = sorted(set(value) - set(defaults))
        if extra:
            raise RunConfigError(f"unknown key(s) {extra} in section {section!r}; valid: "
                                 f"{sorted(defaults)}.")
    if not isinstance(full["method"], dict) or not full["method"].get("name"):
        raise RunConfigError("method.name is required (deepcluster, sela or aet).")
    if not full["backbone"].get("name"):
        raise RunConfigError("backbone.name is required (alexnet_cifar, alexnet or nin).")
    train = full["train"]
    if train["lr_schedule"] not in SCHEDULES:
        raise RunConfigError(f"train.lr_schedule={train['lr_schedule']!r} is not one of "
                             f"{SCHEDULES}.")
    for key in ("epochs", "seed"):
        if not isinstance(train[key], int) or isinstance(train[key], bool) or train[key] < 0:
            raise RunConfigError(f"train.{key} must be a non-negative int, got {train[key]!r}.")
    if not isinstance(full["data"]["batch_size"], int) or full["data"]["batch_size"] < 1:
        raise RunConfigError(f"data.batch_size must be a positive int, got "
                             f"{full['data']['batch_size']!r}.")
    recon = full["recon"]
    if recon is not None:
        if not isinstance(recon, dict):
            raise RunConfigError(f"recon must be null or a mapping, got {recon!r}.")
        fields = {k: v for k, v in recon.items() if k != "layer"}
        ReconAuxConfig.from_any(fields)  # raises ConfigError naming the key
    return full


def load_run_config(path: str | Path | Mapping, overrides: Sequence[str] = ()) -> dict:
    """Read a run config (YAML path or dict), apply overrides, validate, fill defaults.

    The returned dict has a ``"name"`` entry: the YAML file's stem (or ``"run"``).
    """
    if isinstance(path, Mapping):
        raw, name = dict(path), "run"
    else:
        path = Path(path)
        if not path.is_file():
            raise RunConfigError(f"config file {path} does not exist.")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise RunConfigError(f"{path} must hold a mapping of sections.")
        name = path.stem
    raw.pop("name", None)
    cfg = validate(apply_overrides(raw, overrides))
    cfg["name"] = name
    return cfg


def flatten(cfg: Mapping, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(a: Mapping, b: Mapping, ignore: tuple[str, ...] = ("run.", "name")) -> list[str]:
    """Dotted keys whose values differ between two configs (``run.*`` ignored)."""
    fa, fb = flatten(a), flatten(b)
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if not k.startswith(ignore) and fa.get(k, "<absent>") !=
            fb.get(k, "<absent>")]
