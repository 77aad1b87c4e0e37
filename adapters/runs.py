"""Run folders: where a run's files go, what they are called, and whether a folder may take a
run.

A run writes its checkpoint, ``log.jsonl``, ``result.json`` and reconstruction picture into one
folder (``run.out_dir``, else ``runs/<config name>/<method>-<base|recon>-seed<seed>``). A
folder that holds any of them holds a run, which is never written over unless ``run.resume``
(continue it) or ``run.overwrite`` (delete its files first); ``run.resume`` over another
config's result with no checkpoint is refused too. The engine (:mod:`adapters.engine`) checks a
folder before it loads anything, and clears it only once every check has passed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import files
from .config import RunConfig, config_diff

__all__ = ["CHECKPOINT", "LOG", "RESULT", "PICTURE", "RUN_FILES", "RunFolderError", "run_dir",
           "prepare_run_folder", "result_config_diff"]

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
RESULT = "result.json"
PICTURE = "reconstructions.png"
#: The files a run writes in its folder; a folder holding any of them holds a run.
RUN_FILES = (CHECKPOINT, f"{CHECKPOINT}.sha256", LOG, RESULT, PICTURE)


class RunFolderError(RuntimeError):
    """A run folder cannot be used: it holds another run (and neither ``run.resume`` nor
    ``run.overwrite`` is set), it is a file, or it cannot be created or written."""


def run_dir(cfg: RunConfig) -> Path:
    """The run's folder: ``run.out_dir``, else
    ``runs/<config name>/<method>-<base|recon>-seed<seed>`` (relative to the working directory)."""
    return Path(cfg.run.out_dir) if cfg.run.out_dir else _default_out_dir(cfg)


def prepare_run_folder(folder: Path, resume: bool = False, overwrite: bool = False,
                       clear: bool = True, config: RunConfig | None = None) -> None:
    """Make ``folder`` ready for a run, or refuse it.

    Creates it if needed; refuses a file, a folder that cannot be created or written, and a
    folder that holds a run (any of :data:`RUN_FILES`) unless ``resume`` (continue it) or
    ``overwrite``. With ``resume`` and ``config`` it also refuses a folder whose
    ``result.json`` was written by another config while no checkpoint is there (the run would
    start from scratch over another run's files; with a checkpoint, the engine compares the
    checkpoint's config when it resumes). With ``clear`` it then deletes what a new run
    replaces: with ``overwrite`` the old run's files, and always the temporary files a killed
    run left. (The engine checks with ``clear=False`` before it loads anything, and clears once
    every check has passed, so a refused config never costs the old run.)

    Raises:
        RunFolderError: What is wrong and what to do instead.
        DiskFullError: Not even an empty file can be created there.
    """
    folder = Path(folder)
    flags = "--out-dir (run.out_dir)"
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"the run folder {folder} is a file, not a folder; choose another "
                             f"{flags}.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunFolderError(f"cannot create the run folder {folder} ({exc.strerror or exc}); "
                             f"choose another {flags}.") from None
    used = [name for name in RUN_FILES if (folder / name).exists()]
    if used and not resume and not overwrite:
        raise RunFolderError(
            f"{folder} already holds a run ({', '.join(used)}); continue it with --resume "
            "(run.resume=true), start it again with --overwrite (run.overwrite=true: deletes "
            f"those files), or choose another {flags}.")
    if resume and not overwrite and config is not None and RESULT in used \
            and CHECKPOINT not in used:
        _check_result_is_this_runs(folder / RESULT, config, flags)
    try:
        probe = folder / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        if clear:
            for name in [] if resume else used:  # overwrite
                (folder / name).unlink()
            files.remove_stale_temporaries(folder, RUN_FILES)
    except OSError as exc:
        if files.is_disk_full(exc):
            raise files.DiskFullError(f"disk full: cannot write in the run folder {folder}",
                                      folder) from None
        raise RunFolderError(f"the run folder {folder} is not writable ({exc.strerror or exc}); "
                             f"choose another {flags}.") from None


def _check_result_is_this_runs(path: Path, config: RunConfig, flags: str) -> None:
    """Refuse to resume over ``path`` (a ``result.json`` with no checkpoint beside it) unless
    it was written by ``config``."""
    remedy = (f"start the run again there with --overwrite (run.overwrite=true: deletes its "
              f"files), or choose another {flags}.")
    try:
        diff = result_config_diff(path, config)
    except ValueError as exc:
        raise RunFolderError(f"{exc}, and there is no checkpoint to resume: whose run the "
                             f"folder holds is unknown; {remedy}") from None
    if diff:
        raise RunFolderError(
            f"{path.parent} holds the result of a run with a different config (differing keys: "
            f"{diff}) and no checkpoint to resume: --resume would start from scratch over its "
            f"files; {remedy}")


def result_config_diff(path: Path, config: RunConfig) -> list[str]:
    """The keys (:func:`config_diff`) in which the config that wrote the run result ``path``
    differs from ``config``.

    Raises:
        ValueError: ``path`` cannot be read as a run's result (what went wrong).
    """
    try:
        return config_diff(json.loads(path.read_text(encoding="utf-8"))["config"], config)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path} cannot be read as a run's result ({type(exc).__name__}: "
                         f"{exc})") from None


def _default_out_dir(cfg: RunConfig) -> Path:
    tag = "recon" if cfg.recon is not None else "base"
    return Path("runs") / cfg.name / f"{cfg.method.name}-{tag}-seed{cfg.train.seed}"
