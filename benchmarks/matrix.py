"""What ``bench`` and ``ablate`` share: their config's common part, the planned runs, the
results file, and the README.

A :class:`Matrix` is a list of planned runs (id, run config, row metadata), a results folder
(``benchmarks/results/<name>/`` by default) and the loop that trains the runs not finished yet.
Everything a matrix writes goes under that folder: ``results.json`` (one entry per finished
run), ``runs/<id>/`` (each run's checkpoint, log and pictures), ``pictures/<id>.png``, the
README, curves and plots. A re-run skips finished runs, so an interrupted matrix resumes; a
finished run whose config changed is never silently reused.

Config paths: a bench or ablate config names run configs (``config: smoke/sela.yaml``); such a
path is relative to the folder of the config that names it (an absolute path is used as is).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.config import (
    RunConfig,
    RunConfigError,
    apply_overrides,
    config_diff,
    load_run_config,
    read_yaml,
)
from adapters.engine import train
from adapters.progress import progress
from adapters.schema import check_value

from . import report

__all__ = ["RESULTS", "MatrixConfig", "RunSource", "Matrix", "REFERENCE_ROWS",
           "load_matrix_config", "add_references", "write_report", "mark_partial", "dotted"]

#: Where results go by default: ``benchmarks/results/<config name>/`` of this checkout.
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class RunSource:
    """A run config a row is built from: its YAML file and the dotted overrides it adds.

    Attributes:
        config: The run config file (resolved against the folder of the config naming it).
        set: Dotted keys and values applied on top of it, e.g. ``{data.per_class: 100}``.
    """

    config: Path
    set: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_any(cls, data: Any, base: Path, where: str) -> RunSource:
        if not isinstance(data, Mapping) or "config" not in data:
            raise RunConfigError(f"{where} must be a mapping with a 'config' run config file "
                                 f"(and optional 'set' overrides), got {data!r}.")
        unknown = sorted(set(data) - {"config", "set"})
        if unknown:
            raise RunConfigError(f"unknown key(s) {unknown} in {where}; valid ones: config, set.")
        path = base / check_value(data["config"], str, f"{where}.config")
        if not path.is_file():
            raise RunConfigError(f"{where}.config: no run config at {path} (paths are relative "
                                 f"to the folder of the config that names them, {base}).")
        overrides = check_value(data.get("set") or {}, dict, f"{where}.set")
        return cls(path, dict(overrides))

    def run_config(self, extra: Sequence[str], name: str, final: Sequence[str] = ()) -> RunConfig:
        """The run config with overrides: ``extra``, then this source's ``set``, then ``final``
        (what defines the row: base/+recon, a reference's epochs or method)."""
        return load_run_config(self.config, [*extra, *dotted(self.set), *final], name=name)


@dataclass(frozen=True)
class MatrixConfig:
    """What a bench and an ablate config have in common.

    Attributes:
        name: The config's name (its file's stem): the results folder's name.
        path: The config file (run config paths are relative to its folder).
        title: The README's title.
        seeds: Every row runs once per seed.
        metrics: The table's columns (default: every metric the runs report).
        recon: The +recon block (also the recon-only reference row's).
        common: Dotted overrides applied to every run.
        notes: Markdown added to the README.
    """

    name: str
    path: Path
    title: str
    seeds: tuple[int, ...] = (0,)
    metrics: tuple[str, ...] | None = None
    recon: dict[str, Any] | None = None
    common: dict[str, Any] | None = None
    notes: str = ""

    #: Top-level keys of the config file (subclasses add theirs).
    KEYS = ("name", "title", "seeds", "metrics", "recon", "common", "notes")

    @classmethod
    def parse(cls, raw: dict[str, Any], path: Path) -> dict[str, Any]:
        """The common fields of ``raw`` (checked), for a subclass's constructor."""
        name = check_value(raw.get("name", path.stem), str, "name")
        return {
            "name": name, "path": path,
            "title": check_value(raw.get("title", name), str, "title"),
            "seeds": check_value(raw.get("seeds", [0]), tuple[int, ...], "seeds"),
            "metrics": check_value(raw.get("metrics"), tuple[str, ...] | None, "metrics"),
            "recon": check_value(raw.get("recon"), dict | None, "recon"),
            "common": check_value(raw.get("common"), dict | None, "common"),
            "notes": check_value(raw.get("notes", ""), str, "notes"),
        }


def load_matrix_config(path: str | Path, overrides: Sequence[str], keys: Sequence[str],
                       what: str) -> tuple[dict[str, Any], Path]:
    """Read a bench/ablate config file with dotted overrides (the run configs' parser), refuse
    unknown top-level keys; returns the raw mapping and the resolved path."""
    path = Path(path).resolve()
    raw = apply_overrides(read_yaml(path, what=f"{what} config"), overrides, sections=keys)
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise RunConfigError(f"unknown key(s) {unknown} in {what} config {path.name}; valid "
                             f"ones: {', '.join(keys)}.")
    return raw, path


def dotted(mapping: Mapping[str, Any] | None) -> list[str]:
    """``{"train.epochs": 2}`` -> ``["train.epochs=2"]`` (values as JSON, which YAML reads)."""
    return [f"{k}={json.dumps(v)}" for k, v in (mapping or {}).items()]


class Matrix:
    """A list of planned runs, a results file, and the loop that fills it.

    Args:
        name: The results folder's default name.
        out: The results folder (default ``benchmarks/results/<name>``).
        progress: A progress bar over the runs (None: only on a terminal).
        replace_changed: Re-run finished runs whose config changed (see :meth:`execute`).
    """

    def __init__(self, name: str, out: Path | None, progress: bool | None,
                 replace_changed: bool = False) -> None:
        self.out = Path(out) if out is not None else RESULTS / name
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_file = self.out / "results.json"
        self.runs: list[dict[str, Any]] = []
        self.superseded: list[dict[str, Any]] = []
        if self.results_file.is_file():
            saved = json.loads(self.results_file.read_text())
            self.runs, self.superseded = saved["runs"], saved.get("superseded", [])
        self.replace_changed = replace_changed
        self.plan: list[tuple[str, RunConfig, dict[str, Any]]] = []
        self.progress = progress
        self.run_root = self.out / "runs"

    def planned(self, run_id: str) -> bool:
        return any(p[0] == run_id for p in self.plan)

    def add(self, run_id: str, cfg: RunConfig, meta: dict[str, Any]) -> None:
        """Plan run ``run_id``: its folder is ``runs/<run_id>`` of the results folder."""
        cfg = cfg.with_run(out_dir=str(self.run_root / run_id), progress=False)
        self.plan.append((run_id, cfg, meta))

    def _check_changed(self) -> None:
        """A finished run whose config differs from the plan's is never silently reused: it is an
        error, or with ``replace_changed`` it moves to ``superseded`` (kept in results.json, out
        of the tables) and runs again."""
        planned = {run_id: cfg for run_id, cfg, _ in self.plan}
        changed = {}
        for r in self.runs:
            if r["id"] in planned:
                diff = config_diff(r["config"], planned[r["id"]])
                if diff:
                    changed[r["id"]] = diff
        if not changed:
            return
        if not self.replace_changed:
            lines = [f"  {run_id}: {', '.join(diff[:6])}" for run_id, diff in changed.items()]
            raise RunConfigError(
                f"{self.results_file} holds {len(changed)} finished run(s) whose config differs "
                "from this bench config:\n" + "\n".join(lines) + "\nRe-run them with "
                "--replace-changed (the old results move to 'superseded' in results.json and "
                "leave the tables), or write to another folder with --out-dir.")
        for r in [r for r in self.runs if r["id"] in changed]:
            self.runs.remove(r)
            self.superseded.append({**r, "superseded_because": changed[r["id"]]})
        self._save()

    def merge(self, other: Path) -> int:
        """Take the finished runs of another results folder (e.g. seeds run in a parallel
        process with ``seeds=[2] --out-dir DIR``) that this matrix plans and lacks, with their
        pictures; their configs are then checked like any other finished run's. Returns how
        many were taken."""
        saved = json.loads((Path(other) / "results.json").read_text())["runs"]
        have = {r["id"] for r in self.runs}
        planned = {p[0] for p in self.plan}
        taken = [r for r in saved if r["id"] in planned and r["id"] not in have]
        for r in taken:
            self.runs.append(r)
            self._keep_picture(Path(other) / "pictures" / f"{r['id']}.png", r["id"])
        if taken:
            self._save()
        print(f"merged {len(taken)} finished run(s) from {other}", flush=True)
        return len(taken)

    def missing(self) -> list[str]:
        """Planned runs not in results.json yet."""
        done = {r["id"] for r in self.runs}
        return [p[0] for p in self.plan if p[0] not in done]

    def execute(self, report_only: bool = False) -> list[dict[str, Any]]:
        """Train the planned runs not done yet (none with ``report_only``); return the planned
        runs that are done."""
        self._check_changed()
        done = {r["id"] for r in self.runs}
        todo = [] if report_only else [p for p in self.plan if p[0] not in done]
        print(f"{len(self.plan)} runs planned, {len(done & {p[0] for p in self.plan})} already "
              f"done (in {self.results_file}), {len(todo)} to run", flush=True)
        bar = progress(todo, enabled=self.progress, total=len(todo), unit="run")
        t0 = time.perf_counter()
        for i, (run_id, cfg, meta) in enumerate(bar):
            if bar is todo:  # no bar: one line per run
                eta = (time.perf_counter() - t0) / i * (len(todo) - i) if i else float("nan")
                print(f"run {i + 1}/{len(todo)}: {run_id} (ETA {eta / 60:.1f} min)", flush=True)
            else:
                bar.set_description(f"run {i + 1}/{len(todo)} {run_id}")
            result = train(cfg)
            entry = {"id": run_id, "method": meta.get("method", cfg.method.name),
                     "recon": cfg.recon.to_dict() if cfg.recon is not None else False,
                     "seed": cfg.train.seed, "reference": meta.get("reference"),
                     "ablation": meta.get("ablation"), "metrics": result["metrics"],
                     "config": result["config"], "wall_s": result["wall_s"],
                     "machine": result["machine"], "history": result["history"],
                     "train_images": result["train_images"], "test_images": result["test_images"]}
            self.runs.append(entry)
            self._save()
            self._keep_picture(Path(cfg.run.out_dir) / "reconstructions.png", run_id)
        planned = {p[0] for p in self.plan}
        return [r for r in self.runs if r["id"] in planned]

    def _keep_picture(self, picture: Path, run_id: str) -> None:
        if picture.is_file():
            (self.out / "pictures").mkdir(exist_ok=True)
            (self.out / "pictures" / f"{run_id}.png").write_bytes(picture.read_bytes())

    def _save(self) -> None:
        tmp = self.results_file.with_suffix(".tmp")
        saved: dict[str, Any] = {"runs": self.runs}
        if self.superseded:
            saved["superseded"] = self.superseded
        tmp.write_text(json.dumps(saved, indent=1))
        os.replace(tmp, self.results_file)


#: Reference rows (what they change in the method's run config); ``recon-only`` also takes the
#: config's +recon block.
REFERENCE_ROWS: dict[str, list[str]] = {
    "random-init": ["recon=null", "train.epochs=0"],
    "supervised": ["recon=null", "method={name: supervised}"],
    "recon-only": ["method={name: recon_only}"],
}


def add_references(matrix: Matrix, cfg: MatrixConfig, src: RunSource, ref_from: str,
                   rows: Sequence[str], common: Sequence[str], seed: int) -> None:
    """Plan the reference rows (random-init, supervised, recon-only) on ``src``'s backbone,
    data and evaluation."""
    recon_set = [f"recon={json.dumps(cfg.recon or {})}"]
    for row in rows:
        if row not in REFERENCE_ROWS:
            raise RunConfigError(f"unknown reference row {row!r}; use "
                                 f"{', '.join(REFERENCE_ROWS)}.")
        final = [*recon_set, *REFERENCE_ROWS[row]] if row == "recon-only" else REFERENCE_ROWS[row]
        rc = src.run_config([*common, f"train.seed={seed}"], cfg.name, final)
        backbone = rc.backbone.name
        run_id, label = f"{row}-{backbone}-seed{seed}", f"{row} ({backbone})"
        if matrix.planned(run_id):  # a second method's reference on the same backbone,
            # e.g. with its own evaluation (AET's non-linear probe): its own row
            run_id = f"{row}-{backbone}-{ref_from}-seed{seed}"
            label = f"{row} ({backbone}, {ref_from}'s evaluation)"
        matrix.add(run_id, rc, {"reference": label, "method": row})


def mark_partial(cfg: MatrixConfig, matrix: Matrix) -> MatrixConfig:
    """The config with a PARTIAL title and a note listing the missing runs, if any are missing."""
    missing = matrix.missing()
    if not missing:
        return cfg
    n = len(matrix.plan)
    notes = (f"**PARTIAL**: {n - len(missing)} of {n} planned runs finished; not run "
             f"yet: {', '.join(missing)}. The matrix resumes: run the same command "
             "again.\n\n" + cfg.notes)
    return dataclasses.replace(cfg, title=f"PARTIAL: {cfg.title}", notes=notes)


def write_report(out: Path, cfg: MatrixConfig, runs: list[dict[str, Any]],
                 extra_notes: str = "", extra_pictures: tuple[str, ...] = (),
                 all_runs: list[dict[str, Any]] | None = None) -> None:
    """README, curves and table of ``runs``; ``all_runs`` (default ``runs``) for the setup line
    and the metric list when the table shows a subset (the ablation)."""
    all_runs = runs if all_runs is None else all_runs
    metrics = list(cfg.metrics or sorted({m for r in all_runs for m in r["metrics"]
                                          if not m.startswith("final")}))
    pictures = list(extra_pictures)
    if report.plot_curves(runs, out / "curves.png", ["method_loss", "recon_l2", "recon_lpips"]):
        pictures.append("curves.png")
    if (out / "pictures").is_dir():
        pictures += sorted(f"pictures/{p.name}" for p in (out / "pictures").glob("*.png"))
    text = report.render_readme(cfg.title, runs, metrics, report.render_setup(all_runs),
                                pictures=pictures, notes=cfg.notes + extra_notes)
    (out / "README.md").write_text(text)
    print(report.render_table(runs, metrics))
    print(f"results: {out / 'README.md'} (pictures in {out})")
