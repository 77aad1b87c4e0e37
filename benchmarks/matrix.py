"""What ``bench`` and ``ablate`` share: their config's common part, the planned runs, the
results file, and the README.

A :class:`Matrix` is a list of planned runs (id, run config, row metadata), a results folder
(``benchmarks/results/<name>/`` by default) and the checks before the runs not finished yet
train (one after another or K at once, within a time budget: :mod:`benchmarks.schedule`).
Everything a matrix writes goes under that folder: ``results.json`` (one entry per finished
run), ``runs/<id>/`` (each run's checkpoint, log and pictures), ``pictures/<id>.png`` (the
reconstructions beside their inputs: git-ignored, as they show the data set's images), the
README, curves and plots. A re-run skips finished runs and resumes a killed run from its last
checkpoint, so an interrupted matrix loses at most one epoch; a finished run whose config
changed is never silently reused.

Names: a config's ``name``, a bench config's method keys and every run id are plain names
(letters, digits, ``_ . + = -``; no ``/``, no ``..``), so nothing is written outside the results
folder. ``results.json`` records which config made the folder (``{"kind": "bench", "name":
...}``): another config's folder, or a non-empty folder without ``results.json``, is refused
unless ``reuse_folder`` (``--reuse-folder``). Every planned run is validated, its data loaded
and its data-dependent settings checked (:func:`adapters.engine.check_run`) before the first
run trains.

Config paths: a bench or ablate config names run configs (``config: smoke/sela.yaml``); such a
path is relative to the folder of the config that names it, and must lead to a file in that
folder or below it (an absolute path too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapters.checkpoint import CheckpointError, load_checkpoint
from adapters.config import (
    IneffectiveSettingWarning,
    RunConfig,
    RunConfigError,
    apply_overrides,
    config_diff,
    load_run_config,
    other_command_hint,
    read_yaml,
    yaml_problem,
)
from adapters.engine import check_run, reported_metrics
from adapters.files import atomic_write, json_text
from adapters.runs import CHECKPOINT, RESULT, result_config_diff
from adapters.schema import SchemaError, check_value
from recon_aux.config import safe_load

from . import report
from .schedule import Budget, check_jobs, row_of, run_in_processes, run_in_turn

__all__ = ["RESULTS", "MatrixConfig", "RunSource", "Matrix", "REFERENCE_ROWS",
           "load_matrix_config", "add_references", "write_report", "mark_partial", "dotted",
           "plain_name"]

#: Where results go by default: ``benchmarks/results/<config name>/`` of this checkout.
RESULTS = Path(__file__).resolve().parent / "results"

_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]{0,127}")


def plain_name(value: Any, key: str) -> str:
    """``value`` if it is a plain name (a file name without a folder: letters, digits and
    ``_ . + = -``, starting with a letter or digit, no ``..``, at most 128 characters).

    Raises:
        RunConfigError: Naming ``key`` and the value.
    """
    if not isinstance(value, str) or not _PLAIN.fullmatch(value) or ".." in value:
        raise RunConfigError(
            f"{key}={value!r} is not a plain name: use letters, digits and _ . + = - (starting "
            "with a letter or digit, no '/' or '..'); it names a folder or file inside the "
            "results folder.")
    return value


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
        name = check_value(data["config"], str, f"{where}.config")
        path = base / name
        if base.resolve() not in path.resolve().parents:
            raise RunConfigError(f"{where}.config {name!r} is outside {base}, the folder of the "
                                 "config that names it: a config names run configs in its own "
                                 "folder or below it. Copy the run config there.")
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
        name = plain_name(raw.get("name", path.stem), "name")
        seeds = check_value(raw.get("seeds", [0]), tuple[int, ...], "seeds")
        if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
            raise RunConfigError(f"seeds={list(seeds)} must be a non-empty list of distinct "
                                 "seeds >= 0 (e.g. seeds: [0, 1, 2]).")
        metrics = check_value(raw.get("metrics"), tuple[str, ...] | None, "metrics")
        if metrics is not None and not metrics:
            raise RunConfigError("metrics=[] names no column; name the metrics (e.g. "
                                 "[knn_conv5]) or leave the key out for every metric.")
        common = check_value(raw.get("common"), dict | None, "common")
        for key, value in (common or {}).items():
            check_value(key, str, "a key of common")
            names = ([f"run.{k}" for k in value] if key == "run" and isinstance(value, dict)
                     else [key])
            taken = [n for n in names if n in SET_BY_MATRIX]
            if taken:
                raise RunConfigError(
                    f"common: {', '.join(taken)} is set by bench and ablate themselves (every "
                    "run in runs/<run id> of the results folder, resumed there when it was "
                    "stopped): remove it, and choose the results folder with --out-dir.")
        return {
            "name": name, "path": path,
            "title": check_value(raw.get("title", name), str, "title"),
            "seeds": seeds,
            "metrics": metrics,
            "recon": check_value(raw.get("recon"), dict | None, "recon"),
            "common": common,
            "notes": check_value(raw.get("notes", ""), str, "notes"),
        }


#: The run settings :meth:`Matrix.add` and a restart set for every run; a config may not.
SET_BY_MATRIX = ("run.out_dir", "run.progress", "run.resume", "run.overwrite")

#: Mappings of a bench/ablate config whose keys are dotted run-config keys (``train.epochs``);
#: None matches any name (a method's row name).
DOTTED_MAPS: tuple[tuple[str | None, ...], ...] = (
    ("common",), ("methods", None, "set"), ("method", "set"),
)


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Raise a bad value of a bench/ablate config (a :class:`SchemaError`) as the run configs'
    error type, :class:`RunConfigError`."""
    try:
        yield
    except SchemaError as exc:
        if isinstance(exc, RunConfigError):
            raise
        raise RunConfigError(str(exc)) from None


