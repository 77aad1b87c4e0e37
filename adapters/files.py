"""Files a run writes: atomic, fsynced, and a full disk reported as such.

Every file of a run folder and of a results folder (checkpoint, ``log.jsonl``, ``result.json``,
pictures, ``results.json``) is written by :func:`atomic_write`: the bytes go to a temporary file
in the same folder (``<name>.<random>.tmp``), which is fsynced, closed and renamed over the
target with ``os.replace``, and then the folder itself is fsynced so the rename is durable. A
process killed at any moment leaves either the old file or the new one, never a mix, plus at
most one temporary file, which :func:`remove_stale_temporaries` deletes when the folder is used
again.

Each file-system operation goes through this module's ``os`` (``os.open``, ``os.write``,
``os.fsync``, ``os.close``, ``os.replace``, ``os.unlink``), which is what the tests wrap to kill
a run at every one of them.

A full disk (``ENOSPC``, or a quota, ``EDQUOT``) is a :class:`DiskFullError` that names the file;
the temporary file is removed and the old file is left as it was.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["DiskFullError", "atomic_write", "fsync_dir", "remove_stale_temporaries",
           "json_text", "is_disk_full"]

#: Bytes handed to one ``os.write`` call (64 MiB).
CHUNK = 1 << 26


class DiskFullError(OSError):
    """A write failed because the disk (or the user's quota) is full."""

    def __init__(self, message: str, filename: str | os.PathLike[str] | None = None) -> None:
        super().__init__(errno.ENOSPC, message)
        self.message = message
        self.filename = None if filename is None else str(filename)

    def __str__(self) -> str:
        return self.message


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-space error (``ENOSPC`` or ``EDQUOT``)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


def _temporary_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, so that a rename or a deletion in it survives a crash (where supported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes | memoryview | Iterable[bytes]) -> None:
    """Replace ``path`` by ``data`` atomically: temporary file, fsync, rename, folder fsync.

    Args:
        path: The file to write (its folder must exist).
        data: The bytes, or an iterable of byte strings written one after the other.

    Raises:
        DiskFullError: The disk or quota is full (the old file, if any, is untouched).
        OSError: Any other failure (the temporary file is removed first).
    """
    path = Path(path)
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    tmp = _temporary_name(path)
    fd = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        for part in parts:
            view = memoryview(part).cast("B")
            while len(view):
                written = os.write(fd, view[:CHUNK])
                view = view[written:]
        os.fsync(fd)
        os.close(fd)
        fd = None
        os.replace(tmp, path)
    except BaseException as exc:
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if is_disk_full(exc):
            raise DiskFullError(f"disk full: could not write {path} ({exc.strerror})",
                                path) from exc
        raise
    fsync_dir(path.parent)


def remove_stale_temporaries(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Delete the temporary files a killed writer leaves (``<name>*.tmp``: :func:`atomic_write`'s
    ``<name>.<random>.tmp`` and the earlier ``<name><random>.tmp``) for the given file ``names``
    in ``folder``; returns what was deleted."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for name in names:
        for tmp in folder.glob(f"{_glob_escape(name)}*.tmp"):
            if tmp.is_file() and tmp not in removed:
                os.unlink(tmp)
                removed.append(tmp)
    if removed:
        fsync_dir(folder)
    return removed


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def json_text(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that refuses NaN and infinities (which are not JSON) with an error naming
    where they are, instead of writing ``NaN``."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        where = _non_finite(obj, "")
        raise ValueError(f"refusing to write {where} as JSON: a non-finite number is not valid "
                         "JSON") from None


def _non_finite(obj: Any, where: str) -> str:
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{where or 'the value'}={obj}"
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _non_finite(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _non_finite(v, f"{where}[{i}]")
            if found:
                return found
    return ""
