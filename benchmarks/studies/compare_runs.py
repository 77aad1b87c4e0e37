"""Two rows of results, seed by seed: which variant of a run is better?

Two matrices that differ in one setting and share everything else (seeds, data, schedule,
evaluation) have rows of the same id, e.g. ``simclr-recon-seed<k>`` in simclr-cpu (ResNet tap
``layer4``) and in simclr-cpu-layer (``layer4.1.conv2``). This prints, for every metric both
have, each folder's mean ± std and the paired difference A − B over the seeds both finished,
judged by the tables' rule (:func:`benchmarks.report.paired`: clear when two seeds or more and
the mean larger than its std), the config keys in which the two rows differ and the layers
their runs tapped, so the output says what it compares. Nothing is trained.

``--row-b`` compares another row, of B or of the same folder: an ablation's point against its
default point, say (``head_out_scale=4`` against ``weight=1.0``, both of ablation-head-cpu).

Usage::

    python -m benchmarks.studies.compare_runs benchmarks/results/simclr-cpu \\
        benchmarks/results/simclr-cpu-layer --row simclr-recon
    python -m benchmarks.studies.compare_runs benchmarks/results/ablation-head-cpu \\
        benchmarks/results/ablation-head-cpu --row head_out_scale=4 --row-b weight=1.0
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from adapters.config import config_diff, flatten
from benchmarks.report import format_cell, format_paired, mean_std, paired, tapped_layers

__all__ = ["compare", "main"]


def _runs(folder: Path, row: str) -> dict[int, dict[str, Any]]:
    path = folder / "results.json"
    try:
        runs = json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"compare_runs: {path} is not a readable results file ({exc}); "
                         "pass a folder written by `recon-aux bench` or `ablate`.") from None
    pattern = re.compile(rf"{re.escape(row)}-seed(\d+)")
    found = {int(m.group(1)): r for r in runs if (m := pattern.fullmatch(r["id"]))}
    if not found:
        ids = sorted({re.sub(r"-seed\d+$", "", r["id"]) for r in runs})
        raise SystemExit(f"compare_runs: {path} has no finished run {row}-seed<k>; its rows "
                         f"are {', '.join(ids)}.")
    return found


def compare(a: Path, b: Path, row: str, row_b: str | None = None) -> str:
    """The comparison as text (a header, the differing config keys and a markdown table): row
    ``row`` of folder ``a`` against row ``row_b`` (None: the same row) of folder ``b``."""
    row_b = row if row_b is None else row_b
    runs_a, runs_b = _runs(a, row), _runs(b, row_b)
    seeds = sorted(set(runs_a) & set(runs_b))
    if not seeds:
        raise SystemExit(f"compare_runs: no seed has both rows (A: {row}, seeds "
                         f"{sorted(runs_a)}; B: {row_b}, seeds {sorted(runs_b)}).")
    first_a, first_b = runs_a[seeds[0]]["config"], runs_b[seeds[0]]["config"]
    fa, fb = flatten(first_a), flatten(first_b)
    unset = "not set (the default)"
    keys = config_diff(first_a, first_b)
    diff = [f"{k} (A: {fa.get(k, unset)}, B: {fb.get(k, unset)})" for k in keys]
    for s in seeds[1:]:  # a key that differs at another seed only is named too
        for k in config_diff(runs_a[s]["config"], runs_b[s]["config"]):
            if k not in keys:
                keys.append(k)
                diff.append(f"{k} (differs at seed {s})")
    metrics = [m for m in runs_a[seeds[0]]["metrics"] if not m.startswith("final_")
               and all(m in runs_a[s]["metrics"] and m in runs_b[s]["metrics"] for s in seeds)]
    tapped = [", ".join(tapped_layers([runs[s] for s in seeds])) for runs in (runs_a, runs_b)]
    rows = row if row_b == row else f"A: {row}, B: {row_b}"
    lines = [f"{rows}, seeds {', '.join(map(str, seeds))}: A = {a}, B = {b}",
             "configs differ in: " + ("; ".join(diff) if diff else "nothing (same config)"),
             f"tapped layer: A: {tapped[0]}, B: {tapped[1]}"]
    alone = [f"{side} seeds {sorted(set(mine) - set(seeds))}"
             for side, mine in (("A", runs_a), ("B", runs_b)) if set(mine) - set(seeds)]
    if alone:
        lines.append(f"left out, no partner in the other folder: {'; '.join(alone)}")
    partial = sorted({m for runs in (runs_a, runs_b) for s in seeds for m in runs[s]["metrics"]
                      if not m.startswith("final_")} - set(metrics))
    if partial:
        lines.append(f"left out, missing from some of these runs: {', '.join(partial)}")
    lines += ["", "| metric | A | B | A − B (paired) |", "|---|---|---|---|"]
    for m in metrics:
        va = [runs_a[s]["metrics"][m] for s in seeds]
        vb = [runs_b[s]["metrics"][m] for s in seeds]
        cells = [format_cell(dict(zip(("mean", "std"), mean_std(v)), n=len(v))) for v in (va, vb)]
        p = paired([x - y for x, y in zip(va, vb)], "A better", "B better")
        lines.append(f"| {m} | {cells[0]} | {cells[1]} | {format_paired(p)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path, help="results folder A")
    parser.add_argument("b", type=Path, help="results folder B")
    parser.add_argument("--row", required=True,
                        help="run id without its seed, e.g. simclr-recon or simclr-base")
    parser.add_argument("--row-b", default=None,
                        help="B's row, when it is not --row (e.g. an ablation's default point)")
    parser.add_argument("--write", type=Path, default=None, help="also write the text here")
    args = parser.parse_args(argv)
    text = compare(args.a, args.b, args.row, args.row_b)
    sys.stdout.write(text)
    if args.write is not None:
        row_b = "" if args.row_b is None else f" --row-b {args.row_b}"
        args.write.write_text(f"$ python -m benchmarks.studies.compare_runs {args.a} {args.b} "
                              f"--row {args.row}{row_b}\n{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