def load_matrix_config(path: str | Path, overrides: Sequence[str], keys: Sequence[str],
                       what: str) -> tuple[dict[str, Any], Path]:
    """Read a bench/ablate config file with dotted overrides (the run configs' parser), refuse
    unknown top-level keys; returns the raw mapping and the resolved path.

    An override below a mapping of dotted run-config keys (:data:`DOTTED_MAPS`) sets one key
    of it: ``common.train.epochs=2`` sets ``common``'s ``train.epochs`` (the run configs' other
    ``train`` settings stay), ``methods.sela.set.method.k=64`` that row's ``method.k``.
    """
    path = Path(path).resolve()
    raw = read_yaml(path, what=f"{what} config")
    for item in overrides:
        key, sep, value = item.partition("=")
        inside = _inside_dotted_map(key, keys) if sep else None
        if inside is None:
            raw = apply_overrides(raw, [item], sections=keys)
        else:
            _set_dotted_key(raw, *inside, value, item)
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise RunConfigError(f"unknown key(s) {unknown} in {what} config {path.name}; valid "
                             f"ones: {', '.join(keys)}.{other_command_hint(unknown, what)}")
    return raw, path


def _inside_dotted_map(key: str, keys: Sequence[str]) -> tuple[list[str], str] | None:
    """``common.train.epochs`` -> (``["common"]``, ``"train.epochs"``); None for a key that is
    not below a mapping of :data:`DOTTED_MAPS` (of a config whose top-level keys are ``keys``)."""
    parts = key.strip().split(".")
    for pattern in DOTTED_MAPS:
        n = len(pattern)
        if (pattern[0] in keys and len(parts) > n
                and all(want in (None, got) for want, got in zip(pattern, parts))):
            return parts[:n], ".".join(parts[n:])
    return None


def _set_dotted_key(raw: dict[str, Any], where: list[str], inner: str, value: str,
                    item: str) -> None:
    """Set ``raw[where...][inner]`` to the YAML ``value`` (creating the mappings on the way)."""
    try:
        parsed = safe_load(value) if value != "" else None
    except yaml.YAMLError as exc:
        raise RunConfigError(f"override {item!r}: the value is not valid YAML "
                             f"({yaml_problem(exc)}).") from None
    node = raw
    for i, part in enumerate(where):
        if node.get(part) is None:
            node[part] = {}
        if not isinstance(node[part], dict):
            raise RunConfigError(f"override {item!r}: {'.'.join(where[:i + 1])} is not a "
                                 "mapping.")
        node = node[part]
    node[inner] = parsed


