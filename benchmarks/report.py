"""Results tables, curves and picture sheets for ``recon-aux bench`` / ``recon-aux ablate``.

Everything here reads the ``results.json`` of a benchmark (``{"runs": [...]}``, one entry per
finished run) and renders it; nothing trains. The table says, for every method, base and +recon
as mean +- std over seeds, the paired difference (+recon minus base, per seed) with its std and
how many seeds improved, and calls a difference smaller than its std "no clear difference".
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adapters.devices import machine

__all__ = ["PAPER", "summarise", "render_table", "render_readme", "render_setup", "verdicts",
           "render_verdicts", "evaluation_lines", "plot_curves", "plot_ablation", "label_of",
           "mean_std", "paired", "format_cell", "format_paired", "tapped_layers", "NO_PAIR",
           "no_pair_reason"]

# The paper's numbers (Hizioglu 2020), AlexNet, full data, paper-scale training.
PAPER = {
    "table1_cifar10": {  # linear classifier on conv5 / weighted kNN on FC (Table 1, CIFAR-10)
        "supervised": (91.8, 91.9), "deepcluster": (77.9, 62.3), "sela": (83.4, 77.6),
        "sela+recon (paper's method)": (83.6, 77.9),
    },
    "table3_cifar10_error": {"aet-project + FC": 9.41, "aet-project + FC + recon": 9.01},
}

# What the paper claims for each method, beside which each verdict is printed.
PAPER_CLAIMS = {
    "sela": "Table 1 (CIFAR-10, AlexNet, full scale): linear conv5 83.4 -> 83.6 (+0.2), "
            "weighted kNN on FC 77.6 -> 77.9 (+0.3); Table 2 (ImageNet, a smaller SeLa): "
            "linear conv3/4/5 +0.4/+0.6/+0.3",
    "deepcluster": "no number: the paper's Table 1 lists DeepCluster only as a baseline "
                   "(linear conv5 77.9, kNN 62.3), never with the objective",
    "aet": "Table 3 (CIFAR-10, AET-project + FC, non-linear probe): error 9.41 -> 9.01 "
           "(accuracy +0.40)",
    "simclr": "not in the paper (a modern method added here)",
}

REFERENCE_ORDER = ("random-init", "supervised", "recon-only")


def label_of(run: dict[str, Any]) -> str:
    """Row label: reference rows by name, methods as 'name' / 'name +recon'."""
    ref = run.get("reference")
    if ref:
        return ref
    return run["method"] + (" +recon" if run["recon"] else "")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std of ``values`` (std 0 for one value; NaN, NaN for none)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(diffs: list[float], better: str, worse: str) -> dict[str, Any]:
    """Paired differences (same seed) summarised: mean, std, n, how many are > 0, whether the
    difference is ``clear`` (two seeds or more and the mean larger than the std: the one
    definition of "clear"), and the verdict the tables print: ``better``/``worse`` when clear,
    "no clear difference" when not, "unclear: one seed" with one (no std to hold it against)."""
    mean, std = mean_std(diffs)
    clear = len(diffs) > 1 and abs(mean) > std
    if clear:
        verdict = better if mean > 0 else worse
    else:
        verdict = "no clear difference" if len(diffs) > 1 else "unclear: one seed"
    return {"mean": mean, "std": std, "n": len(diffs), "improved": sum(d > 0 for d in diffs),
            "clear": clear, "verdict": verdict}


def _reference_of(kind: str, run: dict[str, Any], runs: list[dict[str, Any]], metric: str):
    """The ``kind`` reference run (random-init, recon-only) of ``run``'s seed and backbone that
    has ``metric``: for random-init, the untrained network the method started from (the engine
    seeds before building the backbone). Where the matrix has that reference on ``run``'s own
    method's recipe (``ref_from``, see ``matrix.add_references``) for any seed, only those
    count (a seed without one has no pair: recipes are never mixed over seeds); else the
    shared one (the first method's, which has no ``ref_from``)."""
    backbone = (run.get("config") or {}).get("backbone")
    kind_runs = [r for r in runs if (r.get("reference") or "").startswith(kind)
                 and (r.get("config") or {}).get("backbone") == backbone]
    own = any(r.get("ref_from") == run.get("method") for r in kind_runs)
    for r in kind_runs:
        if (r["seed"] == run["seed"] and metric in r["metrics"]
                and r.get("ref_from") == (run.get("method") if own else None)):
            return r
    return None


def summarise(runs: list[dict[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """Per row label and metric: values by seed, mean, std; per method: paired differences
    (+recon minus base, base minus the random-init network it started from, and +recon minus
    the objective alone, recon-only, of the same seed)."""
    rows: dict[str, dict[str, dict[int, float]]] = {}
    for run in runs:
        by_metric = rows.setdefault(label_of(run), {})
        for m in metrics:
            if m in run["metrics"]:
                by_metric.setdefault(m, {})[run["seed"]] = run["metrics"][m]
    out: dict[str, Any] = {"rows": {}, "paired": {}, "vs_random": {}, "vs_recon_only": {}}
    for label, by_metric in rows.items():
        out["rows"][label] = {m: dict(zip(("mean", "std"), mean_std(list(v.values()))),
                                      n=len(v)) for m, v in by_metric.items()}
    methods = sorted({r["method"] for r in runs if not r.get("reference")})
    for method in methods:
        base, plus = rows.get(method, {}), rows.get(method + " +recon", {})
        for m in metrics:
            seeds = sorted(set(base.get(m, {})) & set(plus.get(m, {})))
            if not seeds:
                continue
            diffs = [plus[m][s] - base[m][s] for s in seeds]
            out["paired"].setdefault(method, {})[m] = paired(diffs, "+recon better",
                                                               "+recon worse")
        for key, kind, recon, words in (
                ("vs_random", "random-init", False, ("beats random init", "below random init")),
                ("vs_recon_only", "recon-only", True, ("+recon better", "recon-only better"))):
            own = [r for r in runs if not r.get("reference") and r["method"] == method
                   and bool(r["recon"]) == recon]
            for m in metrics:
                pairs = [(r, _reference_of(kind, r, runs, m)) for r in own if m in r["metrics"]]
                diffs = [r["metrics"][m] - ref["metrics"][m] for r, ref in pairs
                         if ref is not None]
                if diffs:
                    out[key].setdefault(method, {})[m] = paired(diffs, *words)
    return out


def format_cell(cell: dict | None, show_n: bool = False) -> str:
    """A ``{"mean", "std", "n"}`` cell as the tables print it: ``40.5 ± 0.7`` (``40.5 ± 0.7
    (n=3)`` with ``show_n``, for a table whose cells have different numbers of seeds),
    ``40.0 (n=1)`` for one run, ``-`` for none."""
    if not cell or math.isnan(cell["mean"]):
        return "-"
    if cell["n"] > 1:
        return f"{cell['mean']:.1f} ± {cell['std']:.1f}" + (f" (n={cell['n']})" if show_n else "")
    return f"{cell['mean']:.1f} (n=1)"


def format_paired(p: dict | None) -> str:
    """A :func:`paired` summary as the tables print it: ``+2.5 ± 0.7 (2/2 seeds up; +recon
    better)``, ``+2.0 (n=1) (1/1 seeds up; unclear: one seed)`` for one seed, ``-`` for none."""
    if p is None:
        return "-"
    spread = f"± {p['std']:.1f}" if p["n"] > 1 else "(n=1)"
    return (f"{p['mean']:+.1f} {spread} ({p['improved']}/{p['n']} seeds up; "
            f"{p['verdict']})")


def render_table(runs: list[dict[str, Any]], metrics: Sequence[str]) -> str:
    """Markdown table: reference rows, then per method base, +recon and the paired difference."""
    s = summarise(runs, metrics)
    header = "| run | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
    lines = []
    refs = {r["reference"] for r in runs if r.get("reference")}
    labels = sorted(refs, key=lambda lab: (next((i for i, p in enumerate(REFERENCE_ORDER)
                                                 if lab.startswith(p)), 99), lab))
    methods = sorted({r["method"] for r in runs if not r.get("reference")})
    # rows averaged over different numbers of seeds say so (a paired row uses only the seeds
    # both of its rows have: its "x/n seeds up" gives its n)
    show_n = len({c["n"] for row in s["rows"].values() for c in row.values() if c["n"] > 1}) > 1
    for label in labels:
        cells = [format_cell(s["rows"][label].get(m), show_n) for m in metrics]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for method in methods:
        for label in (method, method + " +recon"):
            if label in s["rows"]:
                cells = [format_cell(s["rows"][label].get(m), show_n) for m in metrics]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        for key, what in (("vs_random", "base − random-init"), ("paired", "+recon − base"),
                          ("vs_recon_only", "+recon − recon-only")):
            diffs = s[key].get(method)
            if diffs:
                lines.append(f"| {method}: {what} (paired) | "
                             + " | ".join(format_paired(diffs.get(m)) for m in metrics) + " |")
    return header + "\n".join(lines) + "\n"


def verdicts(runs: list[dict[str, Any]], metrics: Sequence[str],
             summary: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per method: does the objective upgrade it at this scale? ``answer`` is "yes", "no" or
    "unclear", with the ``reason`` and the paired rows it rests on.

    The rule, from the paired differences over seeds (a difference is "clear" when larger than
    its std, see :func:`paired`):

    - "unclear" with fewer than two seeds, or when the base method does not clearly beat the
      random-init network on any metric, or there is no random-init row to tell (there is then
      nothing shown to be learned to upgrade);
    - "yes" when +recon is clearly better than the base method on most of the table's metrics
      (a metric without pairs counts as not better) and clearly worse on none;
    - "no" when it is clearly better on none (clearly worse, or no clear difference);
    - "unclear" otherwise (mixed).

    Whether +recon also beats the objective alone (recon-only) is reported beside it: a "yes"
    that recon-only matches says the gain may be the objective's own, not an upgrade.
    ``summary`` is :func:`summarise`'s result for these runs when the caller has it already.
    """
    s = summarise(runs, metrics) if summary is None else summary
    out: dict[str, dict[str, Any]] = {}
    for method in sorted(s["paired"]):
        up = s["paired"][method]
        vs_random = s["vs_random"].get(method, {})
        vs_recon = s["vs_recon_only"].get(method, {})
        better = [m for m in up if up[m]["verdict"] == "+recon better"]
        worse = [m for m in up if up[m]["verdict"] == "+recon worse"]
        learned = [m for m in vs_random if vs_random[m]["verdict"] == "beats random init"]
        if min(p["n"] for p in up.values()) < 2:
            answer, reason = "unclear", "fewer than two seeds"
        elif not vs_random:
            answer, reason = "unclear", ("no random-init row to show that the base method "
                                         "learned anything at this scale")
        elif not learned:
            answer, reason = "unclear", ("the base method does not clearly beat the random-init "
                                         "network on any metric at this scale")
        elif len(better) > len(metrics) / 2 and not worse:  # most of the table's metrics
            answer, reason = "yes", f"+recon clearly better on {', '.join(better)}"
        elif not better:
            answer = "no"
            reason = (f"+recon clearly worse on {', '.join(worse)}" if worse
                      else "no clear difference on any metric")
        else:
            answer = "unclear"
            reason = (f"mixed: +recon clearly better on {', '.join(better)}"
                      + (f", clearly worse on {', '.join(worse)}" if worse else "")
                      + ", no clear difference on the rest")
        out[method] = {"answer": answer, "reason": reason, "paired": up,
                       "vs_random": vs_random, "vs_recon_only": vs_recon,
                       "learned_on": learned, "paper": PAPER_CLAIMS.get(method, "")}
    return out


#: The reason given for a method whose base and +recon runs share no seed yet (see
#: :func:`no_pair_reason` for the other two cases).
NO_PAIR = "no +recon row yet"


def no_pair_reason(runs: list[dict[str, Any]], method: str) -> str:
    """Why ``method`` has no verdict: no +recon row yet (:data:`NO_PAIR`), no base row (a
    matrix that varies the objective only, such as an ablation of one knob), or base and
    +recon rows that share no seed yet."""
    own = [r for r in runs if not r.get("reference") and r["method"] == method]
    has_base, has_recon = any(not r["recon"] for r in own), any(r["recon"] for r in own)
    if has_recon and not has_base:
        return "no base row: this matrix varies the objective only"
    if has_recon and has_base:
        return "its base and +recon rows share no seed yet"
    return NO_PAIR


def render_verdicts(runs: list[dict[str, Any]], metrics: Sequence[str]) -> str:
    """A bullet per method: the verdict, the paired rows behind it, and the paper's claim."""
    def cells(rows: dict[str, Any]) -> str:
        return "; ".join(f"{m} {format_paired(rows[m])}" for m in metrics if m in rows) or "-"

    lines = []
    found = verdicts(runs, metrics)
    for method, v in found.items():
        lines.append(
            f"- **{method}: {v['answer']}** ({v['reason']}).\n"
            f"  +recon − base: {cells(v['paired'])}.\n"
            f"  base − random-init: {cells(v['vs_random'])}.\n"
            f"  +recon − recon-only: {cells(v['vs_recon_only'])}.\n"
            f"  The paper: {v['paper']}.")
    for method in sorted({r["method"] for r in runs if not r.get("reference")} - set(found)):
        lines.append(f"- **{method}: unclear** ({no_pair_reason(runs, method)}).")
    return "\n".join(lines)


def render_readme(title: str, runs: list[dict[str, Any]], metrics: Sequence[str],
                  setup: str, pictures: Sequence[str] = (), notes: str = "",
                  local_pictures: Sequence[str] = ()) -> str:
    """A results README: how it was measured, the table, the paper's numbers, the caveats.

    ``pictures`` (plots) are shown; ``local_pictures`` (reconstructions beside their inputs) are
    only named: they show the data set's images, which the repository does not hold.
    """
    paper = PAPER["table1_cifar10"]
    paper_rows = "\n".join(f"| {k} | {v[0]} | {v[1]} |" for k, v in paper.items())
    aet = PAPER["table3_cifar10_error"]
    aet_rows = "\n".join(f"| {k} | {v} | {100 - v:.2f} |" for k, v in aet.items())
    pics = "\n".join(f"![{p}]({p})" for p in pictures)
    if local_pictures:
        n = len(local_pictures)
        named = ", ".join(f"`{p}`" for p in local_pictures[:3]) + (", ..." if n > 3 else "")
        pics += (f"\n\nReconstructions, each beside its input images ({named}; {n} PNG "
                 f"file{'s' * (n != 1)}), are written into this results folder when the matrix "
                 "runs. They are not committed: they show the data set's images.")
    return f"""# {title}

## Verdict: does the objective upgrade each method at this scale?

{render_verdicts(runs, metrics)}

The rule (benchmarks/report.py, `verdicts`): "yes" when +recon is clearly better than the base
method (paired over seeds, mean larger than its std) on most metrics and clearly worse on none;
"no" when it is clearly better on none; "unclear" when mixed, with fewer than two seeds, or when
the base method does not clearly beat the untrained network it started from. LPIPS brings
ImageNet supervision (see the caveat below).

{setup}

## Results (top-1 %, test set)

{render_table(runs, metrics)}
Rows: `random-init` is the same backbone untrained; `supervised` the same backbone trained with
labels at the same scale; `recon-only` the auxiliary objective alone (same head and loss, no
method loss). `base − random-init (paired)` compares each seed's base run with the untrained
network it started from (same seed, same backbone, same evaluation): a method that does not
clearly beat random init says the scale or the recipe is too small, and its +recon comparison
means little. `+recon − recon-only (paired)` compares the method with the objective against the
objective alone (same seed; on the method's own recipe where the table has a "recon-only (...,
<method>'s recipe)" row, else the shared row): where recon-only is as good, the gain may be the
objective's own.
A paired difference smaller than its std over seeds is reported as "no clear difference"; with
one seed there is no std: "n=1" is shown, the difference is "unclear: one seed", and nothing is
called clear.

## The paper's numbers, for comparison (not comparable in scale)

Hizioglu (2020), Table 1, CIFAR-10, AlexNet at paper scale (full 50k images, hundreds of
epochs, GPU): linear probe on conv5 / weighted kNN on FC.

| method | linear conv5 | kNN FC |
|---|---|---|
{paper_rows}

Table 3, CIFAR-10, non-linear probe, error rate (and accuracy):

| method | error % | accuracy % |
|---|---|---|
{aet_rows}

The runs above are far smaller than the paper's (the setup line gives their images, epochs and
machine): their absolute numbers are far below the paper's, and only the base vs +recon
comparison within this table is meaningful.

## Caveat: LPIPS brings ImageNet supervision

LPIPS's AlexNet/VGG backbone was trained on labelled ImageNet, so part of any gain from the LPIPS
term may be transferred supervision rather than self-supervision; the L2-only setting (see the
ablation) is the clean comparison.

{notes}

{pics}
"""


def render_setup(runs: list[dict[str, Any]],
                 table_runs: list[dict[str, Any]] | None = None) -> str:
    """The "How it was measured" lines: per row (a method, or a reference row with its recipe)
    its backbone, data, schedule, augmentation and evaluation; the seeds, machines and run time;
    what the evaluation did; the +recon block of the rows in the table (``table_runs``, default
    ``runs``), each distinct one with the rows that used it."""
    lines = ["How it was measured:", ""]
    seen = set()
    for r in runs:
        c = r["config"]
        label = r.get("reference") or r["method"]  # a reference's label names its recipe
        key = (label, c["backbone"].get("name"))
        if key in seen:
            continue
        seen.add(key)
        b = ", ".join(f"{k}={v}" for k, v in c["backbone"].items())
        d, t, e = c["data"], c["train"], c["eval"]
        lines.append(
            f"- {label}: backbone {b}; {c['data']['dataset']} {r['train_images']} train "
            f"images ({d['per_class']}/class) and {r['test_images']} test images; "
            f"{t['epochs']} epochs, batch {d['batch_size']}, SGD lr {t['lr']} "
            f"({t['lr_schedule']}), wd {t['weight_decay']}; augment "
            f"{d['augment'] or 'method default'}; eval {json.dumps(e)}")
    seeds = sorted({r["seed"] for r in runs})
    machines = " / ".join(sorted({r["machine"] for r in runs})) if runs else machine()
    lines.append(f"- seeds {seeds}; machine: {machines}; "
                 f"total run time {sum(r['wall_s'] for r in runs) / 60:.1f} min.")
    lines.extend(evaluation_lines(runs))
    blocks: dict[str, list[str]] = {}
    for r in table_runs if table_runs is not None else runs:
        if r["recon"]:
            rows = blocks.setdefault(json.dumps(r["recon"]), [])
            label = r.get("reference") or f"{r['method']} +recon"
            if label not in rows:
                rows.append(label)
    if len(blocks) == 1:
        lines.append(f"- +recon block: {next(iter(blocks))}")
    elif blocks:
        lines.append("- +recon blocks: " + "; ".join(f"{block} ({', '.join(rows)})"
                                                    for block, rows in blocks.items()))
    tapped = tapped_layers([r for r in runs if r["config"].get("recon")])
    if tapped:
        lines.append(f"- tapped layer (recon.layer, or what layer=None chose): "
                     f"{', '.join(tapped)}")
    return "\n".join(lines)


def tapped_layers(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The distinct layers ``runs`` tapped (``tapped`` in results.json), sorted; "not recorded"
    for a run without it."""
    return sorted({r.get("tapped") or "not recorded" for r in runs})


def evaluation_lines(runs: list[dict[str, Any]]) -> list[str]:
    """What every run's evaluation did beyond its top-1: BN recalibration, probe fits."""
    details = [r.get("evaluation") or {} for r in runs]
    # bn_layers 0: a network without BatchNorm (a ViT), which has nothing to recalibrate
    with_bn = [info for d in details
               if (info := d.get("bn_recalibration") or {}).get("bn_layers") != 0]
    images = sorted({info.get("images", 0) for info in with_bn})
    if not with_bn:
        lines = ["- no BatchNorm layer in these networks: nothing to recalibrate before "
                 "evaluation."]
    elif images == [0]:
        lines = ["- BatchNorm statistics NOT recalibrated before evaluation (runs older than "
                 "the fair protocol, or eval.bn_recalibration_images: null)."]
    else:
        untrained = any((r.get("reference") or "").startswith("random-init") for r in runs)
        stale = sorted({r.get("reference") or r["method"] for r, d in zip(runs, details)
                        if (info := d.get("bn_recalibration") or {}).get("bn_layers") != 0
                        and not info.get("images")})
        but = f" but {', '.join(stale)}" if stale else ""
        lines = [f"- every network{but}{' (random-init included)' if untrained else ''} "
                 f"evaluated with its BatchNorm statistics recalibrated on "
                 f"{' / '.join(str(n) for n in images if n)} clean training images (no weight "
                 "change)." + (f" {', '.join(stale)}: NOT recalibrated." if stale else "")]
    if with_bn and len(with_bn) < len(details):
        lines[0] += " The networks without BatchNorm had nothing to recalibrate."
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


def plot_curves(runs: list[dict[str, Any]], path: Path, keys: Sequence[str]) -> bool:
    """Training curves (per-epoch averages from each run's history); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = [k for k in keys if any(k in h for r in runs for h in r.get("history", []))]
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for run in runs:
            hist = [h for h in run.get("history", []) if key in h]
            if hist:
                ax.plot([h["epoch"] for h in hist], [h[key] for h in hist],
                        label=f"{label_of(run)} s{run['seed']}", marker="o", ms=3)
        ax.set_xlabel("epoch")
        ax.set_title(key)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_ablation(points: dict[str, list[tuple[float, float]]], path: Path, xlabel: str,
                  ylabel: str) -> bool:
    """Metric vs a knob, one line per metric; points are (x, value) over seeds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, pts in points.items():
        xs = sorted({x for x, _ in pts})
        means = [statistics.fmean([v for x2, v in pts if x2 == x]) for x in xs]
        ax.plot(xs, means, marker="o", label=name)
        ax.scatter([x for x, _ in pts], [v for _, v in pts], s=8, alpha=0.5)
    positive = sorted({x for pts in points.values() for x, _ in pts if x > 0})
    if positive and positive[-1] / positive[0] >= 20:  # e.g. weights 0, 0.1, ..., 10
        ax.set_xscale("symlog", linthresh=positive[0])
        ax.set_xticks([0, *positive], [f"{x:g}" for x in [0, *positive]])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
