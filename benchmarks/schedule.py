"""When a matrix's runs train: one after another in this process, or up to K at once, each in
a process of its own; with a time budget, a run starts only while it is expected to fit.

A run's path: :meth:`benchmarks.matrix.Matrix.execute` checks every run to train, then hands
them, in plan order, to :func:`run_in_turn` or :func:`run_in_processes`. Before each start the
:class:`Budget` picks the first pending run expected to end within it. A finished run's time
goes to the budget, which estimates the next runs with it, then the run goes back through the
matrix's ``record`` callback into results.json. A worker process dies with the process that
started it (:func:`die_with_parent`), and a failed run stops new starts: the runs under way
finish and are recorded before its error is raised.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from adapters.config import RunConfig, RunConfigError
from adapters.engine import StopTraining, train
from adapters.methods import METHODS
from adapters.progress import progress

__all__ = ["Budget", "run_in_turn", "run_in_processes", "check_jobs", "check_time_budget",
           "row_of", "eta_text", "die_with_parent"]

#: A planned run: its id, its run config, its row's metadata (see ``Matrix.add``).
Run = tuple[str, RunConfig, dict[str, Any]]
#: Called with a finished run and its result: adds it to the matrix's results.json.
Record = Callable[[str, RunConfig, dict[str, Any], dict[str, Any]], None]


def check_jobs(jobs: int) -> None:
    """Refuse a number of parallel runs that is not a positive integer."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise RunConfigError(f"jobs {jobs!r}: give a whole number of runs at once, 1 or more "
                             "(1: one after another).")


def check_time_budget(time_budget: float | None) -> None:
    """Refuse a time budget that is not a positive number of seconds (None: no budget)."""
    if time_budget is not None and not time_budget > 0:
        raise RunConfigError(f"time budget {time_budget!r}: give a positive number of seconds, "
                             "or none to run every planned run.")


def row_of(run_id: str) -> str:
    """A run's row: its id without the seed (``sela-recon-seed2`` -> ``sela-recon``)."""
    return re.sub(r"-seed\d+$", "", run_id)


def eta_text(elapsed: float, done: int, left: int) -> str:
    """``ETA 12.3 min`` from the mean time of the runs done; ``ETA unknown`` before the first."""
    if done <= 0:
        return "ETA unknown"
    return f"ETA {elapsed / done * left / 60:.1f} min"


