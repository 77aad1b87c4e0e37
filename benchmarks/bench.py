"""``recon-aux bench``: methods x {base, +recon} x seeds, with reference rows.

``bench CONFIG`` runs the matrix methods x {base, +recon} x seeds, plus the reference rows
(random-init, supervised, recon-only) on the same backbone and data, evaluates every run with the
shared protocols, and writes ``benchmarks/results/<name>/`` (see :mod:`benchmarks.matrix`):
``results.json``, ``README.md`` (the table, the paper's numbers, the caveats), reconstruction
grids and training curves. Finished runs are skipped on a re-run, so an interrupted matrix
resumes.

Bench config (YAML; run config paths are relative to this file's folder)::

    title: Quick look                         # README title
    seeds: [0]
    metrics: [knn_conv5, knn_fc7]             # table columns
    recon: {weight: 1.0, net: alex}           # the +recon block (also used by recon-only)
    common: {train.epochs: 2}                 # dotted overrides for every run
    methods:
      deepcluster: {config: smoke/deepcluster.yaml, set: {data.per_class: 50}}
    references: {deepcluster: [random-init, supervised, recon-only]}
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from adapters.config import RunConfig, RunConfigError
from adapters.schema import check_value

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

__all__ = ["BenchConfig", "load_bench_config", "run_bench"]


@dataclass(frozen=True)
class BenchConfig(MatrixConfig):
    """A bench config (the fields of :class:`~benchmarks.matrix.MatrixConfig` and these).

    Attributes:
        methods: Row name -> the run config it is built from (None: switched off, e.g. by the
            override ``methods.aet=null``).
        references: Row name -> the reference rows planned on its recipe (backbone, data,
            augmentation, optimizer, evaluation). The first row's are the shared ones; a later
            row's reference on the same backbone is its own row ("recon-only (alexnet_cifar,
            aet's recipe)"), and that row's paired differences use it instead of the shared one.
    """

    methods: Mapping[str, RunSource | None] = field(default_factory=dict)
    references: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    KEYS = (*MatrixConfig.KEYS, "methods", "references")


def load_bench_config(path: str | Path, overrides: Sequence[str] = ()) -> BenchConfig:
    """Read a bench config with dotted overrides (``seeds=[0,1]``, ``methods.aet=null``).

    Raises:
        RunConfigError: An unknown key, a bad value, or a run config that does not exist.
    """
    with config_errors():
        return _load_bench_config(path, overrides)


def _load_bench_config(path: str | Path, overrides: Sequence[str]) -> BenchConfig:
    raw, path = load_matrix_config(path, overrides, BenchConfig.KEYS, "bench")
    methods = check_value(raw.get("methods") or {}, dict, "methods")
    if not any(src is not None for src in methods.values()):
        raise RunConfigError("methods names no method to run (e.g. methods: {sela: {config: "
                             "smoke/sela.yaml}}).")
    sources = {plain_name(name, f"a key of methods ({name!r})"):
               None if src is None else RunSource.from_any(src, path.parent, f"methods.{name}")
               for name, src in methods.items()}
    references = check_value(raw.get("references") or {}, dict, "references")
    refs = {name: check_value(rows, tuple[str, ...], f"references.{name}")
            for name, rows in references.items()}
    for name, rows in refs.items():
        if name not in sources:
            raise RunConfigError(f"references.{name}: no method {name!r} in methods "
                                 f"({', '.join(sources)}).")
        unknown = [row for row in rows if row not in REFERENCE_ROWS]
        if unknown:
            raise RunConfigError(f"references.{name}: unknown reference row(s) {unknown}; "
                                 f"rows: {', '.join(REFERENCE_ROWS)}.")
    return BenchConfig(**MatrixConfig.parse(raw, path), methods=sources, references=refs)


def trained_rows(cfg: BenchConfig, seed: int) -> Iterator[tuple[str, str, RunConfig]]:
    """(method, "base" or "recon", run config) of every trained row of ``cfg`` for ``seed``."""
    common = [*dotted(cfg.common), f"train.seed={seed}"]
    for method, src in cfg.methods.items():
        if src is None:  # switched off on the command line: methods.aet=null
            continue
        for variant in ("base", "recon"):
            final = ([f"recon={json.dumps(cfg.recon or {})}"] if variant == "recon"
                     else ["recon=null"])
            yield method, variant, src.run_config(common, cfg.name, final)


def run_bench(cfg: BenchConfig, out: Path | None = None, progress: bool | None = None,
              replace_changed: bool = False, report_only: bool = False,
              merge: Path | None = None, reuse_folder: bool = False,
              supersede_unplanned: bool = False, time_budget: float | None = None,
              jobs: int = 1) -> Path:
    """Run (or resume) a bench config; returns the results folder.

    Args:
        cfg: The bench config.
        out: The results folder (default ``benchmarks/results/<name>``).
        progress: A progress bar over the runs (None: only on a terminal).
        replace_changed: Re-run finished runs whose config changed.
        report_only: Train nothing: write the README from the finished runs (titled PARTIAL
            when some are missing).
        merge: First take the finished runs of another results folder.
        reuse_folder: Accept a results folder made by another config (see
            :class:`~benchmarks.matrix.Matrix`).
        supersede_unplanned: Move finished runs this config does not plan to ``superseded``
            (see :class:`~benchmarks.matrix.Matrix`).
        time_budget: Seconds: start no run expected to end after them (its row's recorded
            time, lengthened as much as this call's runs overran theirs, else the longest run
            so far; see :meth:`~benchmarks.schedule.Budget.expected`).
        jobs: Runs trained at once, each in its own process (see
            :meth:`~benchmarks.matrix.Matrix.execute`).
    """
    check_time_budget(time_budget)  # before the results folder is made
    check_jobs(jobs)
    matrix = Matrix(cfg.name, out, progress, replace_changed, kind="bench",
                    reuse_folder=reuse_folder, supersede_unplanned=supersede_unplanned)
    common = dotted(cfg.common)
    for seed in cfg.seeds:
        for ref_from, rows in cfg.references.items():
            src = cfg.methods.get(ref_from)
            if src is not None:
                add_references(matrix, cfg, src, ref_from, rows, common, seed)
        for method, variant, rc in trained_rows(cfg, seed):
            matrix.add(f"{method}-{variant}-seed{seed}", rc, {"method": method})
    if merge is not None:
        matrix.merge(merge)
    runs = matrix.execute(report_only, time_budget, jobs, cfg.metrics)
    write_report(matrix.out, mark_partial(cfg, matrix), runs)
    return matrix.out
