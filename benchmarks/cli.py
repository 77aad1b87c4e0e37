"""The harness's command line: ``train``, ``bench``, ``ablate`` and ``summary``.

    recon-aux train CONFIG [key=value ...]    # one run of a method, base or +recon
    recon-aux bench CONFIG [key=value ...]    # methods x {base, +recon} x seeds + references
    recon-aux ablate CONFIG [key=value ...]   # the auxiliary objective's knobs, one at a time
    recon-aux summary [--write|--check README.md]   # the verdict table over the bench results

``recon-aux`` (the library's console script, :mod:`recon_aux.cli`) hands these to
:func:`main` from a checkout; ``python -m benchmarks.cli ...`` from the checkout is the same.

Examples::

    recon-aux train benchmarks/configs/smoke/deepcluster.yaml
    recon-aux train benchmarks/configs/smoke/sela.yaml recon=null train.epochs=2
    recon-aux train benchmarks/configs/smoke/sela.yaml --resume      # continue a killed run
    torchrun --nproc_per_node=2 -m benchmarks.cli train benchmarks/configs/smoke/aet.yaml

A run prints its folder first, one log line per epoch, its folder again and, last, one JSON line
with the final metrics. A folder that already holds a run is refused unless ``--resume``
(continue it) or ``--overwrite`` (delete it and start again).

Overrides may come before or after the options. Errors the user can fix (a config, a
checkpoint, the data, the run folder, a full disk, ...) are one line on stderr and exit status
2; ``run.stop_after_epoch`` exits with 3; anything else is a bug and keeps its traceback. The
project's own warnings (e.g. a setting that cannot take effect) are one line each,
``recon-aux: warning: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import yaml

from adapters.checkpoint import CheckpointError
from adapters.config import (
    IneffectiveSettingWarning,
    RunConfigError,
    load_run_config,
    yaml_problem,
)
from adapters.data import DatasetError
from adapters.engine import StopTraining, train
from adapters.files import DiskFullError
from adapters.runs import RunFolderError, run_dir
from adapters.schema import SchemaError
from recon_aux import ConfigError, NonFiniteLossError
from recon_aux.layers import LayerChoiceError
from recon_aux.weights import WeightsError

from . import ablate, bench, summary

__all__ = ["main", "error_line"]

#: Errors with a message meant for the user: (type, what the line calls it), most specific first.
KNOWN_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (DiskFullError, ""),  # its message starts with "disk full"
    (RunConfigError, "config error"),
    (IneffectiveSettingWarning, "config warning"),  # raised as an error under -W error
    (SchemaError, "config error"),
    (ConfigError, "recon config error"),
    (LayerChoiceError, "recon config error"),
    (yaml.YAMLError, "YAML error"),
    (CheckpointError, "checkpoint error"),
    (WeightsError, "LPIPS weights error"),
    (RunFolderError, "run folder error"),
    (summary.SummaryError, "summary error"),
    (DatasetError, "data error"),
    (pickle.UnpicklingError, "unpickling error"),
    (NonFiniteLossError, "training stopped"),
    (OSError, "file error"),
)


def error_line(exc: BaseException) -> str | None:
    """The one line ``recon-aux`` prints for a known error (None: not one of
    :data:`KNOWN_ERRORS`, which keeps its traceback)."""
    for kind, label in KNOWN_ERRORS:
        if isinstance(exc, kind):
            if isinstance(exc, yaml.YAMLError):
                text = yaml_problem(exc)
            elif type(exc) in (OSError, PermissionError, FileNotFoundError, IsADirectoryError,
                               NotADirectoryError, FileExistsError) and exc.strerror:
                target = f": {exc.filename}" if exc.filename else ""
                text = f"{exc.strerror}{target}"
            else:
                text = str(exc) or type(exc).__name__
            text = " ".join(text.split())  # one line, whatever the message held
            return f"recon-aux: {label}: {text}" if label else f"recon-aux: {text}"
    return None


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line on stderr (exit status 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"recon-aux: usage error: {' '.join(message.split())} (see "
                     f"{self.prog} --help)\n")


def _parse(parser: _Parser, argv: list[str] | None) -> argparse.Namespace:
    """``parser``'s arguments, with ``key=value`` overrides taken after the options too
    (``train CONFIG --resume train.epochs=3``; argparse alone takes positionals in one run)."""
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(late) < len(extra) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


#: Where the warnings that ``recon-aux`` prints as one line come from, and their packages (the
#: rest, e.g. torch's, keep Python's format, which names their category and source line).
_OWN_CODE = tuple(str(Path(p).parent) + os.sep for p in (
    __file__, sys.modules["adapters"].__file__, sys.modules["recon_aux"].__file__))
_OWN_PACKAGES = ("adapters", "benchmarks", "recon_aux")


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Print the project's own warnings as ``recon-aux: warning: ...`` (one line)."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        own = category is UserWarning or category.__module__.split(".")[0] in _OWN_PACKAGES
        if not (own and str(filename).startswith(_OWN_CODE)):
            return shown(message, category, filename, lineno, file, line)
        print(f"recon-aux: warning: {' '.join(str(message).split())}",
              file=sys.stderr if file is None else file, flush=True)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _train(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides)
    changes: dict = {}
    if args.resume:
        changes["resume"] = True
    if args.overwrite:
        changes["overwrite"] = True
    if args.out_dir:
        changes["out_dir"] = args.out_dir
    cfg = cfg.with_run(**changes)
    folder = run_dir(cfg).absolute()
    if _rank0():
        print(f"run folder: {folder}", flush=True)
    try:
        result = train(cfg)
    except StopTraining as exc:
        remedy = "continue with --resume" if exc.checkpoint else exc.remedy
        raise StopTraining(exc.epoch, f"{remedy} (run folder {folder})", exc.checkpoint) from None
    if _rank0():
        print(f"run folder: {folder} (result.json, log.jsonl, checkpoint.pt)", flush=True)
        summary = {k: result[k] for k in ("method", "seed", "metrics", "wall_s", "machine",
                                          "train_images", "test_images")}
        summary["recon"] = result["recon"] is not None
        summary["out_dir"] = str(folder)
        print(json.dumps(summary), flush=True)
    return 0


def _matrix(args: argparse.Namespace) -> int:
    if args.command == "bench":
        bench.run_bench(bench.load_bench_config(args.config, args.overrides), **_options(args))
    else:
        ablate.run_ablate(ablate.load_ablate_config(args.config, args.overrides),
                          **_options(args))
    return 0


def _summary(args: argparse.Namespace) -> int:
    return summary.main(args.write or args.check, check=args.check is not None,
                        root=args.results)


def _options(args: argparse.Namespace) -> dict:
    return {"out": args.out_dir, "progress": None, "replace_changed": args.replace_changed,
            "report_only": args.report_only, "merge": args.merge,
            "reuse_folder": args.reuse_folder, "supersede_unplanned": args.supersede_unplanned,
            "time_budget": args.time_budget, "jobs": args.jobs}


def main(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status
    (2: an error the user can fix, printed as one line on stderr; 3: stopped by
    ``run.stop_after_epoch``)."""
    parser = _Parser(prog="recon-aux", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one method from a YAML config")
    t.add_argument("config", help="YAML run config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 recon=null")
    again = t.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in the run folder from its checkpoint")
    again.add_argument("--overwrite", action="store_true",
                       help="the run folder holds a run: delete its files and start again")
    t.add_argument("--out-dir", default=None, help="the run folder (overrides run.out_dir)")
    t.set_defaults(func=_train)
    for name, what in (("bench", "methods x {base, +recon} x seeds, with reference rows"),
                       ("ablate", "the auxiliary objective's knobs for one method")):
        b = sub.add_parser(name, help=what)
        b.add_argument("config", help=f"YAML {name} config (benchmarks/configs/); the run "
                                      "configs it names are relative to its folder")
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
                            "run in parallel with seeds=[k] --out-dir DIR) that were made "
                            "with this config's settings")
        b.add_argument("--reuse-folder", action="store_true",
                       help="write into a results folder made by another config, or a "
                            "non-empty folder without results.json (its finished runs are "
                            "kept and checked against this config's)")
        b.add_argument("--supersede-unplanned", action="store_true",
                       help="move finished runs this config does not plan (rows an earlier "
                            "version had) to 'superseded' in results.json; use with the whole "
                            "config, not with seeds= or methods.<row>=null overrides")
        b.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                       help="start a run only while the time used plus the time it is "
                            "expected to take (its row's longest recorded run with another "
                            "seed, lengthened as much as this call's runs overran their "
                            "records; else the longest run so far) fits in SECONDS; a run that "
                            "does not fit is passed over for a later one that does, and a run "
                            "with nothing to go by starts; the runs left stay planned for the "
                            "next call (the README says PARTIAL)")
        b.add_argument("--jobs", type=int, default=1, metavar="K",
                       help="train up to K runs at once, each in its own process with "
                            "cpu_count/K threads unless OMP_NUM_THREADS is set (for a GPU that "
                            "one small run leaves mostly idle; on a 2-core CPU it was slower "
                            "than one run at a time with both threads); each run's output goes "
                            "to runs/<id>/console.txt")
        b.set_defaults(func=_matrix)
    s = sub.add_parser("summary", help="the verdict table over the bench results folders")
    target = s.add_mutually_exclusive_group()
    target.add_argument("--write", type=Path, default=None, metavar="README",
                        help="replace the table between the README's verdict markers")
    target.add_argument("--check", type=Path, default=None, metavar="README",
                        help="exit 1 when the README's table is not what the results say")
    s.add_argument("--results", type=Path, default=summary.RESULTS,
                   help="the folder holding the results folders (default benchmarks/results)")
    s.set_defaults(func=_summary)
    args = _parse(parser, argv)
    try:
        with _one_line_warnings():
            return args.func(args)
    except StopTraining as exc:
        print(f"recon-aux: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:  # known errors: one line; the rest keep their traceback
        line = error_line(exc)
        if line is None:
            raise
        print(line, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
