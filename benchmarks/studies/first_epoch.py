"""Wall time of set-up plus the first epoch of every trained row of a bench config: what a new
machine measures before it commits to a whole matrix.

Each row (``<method>-base`` and ``<method>-recon``, seed 0) runs with the config's own schedule
(its ``train.epochs``, SeLa's ``nopts``) and ``run.stop_after_epoch=1``: set-up (data, model, a
method's first clustering or label pass), epoch 1 and the checkpoint, no evaluation; the data
are loaded (and decoded into their cache) once before the first row, and that time is printed
on its own. ``--extra`` adds a row with more overrides (e.g. another input pipeline).
``--epochs N`` trains each row N epochs instead and times epochs 2 to N apart from set-up and
epoch 1 (which pays for a compiled row's compilation): the time a whole run will take per epoch.
``--evaluation`` then times the evaluation alone, on an untrained network of the first method
(``train.epochs=0``), with the functions it spent its time in (cProfile, cumulative).
``--profile ROW`` runs that row's epoch 1 once more under ``torch.profiler`` and says where a
step's time goes: wall time per step against the time the device's kernels ran, and how many
times a step waited for the device (its synchronisations); the ops by self time follow.

Example (``benchmarks/results/gpu-check/device-run.md`` has what this measured on an H200, when
the config still built batches on the CPU and the extra row moved them to the GPU)::

    python -m benchmarks.studies.first_epoch benchmarks/configs/cifar10-gpu.yaml \\
        --extra "sela-recon:data.augment_on_device=false,data.prefetch=0" --evaluation
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import itertools
import pstats
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from torch.autograd import DeviceType
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.profiler import ProfilerActivity, profile, schedule

from adapters import devices, engine
from adapters.config import RunConfig
from adapters.data import load_dataset
from benchmarks.bench import load_bench_config, trained_rows


def rows(config: str, overrides: Sequence[str],
         extra: Sequence[str]) -> list[tuple[str, RunConfig]]:
    """(row name, run config) of every trained row (seed 0), then the ``--extra`` rows."""
    cfg = load_bench_config(config, ["seeds=[0]", *overrides])
    out = [(f"{method}-{variant}", rc) for method, variant, rc in trained_rows(cfg, 0)]
    named = dict(out)
    for item in extra:
        row, _, sets = item.partition(":")
        if row not in named or not sets:
            raise SystemExit(f"--extra {item!r}: give ROW:key=value[,key=value], ROW one of "
                             f"{sorted(named)}.")
        out.append((f"{row} + {sets}", named[row].override(*sets.split(","))))
    return out


def train_epochs(rc: RunConfig, epochs: int = 1) -> None:
    """Set up ``rc``'s run and train its epochs 1 to ``epochs`` (each with its checkpoint), then
    stop (``epochs`` is below the run's ``train.epochs``: the evaluation never runs)."""
    try:
        engine.train(rc.with_run(stop_after_epoch=epochs))
    except engine.StopTraining:
        pass


@contextlib.contextmanager
def step_stamps(then: Callable[[], None] | None = None) -> Iterator[list[float]]:
    """The host clock at the end of every optimizer step inside (``torch.optim``'s global
    post-hook; ``stamps[i]`` ends step ``i + 1``), each stamp followed by ``then()``."""
    stamps: list[float] = []

    def stamp(*_args) -> None:
        stamps.append(time.perf_counter())
        if then is not None:
            then()

    handle = register_optimizer_step_post_hook(stamp)
    try:
        yield stamps
    finally:
        handle.remove()


def median_gap_ms(stamps: Sequence[float]) -> float:
    """The median time between consecutive stamps, in ms (NaN with fewer than two)."""
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return 1e3 * statistics.median(gaps) if gaps else float("nan")


def timed_row(name: str, rc: RunConfig, epochs: int) -> str:
    """Train ``rc`` for ``epochs`` epochs: the row's line. With more than one epoch, the step
    stamps split set-up and epoch 1 from the later epochs (their time per epoch, each with its
    checkpoint and its method's epoch-start work, e.g. a clustering pass, and the median step)."""
    t0 = time.perf_counter()
    with step_stamps() as stamps:
        train_epochs(rc, epochs)
    end = time.perf_counter()
    if epochs == 1:
        return f"{name:40s} {end - t0:7.1f} s  (set-up + epoch 1 + checkpoint)"
    if len(stamps) % epochs:
        return (f"{name:40s} {end - t0:7.1f} s  (set-up + epochs 1-{epochs} + checkpoints; "
                f"{len(stamps)} steps, not the same number each epoch: not split)")
    per = len(stamps) // epochs
    step_ms = median_gap_ms(stamps[per - 1:])  # from the end of epoch 1's last step
    return (f"{name:40s} {stamps[per - 1] - t0:7.1f} s  (set-up + epoch 1), then "
            f"{(end - stamps[per - 1]) / (epochs - 1):.1f} s per epoch over epochs 2-{epochs} "
            f"({per} steps each, median step {step_ms:.1f} ms, host clock)")


SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profile_epoch(name: str, rc: RunConfig, *, wait: int = 20, warmup: int = 5,
                  active: int = 50) -> tuple[str, str]:
    """Profile ``active`` training steps of ``rc``'s epoch 1, after ``wait + warmup`` steps.

    Steps are counted by :func:`step_stamps`, which also stamps the host clock. Returns the
    summary line (median wall time per step, the device kernels' time per step, host-device
    synchronisations per step) and the profiler's table of ops by self time. Times are measured
    under the profiler, which adds a few microseconds of host time per op.
    """
    on_cuda = engine.train_device(rc.train.device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    prof = profile(activities=activities,
                   schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1))
    with step_stamps(then=prof.step) as stamps, prof:
        train_epochs(rc)
    first = wait + warmup
    if len(stamps) < first + active:
        raise SystemExit(f"--profile {name}: epoch 1 has {len(stamps)} steps, fewer than the "
                         f"{first + active} profiled (wait {wait} + warmup {warmup} + active "
                         f"{active}); use a bigger training set or fewer steps.")
    # stamps[i] ends step i + 1: the profiled steps' durations end at stamps[first:first + active]
    # (the first has no start stamp when no step precedes it)
    wall_ms = median_gap_ms(stamps[max(first - 1, 0):first + active])
    events = prof.key_averages()
    # kernels only, as the table's "Self CUDA time total": the ops' rows repeat their kernels'
    # time, and the profiler's own step ranges (ProfilerStep*) are user annotations spanning it
    device_ms = sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU
                    and not e.is_user_annotation) / 1e3 / active
    syncs = sum(e.count for e in events if e.key in SYNCS) / active
    line = (f"profile of {name}, steps {first + 1}-{first + active} of epoch 1: "
            f"{wall_ms:.2f} ms per step (median, host clock), device kernels "
            f"{device_ms:.2f} ms per step, {syncs:.1f} host-device synchronisations per step")
    sort = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    return line, events.table(sort_by=sort, row_limit=25)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.first_epoch",
                                description=__doc__.split("\n")[0])
    p.add_argument("config", help="a bench config (benchmarks/configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the bench config")
    p.add_argument("--extra", action="append", default=[], metavar="ROW:OVERRIDES")
    p.add_argument("--epochs", type=int, default=1, metavar="N",
                   help="train each row N epochs (fewer than its train.epochs) and time epochs "
                        "2-N apart from set-up and epoch 1 (a compiled row compiles in epoch 1)")
    p.add_argument("--evaluation", action="store_true", help="also time one evaluation")
    p.add_argument("--profile", action="append", default=[], metavar="ROW",
                   help="also profile 50 steps of this row's epoch 1 (torch.profiler)")
    p.add_argument("--write", type=Path, default=None, metavar="PATH",
                   help="also write the timings and the profiles' summary lines (not their tables) "
                        "to PATH, rewritten after each line: a run cut short keeps them")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    todo = rows(a.config, a.overrides, a.extra)
    unknown = sorted(set(a.profile) - {name for name, _ in todo})
    short = sorted(name for name, rc in todo if not 1 <= a.epochs < rc.train.epochs)
    if short:
        raise SystemExit(f"--epochs {a.epochs}: choose 1 to one less than each row's "
                         f"train.epochs (the evaluation would run); too many for {short}.")
    if unknown:
        raise SystemExit(f"--profile {unknown}: no such row; rows: {[n for n, _ in todo]}.")
    lines: list[str] = []

    def add(line: str) -> None:
        """Print ``line`` and (``--write``) rewrite the file with every line so far: a run cut
        short (a time limit) keeps what it measured."""
        lines.append(line)
        print(line, flush=True)
        if a.write is not None:
            a.write.parent.mkdir(parents=True, exist_ok=True)
            a.write.write_text("\n".join(lines) + "\n")

    command = sys.argv[1:] if argv is None else argv
    add(f"python -m benchmarks.studies.first_epoch {shlex.join(command)}; {devices.machine()}")
    d = todo[0][1].data  # decode the data into its cache first, so no row pays for it
    t0 = time.perf_counter()
    for train in (True, False):
        load_dataset(d.dataset, data_root=d.root, train=train, download=d.download)
    add(f"{'loading the data (both splits)':40s} {time.perf_counter() - t0:7.1f} s")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, rc) in enumerate(todo):  # folders by position: names hold --extra text
            rc = rc.with_run(out_dir=str(Path(tmp) / f"row{i}"), progress=False, resume=False)
            add(timed_row(name, rc, a.epochs))
        position = {name: i for i, (name, _) in enumerate(todo)}
        for name in a.profile:
            i = position[name]
            rc = todo[i][1].with_run(out_dir=str(Path(tmp) / f"profile-row{i}"), progress=False,
                                     resume=False)
            line, table = profile_epoch(name, rc)
            add(line)
            print(table, flush=True)
        if a.evaluation:
            rc = todo[0][1].override("train.epochs=0").with_run(
                out_dir=str(Path(tmp) / "evaluation"), progress=False)
            prof = cProfile.Profile()
            t0 = time.perf_counter()
            prof.enable()
            result = engine.train(rc)
            prof.disable()
            add(f"evaluation of an untrained {todo[0][0]}: "
                f"{time.perf_counter() - t0:.1f} s, {result['metrics']}")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
