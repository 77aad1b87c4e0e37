"""``recon-aux ablate``: the auxiliary objective's knobs, one at a time, for one method.

``ablate CONFIG`` varies the knobs around a default +recon block (overall weight including 0,
the L2/LPIPS mix, LPIPS net, resize_to, tapped layer, and the cost knobs lpips_fraction,
lpips_crop, head_max_width, head_out_scale and head_norm, or several keys at once with ``set``)
for one method, with the outputs of ``bench`` (see :mod:`benchmarks.matrix`) plus a plot of
metric vs weight and the paper's Figure 2 (reconstructions trained with L2 only, LPIPS only and
L2 + LPIPS, side by side).

Ablate config (YAML; the run config path is relative to this file's folder)::

    title: Ablation
    seeds: [0, 1]
    metrics: [knn_conv5, linear_conv5]
    method: {config: smoke/aet.yaml, set: {data.per_class: 1000}}
    recon: {weight: 1.0, l2_weight: 1.0, lpips_weight: 1.0, net: alex}   # the default block
    references: [random-init, supervised, recon-only]
    axes: {weight: [0, 0.3, 1, 3], mix: [l2, lpips, l2+lpips], net: [alex, vgg],
           resize_to: [null, 64], layer: [conv4.0, conv5.0]}
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.config import ReconSection, RunConfig, RunConfigError
from adapters.schema import check_value

from . import report
from .matrix import (
    REFERENCE_ROWS,
    Matrix,
    MatrixConfig,
    RunSource,
    add_references,
    config_errors,
    dotted,
    load_matrix_config,
    mark_partial,
    plain_name,
    write_report,
)
from .schedule import check_jobs, check_time_budget

__all__ = ["AblateConfig", "AXES", "MIXES", "load_ablate_config", "run_ablate"]

#: The L2 / LPIPS weights of each value of the ``mix`` axis.
MIXES = {"l2": (1.0, 0.0), "lpips": (0.0, 1.0), "l2+lpips": (1.0, 1.0)}
#: The axes an ablation may vary: ``weight``, ``mix`` and the recon block's keys after them
#: (the cost knobs too, to measure what they do to the representation before one becomes a
#: default; each value is checked by the recon block's rules before any run starts).
AXES = ("weight", "mix", "net", "resize_to", "layer", "lpips_fraction", "lpips_crop",
        "head_max_width", "head_out_scale", "head_norm", "set")
#: ``set``'s values change several keys of the block at once (``{resize_to: 64, lpips_crop: 36}``:
#: a knob that acts only in combination with another).


@dataclass(frozen=True)
class AblateConfig(MatrixConfig):
    """An ablate config (the fields of :class:`~benchmarks.matrix.MatrixConfig` and these).

    Attributes:
        method: The run config of the method being ablated.
        references: Reference rows planned on its backbone, data and evaluation.
        axes: Axis -> the values it takes (the other knobs stay at the ``recon`` block's).
    """

    method: RunSource | None = None
    references: tuple[str, ...] = ()
    axes: Mapping[str, list[Any]] = field(default_factory=dict)

    KEYS = (*MatrixConfig.KEYS, "method", "references", "axes")


def load_ablate_config(path: str | Path, overrides: Sequence[str] = ()) -> AblateConfig:
    """Read an ablate config with dotted overrides (``seeds=[0]``, ``axes.net=[alex]``).

    Raises:
        RunConfigError: An unknown key or axis, a bad value, or a missing run config.
    """
    with config_errors():
        return _load_ablate_config(path, overrides)


def _load_ablate_config(path: str | Path, overrides: Sequence[str]) -> AblateConfig:
    raw, path = load_matrix_config(path, overrides, AblateConfig.KEYS, "ablate")
    axes = check_value(raw.get("axes") or {}, dict, "axes")
    if not axes:
        raise RunConfigError(f"axes names no axis to vary; axes: {', '.join(AXES)} (e.g. axes: "
                             "{weight: [0, 1]}).")
    for axis, values in axes.items():
        if axis not in AXES:
            raise RunConfigError(f"unknown axis {axis!r}; axes: {', '.join(AXES)}.")
        check_value(values, list, f"axes.{axis}")
        if not values:
            raise RunConfigError(f"axes.{axis} is empty; give the values it takes.")
        if axis == "mix" and [v for v in values if not isinstance(v, str) or v not in MIXES]:
            raise RunConfigError(f"axes.mix: {[v for v in values if v not in MIXES]} not among "
                                 f"{', '.join(MIXES)}.")
        if axis == "set" and [v for v in values if not isinstance(v, dict) or not v
                              or {"weight", "l2_weight", "lpips_weight"} & set(v)]:
            raise RunConfigError(f"axes.set={values}: each value is a mapping of recon keys to "
                                 "change together (e.g. {resize_to: 64, lpips_crop: 36}); the "
                                 "weights have their own axes, weight and mix.")
        if axis == "weight" and [v for v in values if isinstance(v, bool)
                                 or not isinstance(v, (int, float)) or not v >= 0]:
            raise RunConfigError(f"axes.weight={values} must be numbers >= 0 (0: the base "
                                 "method).")
    references = check_value(raw.get("references") or (), tuple[str, ...], "references")
    unknown = [row for row in references if row not in REFERENCE_ROWS]
    if unknown:
        raise RunConfigError(f"references: unknown reference row(s) {unknown}; rows: "
                             f"{', '.join(REFERENCE_ROWS)}.")
    return AblateConfig(
        **MatrixConfig.parse(raw, path),
        method=RunSource.from_any(raw.get("method"), path.parent, "method"),
        references=references, axes=axes)


def run_ablate(cfg: AblateConfig, out: Path | None = None, progress: bool | None = None,
               replace_changed: bool = False, report_only: bool = False,
               merge: Path | None = None, reuse_folder: bool = False,
               supersede_unplanned: bool = False, time_budget: float | None = None,
               jobs: int = 1) -> Path:
    """Run (or resume) an ablation config; returns the results folder (the arguments as
    :func:`benchmarks.bench.run_bench`'s)."""
    check_time_budget(time_budget)  # before the results folder is made
    check_jobs(jobs)
    matrix = Matrix(cfg.name, out, progress, replace_changed, kind="ablate",
                    reuse_folder=reuse_folder, supersede_unplanned=supersede_unplanned)
    common = dotted(cfg.common)
    default = dict(cfg.recon or {})
    first_id: dict[str, str] = {}  # run config hash -> id of the run that computes it
    aliases: dict[str, tuple[str, dict]] = {}  # id shown on another axis -> (run id, ablation)
    main_keys: set[str] = set()  # the base (weight 0) and default +recon points: the main table
    for seed in cfg.seeds:
        if cfg.references:
            add_references(matrix, cfg, cfg.method, "method", cfg.references, common, seed)
        default_key = _point_key(cfg.method.run_config(
            [*common, f"train.seed={seed}"], cfg.name, [f"recon={json.dumps(default)}"]), seed)
        for axis, values in cfg.axes.items():
            for value in values:
                recon = copy.deepcopy(default)
                if axis == "weight" and value == 0:
                    recon = None  # weight 0 is the base method, not a head that trains alone
                elif axis == "mix":
                    recon["l2_weight"], recon["lpips_weight"] = MIXES[value]
                elif axis == "set":
                    recon.update(value)
                else:
                    recon[axis] = value
                rc = cfg.method.run_config([*common, f"train.seed={seed}"], cfg.name,
                                           [f"recon={json.dumps(recon)}"])
                key = _point_key(rc, seed)
                run_id = plain_name(f"{axis}={_shown(value)}-seed{seed}".replace("/", "_")
                                    .replace(" ", ""), f"axes.{axis} value {value!r}")
                if recon is None or key == default_key:  # head_out_scale=2 is the default too
                    main_keys.add(key)
                if key in first_id:  # the default point appears on every axis: run it once
                    aliases[run_id] = (first_id[key], {axis: value})
                    continue
                first_id[key] = run_id
                matrix.add(run_id, rc, {"method": rc.method.name, "ablation": {axis: value}})
    if merge is not None:
        matrix.merge(merge)
    runs = matrix.execute(report_only, time_budget, jobs, cfg.metrics)
    cfg = mark_partial(cfg, matrix)
    unique = list(runs)  # each trained run once (the setup line sums their run times)
    by_id = {r["id"]: r for r in runs}
    pictures = matrix.out / "pictures"
    for alias, (target, ablation) in aliases.items():
        if target in by_id:
            runs.append({**by_id[target], "id": alias, "ablation": ablation})
            if (pictures / f"{target}.png").is_file():
                (pictures / f"{alias}.png").write_bytes((pictures / f"{target}.png").read_bytes())
    main_ids = {first_id[k] for k in main_keys}
    table = [r for r in runs if r.get("reference") or r["id"] in main_ids]
    _write_ablation_report(matrix.out, cfg, runs, table, unique)
    return matrix.out


def _point_key(rc: RunConfig, seed: int) -> str:
    """What makes two points of the grid the same run: their recon blocks with every default
    filled in (:func:`_recon_key`), and the seed."""
    return hashlib.sha256(json.dumps([_recon_key(rc.recon), seed],
                                     sort_keys=True).encode()).hexdigest()


def _recon_key(recon: ReconSection | None) -> dict[str, Any] | None:
    """The recon block with every default filled in, so that ``resize_to: null`` and a block
    without ``resize_to`` are recognised as the same run."""
    if recon is None:
        return None
    return {**recon.config.to_dict(), "layer": recon.options.get("layer")}


def _axis_value(run: dict[str, Any], axis: str):
    abl = run.get("ablation") or {}
    return abl.get(axis)


def _on_axis(run: dict[str, Any], axis: str, value: Any) -> bool:
    """Whether ``run`` is the ``axis=value`` point (``value`` may be None: resize_to=None)."""
    abl = run.get("ablation") or {}
    return axis in abl and abl[axis] == value


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return "+".join(f"{k}={_shown(v)}" for k, v in value.items())
    return "+".join(map(str, value)) if isinstance(value, list) else str(value)


def _write_ablation_report(out: Path, cfg: AblateConfig, runs: list[dict[str, Any]],
                           table: list[dict[str, Any]],
                           unique: list[dict[str, Any]] | None = None) -> None:
    """The README: ``table`` (references, the base method = weight 0, the default +recon block)
    as the main table, then one section per axis over ``runs``, the weight plot and Figure 2."""
    metrics = list(cfg.metrics or sorted({m for r in runs for m in r["metrics"]
                                          if not m.startswith("final")}))
    sections, pictures = [], []
    # each setting against the base method (weight 0) and recon-only of the same seed
    against = {"base": {r["seed"]: r for r in runs if not r.get("reference") and not r["recon"]},
               "recon-only": {r["seed"]: r for r in runs
                              if (r.get("reference") or "").startswith("recon-only")}}

    def paired(sel: list[dict[str, Any]], ref: dict[int, dict[str, Any]]) -> str:
        cells = []
        for m in metrics:
            diffs = [r["metrics"][m] - ref[r["seed"]]["metrics"][m] for r in sel
                     if r["seed"] in ref and m in r["metrics"] and m in ref[r["seed"]]["metrics"]]
            if not diffs:
                cells.append("-")
                continue
            p = report.paired(diffs, "better", "worse")  # the tables' "clear" rule
            cells.append(f"{p['mean']:+.1f}" + ("*" if p["clear"] else ""))
        return " / ".join(cells)

    for axis, values in cfg.axes.items():
        rows = []
        for value in values:
            sel = [r for r in runs if _on_axis(r, axis, value)]
            cells = []
            for m in metrics:
                vals = [r["metrics"][m] for r in sel if m in r["metrics"]]
                mean, std = report.mean_std(vals)
                cells.append("-" if not vals else
                             (f"{mean:.1f} ± {std:.1f}" if len(vals) > 1 else f"{mean:.1f}"))
            cells += [paired(sel, against["base"]), paired(sel, against["recon-only"])]
            rows.append(f"| {axis}={_shown(value)} | " + " | ".join(cells)
                        + f" | {len(sel)} |")
        sections.append(f"### {axis}\n\n| setting | " + " | ".join(metrics)
                        + " | − base (paired) | − recon-only (paired) | seeds |\n|---|"
                        + "---|" * (len(metrics) + 3) + "\n" + "\n".join(rows) + "\n")
    if "weight" in cfg.axes:
        points = {m: [(float(_axis_value(r, "weight")), r["metrics"][m]) for r in runs
                      if _axis_value(r, "weight") is not None and m in r["metrics"]]
                  for m in metrics}
        if report.plot_ablation(points, out / "metric_vs_weight.png", "recon weight",
                                "top-1 %"):
            pictures.append("metric_vs_weight.png")
    local: tuple[str, ...] = ()
    if "mix" in cfg.axes:
        _figure2(out, cfg)  # drawn where the pictures are; named either way (a fresh clone)
        local = ("figure2.png",)
    notes = ("\n## Ablation (one knob at a time around the default +recon block)\n\n"
             "The table above holds the reference rows, the base method (weight 0) and the "
             "default +recon block; every setting of every axis follows, with its mean paired "
             "difference (same seed) to the base method and to recon-only, one number per "
             f"metric in the order {' / '.join(metrics)}; * marks a difference larger than "
             "its std over seeds.\n\n"
             + "\n".join(sections)
             + "\nweight=0 is the base method (recon: null). The default point is run once and "
               "shown on every axis.\n")
    write_report(out, cfg, table, extra_notes=notes, extra_pictures=tuple(pictures),
                 all_runs=runs if unique is None else unique, extra_local_pictures=local)


def _figure2(out: Path, cfg: AblateConfig) -> bool:
    """The paper's Figure 2: reconstructions with L2 only, LPIPS only, L2 + LPIPS."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.image as mpimg
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    seed = cfg.seeds[0]
    panels = []
    for mix in ("l2", "lpips", "l2+lpips"):
        pic = out / "pictures" / f"mix={mix}-seed{seed}.png"
        if pic.is_file():
            panels.append((mix, mpimg.imread(pic)))
    if len(panels) < 2:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 2.6))
    for ax, (mix, img) in zip(axes, panels):
        ax.imshow(img)
        ax.set_title(f"trained with {mix.upper().replace('+', ' + ')}", fontsize=9)
        ax.axis("off")
    fig.suptitle("inputs (rows 1, 3) and reconstructions (rows 2, 4)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "figure2.png", dpi=120)
    plt.close(fig)
    return True
