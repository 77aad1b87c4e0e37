"""Kills a run with SIGKILL at every file-system event of its writes, and resumes each.

Run by ``tests/adapters/test_kill.py`` as ``python -m tests.adapters.kill_worker CONFIG.json
BASE``. It imports the harness and trains the uninterrupted run once in its own process (torch
on one thread), then forks one child per run, so that each kill is a real ``kill -9`` of a
process that is writing, without paying for the imports and the first run's set-up each time:

1. ``BASE/ref``: the uninterrupted run; every event of its writes (each ``os.open``,
   ``os.write``, ``os.fsync``, ``os.close``, ``os.replace`` and ``os.unlink`` that
   :mod:`adapters.files` makes: temporary file, payload, fsync, rename, folder fsync, for the
   checkpoints, ``log.jsonl``, ``result.json`` and the picture) is listed in ``BASE/events.json``.
2. For each event i (in a forked child): ``BASE/kill<i>``: the same run, which sends itself
   SIGKILL just before event i; then (in another child) ``run.resume=true`` in that folder, to
   the end. Events run side by side, one per CPU core (at most ``KILL_JOBS``, default 2), each
   in its own folder.

``BASE/report.json`` says, per event, how the killed child ended and whether the resume
succeeded; the test compares each folder with ``BASE/ref``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path

EVENTS = ("open", "write", "fsync", "close", "replace", "unlink")


class _Os:
    """``os`` as :mod:`adapters.files` sees it: the same functions, each file-system event
    counted (and listed), and SIGKILL just before event number ``kill_at``."""

    def __init__(self, real, kill_at: int | None, log: list[str]) -> None:
        self._real, self._kill_at, self._log = real, kill_at, log

    def __getattr__(self, name):
        attr = getattr(self._real, name)
        if name not in EVENTS:
            return attr

        def event(*args, **kwargs):
            self._log.append(f"{name} {_describe(args[0])}")
            if self._kill_at is not None and len(self._log) == self._kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return attr(*args, **kwargs)

        return event


def _describe(target) -> str:
    return Path(target).name if isinstance(target, (str, os.PathLike)) else "fd"


def _run(cfg_dict: dict, out: Path, kill_at: int | None, resume: bool) -> list[str]:
    """Train the config into ``out`` with the events of :mod:`adapters.files` counted."""
    from adapters import files
    from adapters.config import load_run_config
    from adapters.engine import train

    log: list[str] = []
    real = files.os
    files.os = _Os(real, kill_at, log)
    try:
        train(load_run_config(cfg_dict, [f"run.out_dir={out}", f"run.resume={resume}"]))
    finally:
        files.os = real
    return log


def _child(cfg_dict: dict, out: Path, kill_at: int | None, resume: bool) -> int:
    """Fork; the child runs the config into ``out`` and exits; returns the wait status."""
    return os.waitpid(_fork(lambda: _run(cfg_dict, out, kill_at, resume)), 0)[1]


def _fork(work) -> int:
    """Fork; the child calls ``work()`` and exits (0, or 1 with the traceback printed); returns
    the child's pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        work()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(config: str, base: str) -> None:
    from adapters.methods import METHODS
    from tests.adapters.toy_method import Rotation

    METHODS[Rotation.name] = Rotation
    import torch

    torch.set_num_threads(1)
    cfg = json.loads(Path(config).read_text())
    base_dir = Path(base)
    events = _run(cfg, base_dir / "ref", None, False)
    (base_dir / "events.json").write_text(json.dumps(events))
    only = os.environ.get("KILL_AT")  # e.g. "3,17": a subset, for debugging
    wanted = [int(i) for i in only.split(",")] if only else list(range(1, len(events) + 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    jobs = max(1, min(int(os.environ.get("KILL_JOBS", "2")), cores or 1))
    running = 0  # kill-then-resume chains, the only children of this process
    for i in wanted:
        if running == jobs:
            os.wait()
            running -= 1
        _chain(cfg, base_dir, i, events[i - 1])
        running += 1
    for _ in range(running):
        os.wait()
    report = []
    for i in wanted:
        entry = base_dir / f"kill{i}.json"
        report.append(json.loads(entry.read_text()) if entry.is_file() else
                      {"event": i, "what": events[i - 1], "killed": False, "resumed": False,
                       "error": "the chain failed (see stderr)"})
    (base_dir / "report.json").write_text(json.dumps(report, indent=1))


def _chain(cfg: dict, base_dir: Path, i: int, what: str) -> None:
    """Fork a process that kills a run before event ``i``, resumes it, and writes
    ``BASE/kill<i>.json``."""

    def chain() -> None:
        out = base_dir / f"kill{i}"
        killed = _child(cfg, out, i, False)
        resumed = _child(cfg, out, None, True)
        entry = {"event": i, "what": what,
                 "killed": os.WIFSIGNALED(killed) and os.WTERMSIG(killed) == signal.SIGKILL,
                 "resumed": resumed == 0}
        (base_dir / f"kill{i}.json").write_text(json.dumps(entry))
        print(json.dumps(entry), flush=True)

    _fork(chain)


if __name__ == "__main__":
    main(*sys.argv[1:3])