class Budget:
    """Which pending run starts next: the first whose expected end (the seconds used so far
    plus :meth:`expected`) is within ``seconds``; a run with nothing to go by starts. Meant for
    a machine lent by the minute: the runs passed over stay planned for the next call.

    Attributes:
        seconds: The budget (None: no budget; every run starts, in plan order).
        recorded: ``recorded(row)``, the longest ``wall_s`` recorded for a run of that row
            (another seed's, merged pieces included), None when there is none.
        longest: The longest run of this call so far, start to end (seconds; 0 before the
            first ends).
        slower: The most a run of this call took over its row's record (at least 1).

    Example:
        >>> budget = Budget(600.0, {"sela-recon": 300.0}.get)
        >>> budget.expected("sela-recon-seed1")
        (300.0, 'sela-recon took 5.0 min with another seed')
    """

    def __init__(self, seconds: float | None, recorded: Callable[[str], float | None]) -> None:
        check_time_budget(seconds)
        self.seconds = seconds
        self.recorded = recorded
        self.longest = 0.0
        self.slower = 1.0

    def expected(self, run_id: str) -> tuple[float, str] | None:
        """How long ``run_id`` is expected to take (seconds), and where that comes from: its
        row's record (:attr:`recorded`) when there is one, else :attr:`longest`; None when
        neither tells (no run of its row recorded, none finished in this call).

        Rows differ more than seeds do: on an H200 a +recon run took ~1.35x its base, and a run
        started on the longest base run's time overran a call's hard limit. A record from
        another machine misleads, so a record is scaled by :attr:`slower`: a slower host, or
        more runs sharing a GPU than when the record was made, shows in the first runs to end
        and lengthens every later estimate (never shortens one). ``wall_s`` is the run's
        training and evaluation, not its process start and data loading (about 10 s on an H200
        with ``--jobs``): leave that much below a hard limit. The messages name the estimate
        used."""
        row = row_of(run_id)
        recorded = self.recorded(row)
        if recorded is not None:
            why = f"{row} took {recorded / 60:.1f} min with another seed"
            if self.slower > 1.0:
                why += f", x{self.slower:.2f} as this call's runs are slower than their records"
            return recorded * self.slower, why
        if self.longest > 0:
            return self.longest, f"the longest run so far took {self.longest / 60:.1f} min"
        return None

    def ended(self, run_id: str, took: float, wall_s: float | None) -> None:
        """Note a finished run, before it is recorded: ``took`` seconds from its start here,
        ``wall_s`` as the run measured itself (against its row's record)."""
        self.longest = max(self.longest, took)
        recorded = self.recorded(row_of(run_id))
        if recorded and wall_s is not None:
            self.slower = max(self.slower, wall_s / recorded)

    def take_next(self, pending: list[Run], used: float) -> Run | None:
        """Remove from ``pending`` and return the first run expected to end within the budget
        (``used`` seconds of it spent), skipping the longer ones before it, which stay
        planned. None, after saying so, when no run left fits."""
        guesses = []
        for i, (run_id, _, _) in enumerate(pending):
            guess = None if self.seconds is None else self.expected(run_id)
            if guess is None or used + guess[0] <= self.seconds:
                if i > 0:
                    how = ("nothing to go by" if guess is None else
                           f"expected to take {guess[0] / 60:.1f} min, {guess[1]}")
                    print(f"time budget: {run_id} starts ({how}); the {i} run(s) before it "
                          "would end past the budget and stay planned", flush=True)
                return pending.pop(i)
            guesses.append(guess)
        seconds, why = min(guesses)
        print(f"time budget: {used / 60:.1f} of {self.seconds / 60:.1f} min used and no run "
              f"left fits: the shortest would take {seconds / 60:.1f} ({why}); {len(pending)} "
              "run(s) left: the same command goes on with them", flush=True)
        return None


def run_in_turn(todo: list[Run], budget: Budget, record: Record,
                show_progress: bool | None) -> None:
    """Train ``todo`` one after another in this process, with a progress bar
    (``show_progress``: None = when stderr is a terminal) or a line per run."""
    t0, pending = time.perf_counter(), list(todo)

    def starts() -> Iterator[Run]:
        while pending:  # the budget reads the run before's time at each start
            run = budget.take_next(pending, time.perf_counter() - t0)
            if run is None:
                return
            yield run

    runs = starts()
    bar = progress(runs, enabled=show_progress, total=len(todo), unit="run")
    for i, (run_id, cfg, meta) in enumerate(bar):
        if bar is runs:  # no bar: one line per run
            eta = eta_text(time.perf_counter() - t0, i, len(todo) - i)
            print(f"run {i + 1}/{len(todo)}: {run_id} ({eta})", flush=True)
        else:
            bar.set_description(f"run {i + 1}/{len(todo)} {run_id}")
        started = time.perf_counter()
        try:
            result = train(cfg)
        except StopTraining as exc:
            raise stopped(run_id, exc) from None
        budget.ended(run_id, time.perf_counter() - started, result.get("wall_s"))
        record(run_id, cfg, meta, result)