def dotted(mapping: Mapping[str, Any] | None) -> list[str]:
    """``{"train.epochs": 2}`` -> ``["train.epochs=2"]`` (values as JSON, which YAML reads)."""
    return [f"{k}={json.dumps(v)}" for k, v in (mapping or {}).items()]


class Matrix:
    """A list of planned runs, a results file, and the loop that fills it.

    Args:
        name: The results folder's default name (a plain name, see :func:`plain_name`).
        out: The results folder (default ``benchmarks/results/<name>``).
        progress: A progress bar over the runs (None: only on a terminal).
        replace_changed: Re-run finished runs whose config changed (see :meth:`execute`).
        kind: ``bench`` or ``ablate``: with ``name``, the identity recorded in results.json.
        reuse_folder: Accept a results folder made by another config, or a non-empty folder
            without results.json.
        supersede_unplanned: Move finished runs that this config does not plan (e.g. rows a new
            version of the config dropped) to ``superseded``, out of results.json's runs. Use it
            with the whole config: runs that ``seeds=`` or ``methods.<row>=null`` overrides leave
            out of the plan would move too.

    Raises:
        RunConfigError: The folder belongs to another config, is not a results folder, or its
            results.json is unreadable.
    """

    def __init__(self, name: str, out: Path | None, progress: bool | None,
                 replace_changed: bool = False, kind: str = "bench",
                 reuse_folder: bool = False, supersede_unplanned: bool = False) -> None:
        self.supersede_unplanned = supersede_unplanned
        if out is None:
            out = RESULTS / plain_name(name, "name")
            if RESULTS.resolve() not in out.resolve().parents:
                raise RunConfigError(f"name={name!r} would write outside {RESULTS}.")
        self.out = Path(out)
        self.identity = {"kind": kind, "name": name}
        self.results_file = self.out / "results.json"
        self.runs: list[dict[str, Any]] = []
        self.superseded: list[dict[str, Any]] = []
        if self.out.exists() and not self.out.is_dir():
            raise RunConfigError(f"the results folder {self.out} is a file; choose another "
                                 "--out-dir.")
        if self.results_file.is_file():
            saved = self._read(self.results_file)
            self.runs, self.superseded = saved["runs"], saved.get("superseded", [])
            owner = saved.get("made_by")
            if owner is not None and owner != self.identity and not reuse_folder:
                raise RunConfigError(
                    f"{self.out} holds the results of {owner.get('kind')} config "
                    f"{owner.get('name')!r}, not of {kind} config {name!r}; write to another "
                    "folder with --out-dir, or pass --reuse-folder to add to it (its finished "
                    "runs are kept and checked against this config).")
        elif self.out.is_dir() and any(self.out.iterdir()) and not reuse_folder:
            raise RunConfigError(
                f"{self.out} is not empty and holds no results.json: it is not a results folder "
                "of this config. Write to a new or empty folder with --out-dir, or pass "
                "--reuse-folder to write there anyway.")
        self.replace_changed = replace_changed
        self.plan: list[tuple[str, RunConfig, dict[str, Any]]] = []
        self.progress = progress
        self.run_root = self.out / "runs"
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunConfigError(f"cannot create the results folder {self.out} "
                                 f"({exc.strerror or exc}); choose another --out-dir.") from None

    @staticmethod
    def _read(results_file: Path) -> dict[str, Any]:
        try:
            saved = json.loads(results_file.read_text())
        except (OSError, ValueError) as exc:
            raise RunConfigError(f"{results_file} is unreadable ({exc}); restore it, or write "
                                 "to another folder with --out-dir.") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("runs"), list):
            raise RunConfigError(f"{results_file} holds no 'runs' list: it is not a results "
                                 "file; restore it, or write to another folder with --out-dir.")
        for i, run in enumerate(saved["runs"]):
            # a run's id names its folder and picture: checked before any path is made of it
            problem = ("is not a run (no config)" if not isinstance(run, dict)
                       or not isinstance(run.get("config"), dict) else None)
            if problem is None:
                try:
                    plain_name(run.get("id"), "id")
                except RunConfigError as exc:
                    problem = f"has a bad id: {exc}"
            if problem:
                raise RunConfigError(f"{results_file}: runs[{i}] {problem} Restore the file, "
                                     "or write to another folder with --out-dir.")
        return saved

    def planned(self, run_id: str) -> bool:
        return any(p[0] == run_id for p in self.plan)

    def add(self, run_id: str, cfg: RunConfig, meta: dict[str, Any]) -> None:
        """Plan run ``run_id``: its folder is ``runs/<run_id>`` of the results folder (a killed
        run resumes from its checkpoint there)."""
        plain_name(run_id, "run id")
        if self.planned(run_id):
            raise RunConfigError(f"run id {run_id!r} is planned twice.")
        cfg = cfg.with_run(out_dir=str(self.run_root / run_id), progress=False, resume=True)
        self.plan.append((run_id, cfg, meta))

    def _check_changed(self) -> None:
        """A finished run whose config differs from the plan's is never silently reused: it is an
        error, or with ``replace_changed`` it moves to ``superseded`` (kept in results.json, out
        of the tables) and runs again."""
        planned = {run_id: cfg for run_id, cfg, _ in self.plan}
        changed = {}
        for r in self.runs:
            if r["id"] in planned:
                diff = run_config_diff(r, planned[r["id"]])
                if diff:
                    changed[r["id"]] = diff
        if not changed:
            return
        if not self.replace_changed:
            lines = [f"{run_id}: {', '.join(diff[:6])}" for run_id, diff in changed.items()]
            raise RunConfigError(
                f"{self.results_file} holds {len(changed)} finished run(s) whose config differs "
                f"from this {self.identity['kind']} config ({'; '.join(lines)}). Re-run them "
                "with --replace-changed (the old results move to 'superseded' in results.json "
                "and leave the tables), or write to another folder with --out-dir.")
        for r in [r for r in self.runs if r["id"] in changed]:
            self.runs.remove(r)
            self.superseded.append({**r, "superseded_because": changed[r["id"]]})
        for run_id in changed:  # their run folders hold the old run: start them again
            self._restart(run_id)
        self._save()

    def _supersede_unplanned(self) -> None:
        planned = {run_id for run_id, _, _ in self.plan}
        for r in [r for r in self.runs if r["id"] not in planned]:
            self.runs.remove(r)
            self.superseded.append({**r, "superseded_because": ["not planned by this config"]})
        self._save()

    def _restart(self, run_id: str) -> None:
        self.plan = [(i, c.with_run(resume=False, overwrite=True) if i == run_id else c, m)
                     for i, c, m in self.plan]

    def _check_unfinished(self, todo: list[tuple[str, RunConfig, dict[str, Any]]]) -> None:
        """A killed run resumes from its checkpoint, unless that checkpoint was made by another
        config: an error, or with ``replace_changed`` the run starts again. A folder with a
        result and no checkpoint (a run with no epochs, or without checkpoints) is judged by its
        result's config the same way (the engine refuses to start over another config's
        result)."""
        changed = {}
        for run_id, cfg, _ in todo:
            diff = _started_with_another(run_id, cfg) if cfg.run.resume else []
            if diff:
                changed[run_id] = diff
        if changed and not self.replace_changed:
            lines = [f"{run_id}: {', '.join(diff[:6])}" for run_id, diff in changed.items()]
            raise RunConfigError(
                f"{len(changed)} unfinished run(s) in {self.run_root} were started with another "
                f"config ({'; '.join(lines)}). Start them again with --replace-changed, or "
                "write to another folder with --out-dir.")
        for run_id in changed:
            self._restart(run_id)

    def merge(self, other: Path) -> int:
        """Take the finished runs of another results folder (e.g. seeds run in a parallel
        process with ``seeds=[2] --out-dir DIR``) that this matrix plans and lacks, with their
        pictures. Only a run trained with the planned config is taken: a run of the same id
        made with another config (a sibling matrix's "+recon" row with another tap) is left
        where it is, counted in the printed line, and this matrix trains its own. Returns how
        many were taken."""
        saved = self._read(Path(other) / "results.json")["runs"]
        have = {r["id"] for r in self.runs}
        planned = {run_id: cfg for run_id, cfg, _ in self.plan}
        taken, other_cfg = [], []
        for r in saved:
            if r["id"] in planned and r["id"] not in have:
                if run_config_diff(r, planned[r["id"]]):
                    other_cfg.append(r["id"])
                else:
                    taken.append(r)
        for r in taken:
            self.runs.append(r)
            self._keep_picture(Path(other) / "pictures" / f"{r['id']}.png", r["id"])
        if taken:
            self._save()
        left = (f"; left {len(other_cfg)} made with another config ({', '.join(other_cfg)})"
                if other_cfg else "")
        print(f"merged {len(taken)} finished run(s) from {other}{left}", flush=True)
        return len(taken)

    def missing(self) -> list[str]:
        """Planned runs not in results.json yet."""
        done = {r["id"] for r in self.runs}
        return [p[0] for p in self.plan if p[0] not in done]

    def execute(self, report_only: bool = False, time_budget: float | None = None,
                jobs: int = 1, metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Train the planned runs not done yet (none with ``report_only``); return the planned
        runs that are done.

        Before the first run trains, the table's ``metrics`` (the config's) are checked against
        what the planned runs report, and every run to train is checked as the engine would
        before its first step (:func:`adapters.engine.check_run`: data, layers, batch size,
        ``k``).
        With ``time_budget`` (seconds), a run starts only when the time used so far plus the
        time it is expected to take (:meth:`.schedule.Budget.expected`) fits in it; a longer
        run is passed over for a later one that fits, and a run with nothing to go by starts.
        The runs left stay planned, and the same command goes on with them (for a machine lent
        by the minute).

        With ``jobs`` > 1, up to that many runs train at once, each in a process of its own
        (:func:`.schedule.run_in_processes`): for a GPU that one small run leaves mostly idle.
        """
        budget = Budget(time_budget, self.row_record)  # refuses a bad budget before any work
        check_jobs(jobs)
        reported = set().union(*(reported_metrics(cfg) for _, cfg, _ in self.plan))
        unknown = [m for m in metrics or () if m not in reported]
        if unknown:
            raise RunConfigError(f"metrics {unknown}: no planned run reports them (their eval "
                                 f"gives {sorted(reported)}); name those, or add the layer to "
                                 "the runs' eval section.")
        self._backfill_tapped()
        self._check_changed()
        if self.supersede_unplanned:
            self._supersede_unplanned()
        done = {r["id"] for r in self.runs}
        todo = [] if report_only else [p for p in self.plan if p[0] not in done]
        self._check_unfinished(todo)
        todo = [p for p in self.plan if p[0] in {t[0] for t in todo}]  # restarts applied
        datasets: dict = {}  # each data set loaded once for all the checks
        for run_id, cfg, _ in todo:
            try:
                check_run(cfg, datasets)
            except RunConfigError as exc:
                raise RunConfigError(f"run {run_id}: {exc}") from None
        del datasets
        warn_ineffective_runs(todo)
        self._save()  # the folder is this config's from now on
        print(f"{len(self.plan)} runs planned, {len(done & {p[0] for p in self.plan})} already "
              f"done (in {self.results_file}), {len(todo)} to run", flush=True)
        if jobs > 1 and todo:  # even one run: its thread count as its siblings'
            run_in_processes(todo, jobs, budget, self._record)
        else:
            run_in_turn(todo, budget, self._record, self.progress)
        return self._finish()

    def row_record(self, row: str) -> float | None:
        """The longest ``wall_s`` recorded for a run of ``row`` (seconds), None when none is."""
        return max((r["wall_s"] for r in self.runs
                    if r.get("wall_s") is not None and row_of(r["id"]) == row), default=None)

    def _record(self, run_id: str, cfg: RunConfig, meta: dict[str, Any],
                result: dict[str, Any]) -> None:
        """Add a finished run's entry to results.json, and keep its reconstruction picture."""
        entry = {"id": run_id, "method": meta.get("method", cfg.method.name),
                 "recon": cfg.recon.to_dict() if cfg.recon is not None else False,
                 "seed": cfg.train.seed, "reference": meta.get("reference"),
                 **({"ref_from": meta["ref_from"]} if "ref_from" in meta else {}),
                 "ablation": meta.get("ablation"), "metrics": result["metrics"],
                 "evaluation": result.get("evaluation"),
                 "config": result["config"], "tapped": result["tapped"],
                 "wall_s": result["wall_s"],
                 "machine": result["machine"], "history": result["history"],
                 "train_images": result["train_images"], "test_images": result["test_images"]}
        self.runs.append(entry)
        self._save()
        self._keep_picture(Path(cfg.run.out_dir) / "reconstructions.png", run_id)

    def _finish(self) -> list[dict[str, Any]]:
        """Backfill what older entries lack; return the planned runs that are done."""
        self._backfill_evaluation()
        planned = {p[0] for p in self.plan}
        return [r for r in self.runs if r["id"] in planned]

    def _backfill_tapped(self) -> None:
        """Runs recorded without the layer the objective tapped (results.json did not keep it
        before) take it from their config when it names the layer, else from their own run
        folder: its result.json, else its checkpoint's ``aux`` state (checksum-verified), when
        that run's config is the recorded one."""
        changed = False
        for r in self.runs:
            if "tapped" in r:
                continue
            recon = (r.get("config") or {}).get("recon")
            if not recon or recon.get("layer"):
                r["tapped"], changed = tap_name((recon or {}).get("layer")), True
                continue
            saved = self._own_result(r)
            if saved is not None and "tapped" in saved:
                r["tapped"], changed = saved["tapped"], True
                continue
            folder = self.run_root / r["id"]
            if not (folder / CHECKPOINT).is_file():
                continue
            try:
                state = load_checkpoint(folder / CHECKPOINT)
            except CheckpointError:
                continue
            layer = ((state.get("aux") or {}).get("_extra_state") or {}).get("layer_name")
            if layer is not None and not config_diff(state["config"], r["config"]):
                r["tapped"], changed = layer, True
        if changed:
            self._save()

    def _backfill_evaluation(self) -> None:
        """Runs recorded without their evaluation details (BatchNorm recalibration, probe fits;
        results.json did not keep them before) take them from their own run folder's
        result.json, when that run's config is the recorded one."""
        changed = False
        for r in self.runs:
            if r.get("evaluation") is not None:
                continue
            saved = self._own_result(r)
            if saved is not None and saved.get("evaluation"):
                r["evaluation"], changed = saved["evaluation"], True
        if changed:
            self._save()

    def _own_result(self, run: Mapping[str, Any]) -> dict[str, Any] | None:
        """The result.json in ``run``'s own run folder, when it exists, reads and was made with
        the run's recorded config; else None."""
        try:
            saved = json.loads((self.run_root / run["id"] / "result.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(saved, dict) or config_diff(saved.get("config") or {},
                                                      run.get("config") or {}):
            return None
        return saved

    def _keep_picture(self, picture: Path, run_id: str) -> None:
        if picture.is_file():
            (self.out / "pictures").mkdir(exist_ok=True)
            atomic_write(self.out / "pictures" / f"{plain_name(run_id, 'run id')}.png",
                         picture.read_bytes())

    def _save(self) -> None:
        saved: dict[str, Any] = {"made_by": self.identity, "runs": self.runs}
        if self.superseded:
            saved["superseded"] = self.superseded
        atomic_write(self.results_file, json_text(saved, indent=1).encode())


def _started_with_another(run_id: str, cfg: RunConfig) -> list[str]:
    """The keys in which the config that started ``cfg``'s run folder differs from ``cfg``: the
    checkpoint's config (as the engine's resume checks), else the result's; [] for neither."""
    folder = Path(cfg.run.out_dir)
    if (folder / CHECKPOINT).is_file():
        try:
            state = load_checkpoint(folder / CHECKPOINT)
        except CheckpointError as exc:
            raise CheckpointError(f"run {run_id} cannot resume: {exc} To start that run again, "
                                  f"delete its folder {folder}.") from None
        return config_diff(state["config"], cfg)
    if (folder / RESULT).is_file():
        try:
            return result_config_diff(folder / RESULT, cfg)
        except ValueError as exc:
            return [str(exc)]
    return []


def warn_ineffective_runs(todo: list[tuple[str, RunConfig, dict[str, Any]]]) -> None:
    """One :class:`~adapters.config.IneffectiveSettingWarning` per setting that cannot take
    effect, naming the planned runs it concerns (each run warns again when it starts)."""
    runs: dict[str, list[str]] = {}
    for run_id, cfg, _ in todo:
        for problem in cfg.ineffective():
            runs.setdefault(problem, []).append(run_id)
    for problem, ids in runs.items():
        named = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        warnings.warn(f"{problem} (run{'s' * (len(ids) > 1)} {named}).",
                      IneffectiveSettingWarning, stacklevel=2)


def run_config_diff(run: Mapping[str, Any], planned: RunConfig) -> list[str]:
    """:func:`~adapters.config.config_diff` of a finished run's recorded config against the
    planned one, where a run recorded with ``recon.layer`` unset matches a plan that names the
    layer(s) it tapped (``run["tapped"]``): naming the layer ``layer=None`` chose trains the
    same run bit for bit, so a config can pin its default tap without re-running. (An
    unfinished run is compared strictly, as the engine's resume compares it.)"""
    diff = config_diff(run["config"], planned)
    recorded = (run["config"].get("recon") or {}).get("layer")
    named = tap_name(planned.recon.layer if planned.recon is not None else None)
    if "recon.layer" in diff and recorded is None and named is not None \
            and run.get("tapped") == named:
        diff.remove("recon.layer")
    return diff


def tap_name(layer: str | Sequence[str] | None) -> str | None:
    """``recon.layer`` as ``ReconAux.layer_name`` writes it (``"layer3+layer4"``); None for
    None (the default rule's choice is only known after the first forward)."""
    if not layer:
        return None
    return layer if isinstance(layer, str) else "+".join(layer)


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
        if row not in REFERENCE_ROWS:  # (also checked when the config is read)
            raise RunConfigError(f"unknown reference row {row!r}; use "
                                 f"{', '.join(REFERENCE_ROWS)}.")
        final = [*recon_set, *REFERENCE_ROWS[row]] if row == "recon-only" else REFERENCE_ROWS[row]
        rc = src.run_config([*common, f"train.seed={seed}"], cfg.name, final)
        backbone = rc.backbone.name
        run_id, label, own = f"{row}-{backbone}-seed{seed}", f"{row} ({backbone})", {}
        if matrix.planned(run_id):  # a second method's reference on the same backbone: its own
            # row, on that method's recipe (augmentation, optimizer, evaluation), and the one
            # that method's rows are paired with (report's _reference_of reads ref_from)
            run_id = f"{row}-{backbone}-{ref_from}-seed{seed}"
            label = f"{row} ({backbone}, {ref_from}'s recipe)"
            own = {"ref_from": ref_from}
        matrix.add(run_id, rc, {"reference": label, "method": row, **own})


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
                 all_runs: list[dict[str, Any]] | None = None,
                 extra_local_pictures: tuple[str, ...] = ()) -> None:
    """README, curves and table of ``runs``; ``all_runs`` (default ``runs``) for the setup line
    and the metric list when the table shows a subset (the ablation). ``extra_pictures`` are
    plots, shown in the README; ``pictures/`` and ``extra_local_pictures`` hold data set images
    (reconstructions beside their inputs): named, not shown, and git-ignored."""
    all_runs = runs if all_runs is None else all_runs
    metrics = list(cfg.metrics or sorted({m for r in all_runs for m in r["metrics"]
                                          if not m.startswith("final")}))
    pictures = list(extra_pictures)
    if report.plot_curves(runs, out / "curves.png", ["method_loss", "recon_l2", "recon_lpips"]):
        pictures.append("curves.png")
    # named from the runs, not from the folder: the README is the same in a fresh clone,
    # which has no pictures (every run with the objective leaves one; superseded runs' are left)
    local = [*extra_local_pictures, *sorted(
        {f"pictures/{plain_name(r['id'], 'run id')}.png" for r in (*runs, *all_runs)
         if r.get("recon")})]
    text = report.render_readme(cfg.title, runs, metrics, report.render_setup(all_runs, runs),
                                pictures=pictures, notes=cfg.notes + extra_notes,
                                local_pictures=local)
    (out / "README.md").write_text(text)
    print(report.render_table(runs, metrics))
    print(f"results: {out / 'README.md'} (pictures in {out})")
