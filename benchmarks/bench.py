"""``recon-aux bench`` and ``recon-aux ablate``: the comparisons users read.

``bench CONFIG`` runs the matrix methods x {base, +recon} x seeds, plus the reference rows
(random-init, supervised, recon-only) on the same backbone and data, evaluates every run with the
shared protocols, and writes ``benchmarks/results/<name>/``: ``results.json``, ``README.md`` (the
table, the paper's numbers, the caveats), reconstruction grids and training curves. Finished runs
are skipped on a re-run, so an interrupted matrix resumes.

``ablate CONFIG`` varies the auxiliary objective's knobs one at a time around a default (overall
weight including 0, the L2/LPIPS mix, LPIPS net, resize_to, tapped layer) for one method, with the
same outputs plus a plot of metric vs weight and the paper's Figure 2 (reconstructions trained
with L2 only, LPIPS only and L2 + LPIPS, side by side).

Bench config (YAML)::

    title: Quick look                         # README title
    seeds: [0]
    metrics: [knn_conv5, knn_fc7]             # table columns
    recon: {weight: 1.0, net: alex}           # the +recon block (also used by recon-only)
    common: {train.epochs: 2}                 # dotted overrides for every run
    methods:
      deepcluster: {config: benchmarks/configs/smoke/deepcluster.yaml, set: {data.per_class: 50}}
    references: {deepcluster: [random-init, supervised, recon-only]}

Ablate config: ``title``, ``seeds``, ``metrics``, ``method: {config, set}``, ``recon`` (the
default block) and ``axes: {weight: [0, 0.3, 1, 3], mix: [l2, lpips, l2+lpips], net: [alex, vgg],
resize_to: [null, 64], layer: [...]}``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from adapters.config import RunConfigError, config_diff, load_run_config
from adapters.engine import machine, train
from recon_aux import ReconAuxConfig

from . import report

__all__ = ["run_bench", "run_ablate", "load_bench_config"]

RESULTS = Path("benchmarks/results")
MIXES = {"l2": (1.0, 0.0), "lpips": (0.0, 1.0), "l2+lpips": (1.0, 1.0)}


def load_bench_config(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RunConfigError(f"bench config {path} does not exist.")
    cfg = yaml.safe_load(path.read_text()) or {}
    for item in overrides:
        if "=" not in item:
            raise RunConfigError(f"override {item!r} is not key=value.")
        key, raw = item.split("=", 1)
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    cfg.setdefault("name", path.stem)
    cfg.setdefault("seeds", [0])
    cfg.setdefault("title", cfg["name"])
    return cfg


def _dotted(mapping: dict | None) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in (mapping or {}).items()]


def _run_config(source: dict, extra: list[str], name: str,
                final: list[str] = ()) -> dict[str, Any]:
    """The run config of ``source`` with overrides: ``extra``, then the source's own ``set``,
    then ``final`` (what defines the row: base/+recon, a reference's epochs or method)."""
    cfg = load_run_config(source["config"], [*extra, *_dotted(source.get("set")), *final])
    cfg["name"] = name
    return cfg


class Matrix:
    """A list of planned runs, a results file, and the loop that fills it."""

    def __init__(self, name: str, out: Path | None, progress: bool | None,
                 replace_changed: bool = False) -> None:
        self.out = out or RESULTS / name
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_file = self.out / "results.json"
        self.runs: list[dict[str, Any]] = []
        self.superseded: list[dict[str, Any]] = []
        if self.results_file.is_file():
            saved = json.loads(self.results_file.read_text())
            self.runs, self.superseded = saved["runs"], saved.get("superseded", [])
        self.replace_changed = replace_changed
        self.plan: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        self.progress = progress
        self.run_root = Path("runs") / "bench" / name

    def planned(self, run_id: str) -> bool:
        return any(p[0] == run_id for p in self.plan)

    def add(self, run_id: str, cfg: dict[str, Any], meta: dict[str, Any]) -> None:
        cfg["run"]["out_dir"] = str(self.run_root / run_id)
        cfg["run"]["progress"] = False
        self.plan.append((run_id, cfg, meta))

    def _check_changed(self) -> None:
        """A finished run whose config differs from the plan's is never silently reused: it is an
        error, or with ``replace_changed`` it moves to ``superseded`` (kept in results.json, out
        of the tables) and runs again."""
        planned = {run_id: cfg for run_id, cfg, _ in self.plan}
        changed = {}
        for r in self.runs:
            if r["id"] in planned:
                diff = config_diff(_plain(r["config"]), _plain(planned[r["id"]]))
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
            pic = Path(other) / "pictures" / f"{r['id']}.png"
            if pic.is_file():
                (self.out / "pictures").mkdir(exist_ok=True)
                (self.out / "pictures" / pic.name).write_bytes(pic.read_bytes())
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
        bar = _bar(len(todo), self.progress)
        t0 = time.perf_counter()
        for i, (run_id, cfg, meta) in enumerate(todo):
            if bar is None:
                eta = (time.perf_counter() - t0) / i * (len(todo) - i) if i else float("nan")
                print(f"run {i + 1}/{len(todo)}: {run_id} (ETA {eta / 60:.1f} min)", flush=True)
            else:
                bar.set_description(f"run {i + 1}/{len(todo)} {run_id}")
            result = train(cfg)
            entry = {"id": run_id, "method": meta.get("method", cfg["method"]["name"]),
                     "recon": cfg["recon"] if cfg["recon"] is not None else False,
                     "seed": cfg["train"]["seed"], "reference": meta.get("reference"),
                     "ablation": meta.get("ablation"), "metrics": result["metrics"],
                     "config": result["config"], "wall_s": result["wall_s"],
                     "machine": result["machine"], "history": result["history"],
                     "train_images": result["train_images"], "test_images": result["test_images"]}
            self.runs.append(entry)
            self._save()
            picture = Path(cfg["run"]["out_dir"]) / "reconstructions.png"
            if picture.is_file():
                (self.out / "pictures").mkdir(exist_ok=True)
                (self.out / "pictures" / f"{run_id}.png").write_bytes(picture.read_bytes())
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        planned = {p[0] for p in self.plan}
        return [r for r in self.runs if r["id"] in planned]

    def _save(self) -> None:
        tmp = self.results_file.with_suffix(".tmp")
        saved: dict[str, Any] = {"runs": self.runs}
        if self.superseded:
            saved["superseded"] = self.superseded
        tmp.write_text(json.dumps(saved, indent=1))
        os.replace(tmp, self.results_file)


def _plain(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` as results.json stores it (tuples become lists), for comparisons."""
    return json.loads(json.dumps(cfg))


def _bar(total: int, enabled: bool | None):
    if enabled is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    bar = tqdm(total=total, unit="run", disable=None if enabled is None else not enabled)
    return None if bar.disable else bar


def _setup_line(runs: list[dict[str, Any]]) -> str:
    lines = ["How it was measured:", ""]
    seen = set()
    for r in runs:
        c = r["config"]
        key = (r["method"], c["backbone"].get("name"))
        if key in seen:
            continue
        seen.add(key)
        b = ", ".join(f"{k}={v}" for k, v in c["backbone"].items())
        d, t, e = c["data"], c["train"], c["eval"]
        lines.append(
            f"- {r['method']}: backbone {b}; {c['data']['dataset']} {r['train_images']} train "
            f"images ({d['per_class']}/class) and {r['test_images']} test images; "
            f"{t['epochs']} epochs, batch {d['batch_size']}, SGD lr {t['lr']} "
            f"({t['lr_schedule']}), wd {t['weight_decay']}; augment "
            f"{d['augment'] or 'method default'}; eval {json.dumps(e)}")
    seeds = sorted({r["seed"] for r in runs})
    machines = " / ".join(sorted({r["machine"] for r in runs})) if runs else machine()
    lines.append(f"- seeds {seeds}; machine: {machines}; "
                 f"total run time {sum(r['wall_s'] for r in runs) / 60:.1f} min.")
    lines.extend(_evaluation_lines(runs))
    recon = next((r["recon"] for r in runs if r["recon"]), None)
    if recon:
        lines.append(f"- +recon block: {json.dumps(recon)}")
    return "\n".join(lines)


def _evaluation_lines(runs: list[dict[str, Any]]) -> list[str]:
    """What every run's evaluation did beyond its top-1: BN recalibration, probe fits."""
    details = [r.get("evaluation") or {} for r in runs]
    images = sorted({(d.get("bn_recalibration") or {}).get("images", 0) for d in details})
    if images == [0]:
        lines = ["- BatchNorm statistics NOT recalibrated before evaluation (runs older than "
                 "the fair protocol)."]
    else:
        lines = [f"- every network (random-init included) evaluated with its BatchNorm "
                 f"statistics recalibrated on {' / '.join(map(str, images))} clean training "
                 "images (no weight change)."]
    probes = sorted({k for d in details for k in d if k != "bn_recalibration"})
    for key in probes:
        fits = [d[key] for d in details if key in d]
        top1 = [f["train_top1"] for f in fits]
        levelled = [f["levelled_off"] for f in fits if f.get("levelled_off") is not None]
        recipes = sorted({str(f.get("recipe")) for f in fits})
        lines.append(
            f"- {key} ({', '.join(recipes)}): final train top-1 {min(top1):.1f}-{max(top1):.1f}, "
            f"epochs run {min(f['epochs_run'] for f in fits)}-"
            f"{max(f['epochs_run'] for f in fits)}"
            + (f", training loss levelled off in {sum(levelled)}/{len(levelled)} runs"
               if levelled else ""))
    return lines


def _add_references(matrix: Matrix, cfg: dict[str, Any], src: dict[str, Any], ref_from: str,
                    rows: list[str], common: list[str], seed: int) -> None:
    """Plan the reference rows (random-init, supervised, recon-only) on ``src``'s backbone,
    data and evaluation."""
    recon_set = [f"recon={json.dumps(cfg.get('recon') or {})}"]
    for row in rows:
        final = {
            "random-init": ["recon=null", "train.epochs=0"],
            "supervised": ["recon=null", "method={name: supervised}"],
            "recon-only": [*recon_set, "method={name: recon_only}"],
        }.get(row)
        if final is None:
            raise RunConfigError(f"unknown reference row {row!r}; use random-init, "
                                 "supervised, recon-only.")
        rc = _run_config(src, [*common, f"train.seed={seed}"], cfg["name"], final)
        backbone = rc["backbone"]["name"]
        run_id, label = f"{row}-{backbone}-seed{seed}", f"{row} ({backbone})"
        if matrix.planned(run_id):  # a second method's reference on the same backbone,
            # e.g. with its own evaluation (AET's non-linear probe): its own row
            run_id = f"{row}-{backbone}-{ref_from}-seed{seed}"
            label = f"{row} ({backbone}, {ref_from}'s evaluation)"
        matrix.add(run_id, rc, {"reference": label, "method": row})


def run_bench(cfg: dict[str, Any], out: Path | None = None,
              progress: bool | None = None, replace_changed: bool = False,
              report_only: bool = False, merge: Path | None = None) -> Path:
    """Run (or resume) a bench config; returns the results folder. ``report_only`` trains
    nothing and writes the README from the finished runs (marked PARTIAL if any is missing)."""
    matrix = Matrix(cfg["name"], out, progress, replace_changed)
    common = _dotted(cfg.get("common"))
    recon = cfg.get("recon") or {}
    recon_set = [f"recon={json.dumps(recon)}"]
    for seed in cfg["seeds"]:
        for ref_from, rows in (cfg.get("references") or {}).items():
            src = cfg["methods"].get(ref_from)
            if src is not None:
                _add_references(matrix, cfg, src, ref_from, rows, common, seed)
        for method, src in cfg["methods"].items():
            if src is None:  # switched off on the command line: methods.aet=null
                continue
            for variant in ("base", "recon"):
                final = recon_set if variant == "recon" else ["recon=null"]
                rc = _run_config(src, [*common, f"train.seed={seed}"], cfg["name"], final)
                matrix.add(f"{method}-{variant}-seed{seed}", rc, {"method": method})
    if merge is not None:
        matrix.merge(merge)
    runs = matrix.execute(report_only)
    cfg = _mark_partial(cfg, matrix)
    _write_report(matrix.out, cfg, runs)
    return matrix.out


def _mark_partial(cfg: dict[str, Any], matrix: Matrix) -> dict[str, Any]:
    """The config with a PARTIAL title and a note listing the missing runs, if any are missing."""
    missing = matrix.missing()
    if not missing:
        return cfg
    cfg = dict(cfg)
    cfg["title"] = f"PARTIAL: {cfg['title']}"
    n = len(matrix.plan)
    cfg["notes"] = (f"**PARTIAL**: {n - len(missing)} of {n} planned runs finished; not run "
                    f"yet: {', '.join(missing)}. The matrix resumes: run the same command "
                    "again.\n\n" + cfg.get("notes", ""))
    return cfg


def _write_report(out: Path, cfg: dict[str, Any], runs: list[dict[str, Any]],
                  extra_notes: str = "", extra_pictures: tuple[str, ...] = (),
                  all_runs: list[dict[str, Any]] | None = None) -> None:
    """README, curves and table of ``runs``; ``all_runs`` (default ``runs``) for the setup line
    and the metric list when the table shows a subset (the ablation)."""
    all_runs = runs if all_runs is None else all_runs
    metrics = cfg.get("metrics") or sorted({m for r in all_runs for m in r["metrics"]
                                            if not m.startswith("final")})
    pictures = list(extra_pictures)
    if report.plot_curves(runs, out / "curves.png", ["method_loss", "recon_l2", "recon_lpips"]):
        pictures.append("curves.png")
    if (out / "pictures").is_dir():
        pictures += sorted(f"pictures/{p.name}" for p in (out / "pictures").glob("*.png"))
    text = report.render_readme(cfg["title"], runs, metrics, _setup_line(all_runs),
                                pictures=pictures, notes=cfg.get("notes", "") + extra_notes)
    (out / "README.md").write_text(text)
    print(report.render_table(runs, metrics))
    print(f"results: {out / 'README.md'} (pictures in {out})")


def run_ablate(cfg: dict[str, Any], out: Path | None = None,
               progress: bool | None = None, replace_changed: bool = False,
               report_only: bool = False, merge: Path | None = None) -> Path:
    """Run (or resume) an ablation config; returns the results folder (``report_only`` and
    ``merge``: as :func:`run_bench`)."""
    matrix = Matrix(cfg["name"], out, progress, replace_changed)
    common = _dotted(cfg.get("common"))
    default = dict(cfg.get("recon") or {})
    first_id: dict[str, str] = {}  # run config hash -> id of the run that computes it
    aliases: dict[str, tuple[str, dict]] = {}  # id shown on another axis -> (run id, ablation)
    main_keys: set[str] = set()  # the base (weight 0) and default +recon points: the main table
    for seed in cfg["seeds"]:
        if cfg.get("references"):
            _add_references(matrix, cfg, cfg["method"], "method", cfg["references"], common,
                            seed)
        for axis, values in cfg["axes"].items():
            for value in values:
                recon = copy.deepcopy(default)
                if axis == "weight" and value == 0:
                    recon = None  # weight 0 is the base method, not a head that trains alone
                elif axis == "mix":
                    if value not in MIXES:
                        raise RunConfigError(f"mix {value!r} is not one of {sorted(MIXES)}.")
                    recon["l2_weight"], recon["lpips_weight"] = MIXES[value]
                else:
                    recon[axis] = value
                rc = _run_config(cfg["method"], [*common, f"train.seed={seed}"], cfg["name"],
                                 [f"recon={json.dumps(recon)}"])
                key = hashlib.sha256(json.dumps([_recon_key(rc["recon"]), seed],
                                                sort_keys=True).encode()).hexdigest()
                run_id = f"{axis}={_shown(value)}-seed{seed}".replace("/", "_").replace(" ", "")
                if recon is None or recon == default:
                    main_keys.add(key)
                if key in first_id:  # the default point appears on every axis: run it once
                    aliases[run_id] = (first_id[key], {axis: value})
                    continue
                first_id[key] = run_id
                matrix.add(run_id, rc, {"method": rc["method"]["name"],
                                        "ablation": {axis: value}})
    if merge is not None:
        matrix.merge(merge)
    runs = matrix.execute(report_only)
    cfg = _mark_partial(cfg, matrix)
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


def _recon_key(recon: dict[str, Any] | None) -> dict[str, Any] | None:
    """The recon block with every default filled in, so that ``resize_to: null`` and a block
    without ``resize_to`` are recognised as the same run."""
    if recon is None:
        return None
    fields = ReconAuxConfig.from_any({k: v for k, v in recon.items() if k != "layer"}).to_dict()
    return {**fields, "layer": recon.get("layer")}


def _axis_value(run: dict[str, Any], axis: str):
    abl = run.get("ablation") or {}
    return abl.get(axis)


def _on_axis(run: dict[str, Any], axis: str, value: Any) -> bool:
    """Whether ``run`` is the ``axis=value`` point (``value`` may be None: resize_to=None)."""
    abl = run.get("ablation") or {}
    return axis in abl and abl[axis] == value


def _shown(value: Any) -> str:
    return "+".join(map(str, value)) if isinstance(value, list) else str(value)


def _write_ablation_report(out: Path, cfg: dict[str, Any], runs: list[dict[str, Any]],
                           table: list[dict[str, Any]],
                           unique: list[dict[str, Any]] | None = None) -> None:
    """The README: ``table`` (references, the base method = weight 0, the default +recon block)
    as the main table, then one section per axis over ``runs``, the weight plot and Figure 2."""
    metrics = cfg.get("metrics") or sorted({m for r in runs for m in r["metrics"]
                                            if not m.startswith("final")})
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
            p = report._paired(diffs, "better", "worse")  # the tables' "clear" rule
            cells.append(f"{p['mean']:+.1f}" + ("" if p["verdict"] == "no clear difference"
                                                 else "*"))
        return " / ".join(cells)

    for axis, values in cfg["axes"].items():
        rows = []
        for value in values:
            sel = [r for r in runs if _on_axis(r, axis, value)]
            cells = []
            for m in metrics:
                vals = [r["metrics"][m] for r in sel if m in r["metrics"]]
                mean, std = report._mean_std(vals)
                cells.append("-" if not vals else
                             (f"{mean:.1f} ± {std:.1f}" if len(vals) > 1 else f"{mean:.1f}"))
            cells += [paired(sel, against["base"]), paired(sel, against["recon-only"])]
            rows.append(f"| {axis}={_shown(value)} | " + " | ".join(cells)
                        + f" | {len(sel)} |")
        sections.append(f"### {axis}\n\n| setting | " + " | ".join(metrics)
                        + " | − base (paired) | − recon-only (paired) | seeds |\n|---|"
                        + "---|" * (len(metrics) + 3) + "\n" + "\n".join(rows) + "\n")
    if "weight" in cfg["axes"]:
        points = {m: [(float(_axis_value(r, "weight")), r["metrics"][m]) for r in runs
                      if _axis_value(r, "weight") is not None and m in r["metrics"]]
                  for m in metrics}
        if report.plot_ablation(points, out / "metric_vs_weight.png", "recon weight",
                                "top-1 %"):
            pictures.append("metric_vs_weight.png")
    if "mix" in cfg["axes"] and _figure2(out, cfg):
        pictures.append("figure2.png")
    notes = ("\n## Ablation (one knob at a time around the default +recon block)\n\n"
             "The table above holds the reference rows, the base method (weight 0) and the "
             "default +recon block; every setting of every axis follows, with its mean paired "
             "difference (same seed) to the base method and to recon-only, one number per "
             f"metric in the order {' / '.join(metrics)}; * marks a difference larger than "
             "its std over seeds.\n\n"
             + "\n".join(sections)
             + "\nweight=0 is the base method (recon: null). The default point is run once and "
               "shown on every axis.\n")
    _write_report(out, cfg, table, extra_notes=notes, extra_pictures=tuple(pictures),
                  all_runs=runs if unique is None else unique)


def _figure2(out: Path, cfg: dict[str, Any]) -> bool:
    """The paper's Figure 2: reconstructions with L2 only, LPIPS only, L2 + LPIPS."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.image as mpimg
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    seed = cfg["seeds"][0]
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
