"""The harness's command line: ``train``, ``bench`` and ``ablate``.

    recon-aux train CONFIG [key=value ...]    # one run of a method, base or +recon
    recon-aux bench CONFIG [key=value ...]    # methods x {base, +recon} x seeds + references
    recon-aux ablate CONFIG [key=value ...]   # the auxiliary objective's knobs, one at a time

``recon-aux`` (the library's console script, :mod:`recon_aux.cli`) hands these to
:func:`main` from a checkout; ``python -m benchmarks.cli ...`` from the checkout is the same.

Examples::

    recon-aux train benchmarks/configs/smoke/deepcluster.yaml
    recon-aux train benchmarks/configs/smoke/sela.yaml recon=null train.epochs=2
    torchrun --nproc_per_node=2 -m benchmarks.cli train benchmarks/configs/smoke/aet.yaml

A run prints one log line per epoch and, last, one JSON line with the final metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from adapters.config import RunConfigError, load_run_config
from adapters.engine import StopTraining, train

from . import ablate, bench

__all__ = ["main"]


def _train(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides)
    changes = {"resume": True} if args.resume else {}
    if args.out_dir:
        changes["out_dir"] = args.out_dir
    result = train(cfg.with_run(**changes))
    if int(os.environ.get("RANK", "0")) == 0:
        summary = {k: result[k] for k in ("method", "seed", "metrics", "wall_s", "machine",
                                          "train_images", "test_images")}
        summary["recon"] = result["recon"] is not None
        print(json.dumps(summary), flush=True)
    return 0


def _matrix(args: argparse.Namespace) -> int:
    if args.command == "bench":
        bench.run_bench(bench.load_bench_config(args.config, args.overrides), **_options(args))
    else:
        ablate.run_ablate(ablate.load_ablate_config(args.config, args.overrides),
                          **_options(args))
    return 0


def _options(args: argparse.Namespace) -> dict:
    return {"out": args.out_dir, "progress": None, "replace_changed": args.replace_changed,
            "report_only": args.report_only, "merge": args.merge}


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status
    (2: a config error, 3: stopped by ``run.stop_after_epoch``)."""
    parser = argparse.ArgumentParser(prog="recon-aux", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one method from a YAML config")
    t.add_argument("config", help="YAML run config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 recon=null")
    t.add_argument("--resume", action="store_true", help="continue from run.out_dir's checkpoint")
    t.add_argument("--out-dir", default=None, help="overrides run.out_dir")
    t.set_defaults(func=_train)
    for name, what in (("bench", "methods x {base, +recon} x seeds, with reference rows"),
                       ("ablate", "the auxiliary objective's knobs for one method")):
        b = sub.add_parser(name, help=what)
        b.add_argument("config", help="YAML bench config (benchmarks/configs/); the run configs "
                                      "it names are relative to its folder")
        b.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seeds=[0,1]")
        b.add_argument("--out-dir", type=Path, default=None,
                       help="results folder, where everything is written (default "
                            "benchmarks/results/<config name>)")
        b.add_argument("--replace-changed", action="store_true",
                       help="re-run finished runs whose config changed (the old results are "
                            "kept under 'superseded' in results.json, out of the tables)")
        b.add_argument("--report-only", action="store_true",
                       help="train nothing: write the README, table and plots from the finished "
                            "runs (titled PARTIAL when some are missing)")
        b.add_argument("--merge", type=Path, default=None, metavar="DIR",
                       help="first take the finished runs of another results folder (seeds "
                            "run in parallel with seeds=[k] --out-dir DIR)")
        b.set_defaults(func=_matrix)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RunConfigError as exc:
        print(f"recon-aux: config error: {exc}", file=sys.stderr)
        return 2
    except StopTraining as exc:
        print(f"recon-aux: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
