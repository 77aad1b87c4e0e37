"""Self-verifying, atomic checkpoints loaded with ``torch.load(weights_only=True)``.

A checkpoint is one file: a header line that holds the sha256 and the length of the payload,
then the payload (what ``torch.save`` writes)::

    recon-aux checkpoint 2 sha256 <64 hex digits> <payload bytes>\\n<payload>

It is written by :func:`adapters.files.atomic_write` (temporary file, fsync, rename, folder
fsync), so a kill at any moment leaves the previous checkpoint or the new one, each complete and
verifiable on its own: there is no moment where a good checkpoint and its checksum disagree.
Loading reads the whole file, compares the full digest of the payload with the header's, and
only then unpickles those same bytes with the restricted ``weights_only`` unpickler. Everything
saved is tensors and plain Python data (RNG states included), so it needs no allowances.

Checkpoints of the earlier format (the ``torch.save`` file alone, with its sha256 in a
``checkpoint.pt.sha256`` side file) still load: the side file must exist and hold a full
64-digit digest equal to the file's.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import files
from .files import DiskFullError

__all__ = ["CheckpointError", "DiskFullError", "save_checkpoint", "load_checkpoint",
           "checkpoint_bytes", "rng_state", "set_rng_state", "MAGIC"]

#: The start of a checkpoint file of the current format.
MAGIC = b"recon-aux checkpoint 2 "
_HEADER = re.compile(rb"recon-aux checkpoint 2 sha256 ([0-9a-f]{64}) ([0-9]{1,15})\n")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, unverifiable, or from a different config."""


def side_file(path: str | Path) -> Path:
    """The ``.sha256`` side file of a checkpoint of the earlier format."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def checkpoint_bytes(state: dict[str, Any]) -> tuple[bytes, bytes]:
    """The header and the payload a checkpoint of ``state`` consists of."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    return MAGIC + f"sha256 {digest} {len(payload)}\n".encode(), payload


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` as one self-verifying file, atomically (see the module docstring).

    A ``.sha256`` side file of the earlier format is deleted afterwards (the file no longer
    needs one).

    Raises:
        DiskFullError: The disk is full; the previous checkpoint at ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header, payload = checkpoint_bytes(state)
    files.atomic_write(path, [header, payload])
    side = side_file(path)
    if side.exists():
        files.os.unlink(side)
        files.fsync_dir(path.parent)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Verify a checkpoint's full sha256, then ``torch.load(..., weights_only=True)`` on the CPU.

    Raises:
        CheckpointError: No file; a digest or length that does not match; an earlier-format file
            without its ``.sha256`` side file or with a malformed one; a payload the restricted
            unpickler refuses.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; check the path (run.out_dir), or "
                              "start the run without resuming.")
    data = path.read_bytes()
    if len(data) < len(MAGIC) and MAGIC.startswith(data):  # cut before its header was whole
        raise CheckpointError(f"{path} is empty or truncated ({len(data)} bytes): resume from "
                              "another checkpoint, or start the run again.")
    if data.startswith(MAGIC):
        payload = _verified_payload(path, data)
    else:
        payload = _verified_legacy(path, data)
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:  # the restricted unpickler's refusals and any malformed payload
        # what was refused, not torch's advice to load with weights_only=False, which this
        # project never does
        lines = [line.strip() for line in str(exc).splitlines()
                 if line.strip() and "weights_only" not in line]
        first = next((line for line in lines if "unsupported" in line.lower()),
                     lines[0] if lines else type(exc).__name__)
        raise CheckpointError(f"{path} passed its checksum but could not be loaded safely "
                              f"({type(exc).__name__}: {first[:300]}): only tensors and plain "
                              "data are unpickled. Resume from another checkpoint, or start the "
                              "run again.") from None


def _verified_payload(path: Path, data: bytes) -> bytes:
    end = data.find(b"\n", 0, 200)
    match = _HEADER.fullmatch(data[: end + 1]) if end >= 0 else None
    if match is None:
        raise CheckpointError(f"{path} has a malformed header (expected 'recon-aux checkpoint 2 "
                              "sha256 <digest> <length>'): the file is corrupt. Resume from "
                              "another checkpoint, or start the run again.")
    expected, length = match.group(1).decode(), int(match.group(2))
    payload = data[end + 1:]
    if len(payload) != length:
        raise CheckpointError(f"{path} holds {len(payload)} payload bytes but its header says "
                              f"{length}: the file is truncated or was changed. Resume from "
                              "another checkpoint, or start the run again.")
    actual = hashlib.sha256(payload).hexdigest()
    if not hmac.compare_digest(actual, expected):
        raise CheckpointError(f"{path} has sha256 {actual} but its header says {expected}: the "
                              "file is corrupt or was changed. Resume from another checkpoint, "
                              "or start the run again.")
    return payload


def _verified_legacy(path: Path, data: bytes) -> bytes:
    side = side_file(path)
    if not side.is_file():
        raise CheckpointError(f"{path} is a checkpoint of the earlier format and has no "
                              f"{side.name}: refusing to unpickle an unverified file. Re-create "
                              "it, or write its sha256 there if you trust it.")
    text = side.read_text(errors="replace").split()
    if not text or not _HEX64.fullmatch(text[0]):
        raise CheckpointError(f"{side} does not hold a 64-digit sha256 (it holds "
                              f"{(text or [''])[0][:80]!r}): refusing to unpickle {path}. Write "
                              "the file's full sha256 there if you trust it.")
    expected, actual = text[0], hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(actual, expected):
        raise CheckpointError(f"{path} has sha256 {actual} but {side.name} says {expected}: the "
                              "file is corrupt or was changed. Resume from another checkpoint, "
                              "or start the run again.")
    return data


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and Python RNG states as weights_only-safe data."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the CUDA states only where CUDA is present)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