def run_in_processes(todo: list[Run], jobs: int, budget: Budget, record: Record) -> None:
    """Train ``todo`` with up to ``jobs`` runs at once, each in a fresh process (spawned, as
    CUDA needs; one run per process, so each starts with a clean device and compiler state).
    Each run's console output goes to ``console.txt`` in its run folder; a finished run is
    recorded as soon as it ends, in the order runs end. Each process gets ``cpu_count // jobs``
    torch threads unless ``OMP_NUM_THREADS`` is set. The budget applies at each start. A failed
    run stops new starts; the runs under way finish and are recorded, then its error is raised,
    naming the run and its console.

    Each run has an executor of its own: a worker that dies outright (a segfault, the OOM
    killer) breaks its own executor only, where one shared pool would fail every run under
    way with it."""
    check_jobs(jobs)
    pending = list(todo)
    running: dict[Future, tuple[str, RunConfig, dict[str, Any], float, ProcessPoolExecutor]] = {}
    threads = None if os.environ.get("OMP_NUM_THREADS") else max(1, (os.cpu_count() or 1)
                                                                      // jobs)
    t0, failed, started_n = time.perf_counter(), None, 0
    spawn = multiprocessing.get_context("spawn")
    try:
        while running or (pending and failed is None):
            while pending and failed is None and len(running) < jobs:
                run = budget.take_next(pending, time.perf_counter() - t0)
                if run is None:
                    pending = []
                    break
                run_id, cfg, meta = run
                console = Path(cfg.run.out_dir) / "console.txt"
                worker = ProcessPoolExecutor(1, mp_context=spawn, max_tasks_per_child=1)
                future = worker.submit(_train_in_process, cfg, console, threads,
                                       METHODS.get(cfg.method.name))
                running[future] = (run_id, cfg, meta, time.perf_counter(), worker)
                started_n += 1
                print(f"run {started_n}/{len(todo)} started: {run_id} ({len(running)} "
                      f"under way; its output: {console})", flush=True)
            if not running:
                break
            ended, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in ended:
                run_id, cfg, meta, began, worker = running.pop(future)
                worker.shutdown()
                try:
                    result = future.result()
                except Exception as exc:  # raised once the runs under way have ended
                    print(f"run {run_id} failed: {exc}", flush=True)
                    failed = failed or (run_id, cfg, exc)
                    continue
                took = time.perf_counter() - began
                budget.ended(run_id, took, result.get("wall_s"))
                record(run_id, cfg, meta, result)
                print(f"run {run_id} done in {took / 60:.1f} min", flush=True)
    finally:  # an interrupt here: the workers under way are waited for, as a pool's exit did
        for *_, worker in running.values():
            worker.shutdown()
    if failed is not None:
        run_id, cfg, exc = failed
        if isinstance(exc, StopTraining):
            exc = stopped(run_id, exc)
        exc.add_note(f"(run {run_id}; its output: {Path(cfg.run.out_dir) / 'console.txt'})")
        raise exc


def stopped(run_id: str, exc: StopTraining) -> StopTraining:
    """A run's ``run.stop_after_epoch`` stop, with a matrix's way to go on."""
    if exc.checkpoint:
        return StopTraining(exc.epoch, f"run {run_id} stopped with its checkpoint intact; the "
                                       "same command continues it")
    return StopTraining(exc.epoch, f"run {run_id} stopped without a checkpoint "
                                   "(run.save_checkpoints=false); the same command starts it "
                                   "again from scratch", checkpoint=False)


def die_with_parent() -> None:
    """On Linux, have the kernel end this process (SIGTERM) when its parent ends: a worker of a
    killed ``bench --jobs`` would otherwise train on, unrecorded, beside the next call's runs.
    Elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def _train_in_process(cfg: RunConfig, console: Path, threads: int | None,
                      method: type | None) -> dict[str, Any]:
    """One run in a worker process of :func:`run_in_processes`: its output to ``console``,
    ``threads`` torch threads (None: torch's default). ``method`` is the parent's registry
    entry for the run's method: a method registered at run time (not on import) is registered
    in this fresh process too."""
    die_with_parent()
    if threads is not None:
        torch.set_num_threads(threads)
    if method is not None:
        METHODS.setdefault(cfg.method.name, method)
    console.parent.mkdir(parents=True, exist_ok=True)
    with open(console, "a", encoding="utf-8") as out, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(out):
        return train(cfg)
