"""Checkpoints: one self-verifying file, the earlier format still read, nothing unpickled before
its full digest matches, nothing but tensors and plain data unpickled, a full disk named."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle

import pytest
import torch

from adapters import files
from adapters.checkpoint import (
    MAGIC,
    CheckpointError,
    DiskFullError,
    load_checkpoint,
    save_checkpoint,
    side_file,
)

STATE = {"epoch": 3, "weights": torch.arange(6.0).view(2, 3), "history": [{"loss": 1.5}]}


def _equal(a, b):
    assert a.keys() == b.keys()
    assert a["epoch"] == b["epoch"] and a["history"] == b["history"]
    assert torch.equal(a["weights"], b["weights"])


def test_one_file_round_trip_without_side_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, STATE)
    assert path.read_bytes().startswith(MAGIC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporaries
    _equal(load_checkpoint(path), STATE)


@pytest.mark.parametrize("where", ["payload", "header digest", "truncated", "appended"])
def test_any_change_is_refused_before_unpickling(tmp_path, where, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, STATE)
    data = bytearray(path.read_bytes())
    head = data.index(b"\n") + 1
    if where == "payload":
        data[-10] ^= 1
    elif where == "header digest":
        i = data.index(b"sha256 ") + 7
        data[i + 63:i + 64] = b"0" if data[i + 63:i + 64] != b"0" else b"1"  # the last digit
    elif where == "truncated":
        data = data[:head + 100]
    else:
        data += b"x"
    path.write_bytes(bytes(data))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("unpickled unverified bytes"))
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        load_checkpoint(path)


def _legacy(path, state, digest=None):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path.write_bytes(buffer.getvalue())
    if digest is not False:
        digest = hashlib.sha256(buffer.getvalue()).hexdigest() if digest is None else digest
        side_file(path).write_text(digest + "\n")


def test_earlier_format_loads_with_its_full_digest(tmp_path):
    path = tmp_path / "checkpoint.pt"
    _legacy(path, STATE)
    _equal(load_checkpoint(path), STATE)
    save_checkpoint(path, STATE)  # the next save writes the new format; the side file goes
    assert not side_file(path).exists() and path.read_bytes().startswith(MAGIC)
    _equal(load_checkpoint(path), STATE)


@pytest.mark.parametrize("digest, match", [
    (False, "has no checkpoint.pt.sha256: refusing"),  # a missing side file is refused
    ("", "does not hold a 64-digit sha256"),
    ("abc", "does not hold a 64-digit sha256"),  # a prefix is not a digest
    ("0" * 64, "corrupt or was changed"),
])
def test_earlier_format_side_file_checked_in_full(tmp_path, digest, match):
    path = tmp_path / "checkpoint.pt"
    _legacy(path, STATE, digest)
    if digest == "abc":  # the real digest's first characters are refused too
        real = hashlib.sha256(path.read_bytes()).hexdigest()
        side_file(path).write_text(real[:40] + "\n")
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


class _Planted:
    def __reduce__(self):
        return (os.system, ("touch PLANTED",))


def test_code_in_a_verified_checkpoint_never_runs(tmp_path, monkeypatch):
    """A checkpoint whose checksum matches but whose pickle calls a function is refused by the
    restricted unpickler: one CheckpointError, no code run."""
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"epoch": 1, "x": _Planted()}, protocol=2)
    buffer = io.BytesIO()
    torch.save({"epoch": 1}, buffer)  # a real zip checkpoint whose data.pkl we replace
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = payload if info.filename.endswith("data.pkl") else src.read(info)
            dst.writestr(info, data)
    body = out.getvalue()
    digest = hashlib.sha256(body).hexdigest()
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(MAGIC + f"sha256 {digest} {len(body)}\n".encode() + body)
    with pytest.raises(CheckpointError, match="could not be loaded safely .*unsupported GLOBAL "
                                              r"\w+\.system") as caught:
        load_checkpoint(path)
    assert not (tmp_path / "PLANTED").exists()
    assert "weights_only" not in str(caught.value)  # never torch's advice to turn it off
    path.write_bytes(MAGIC + f"sha256 {hashlib.sha256(b'junk').hexdigest()} 4\n".encode()
                     + b"junk")
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        load_checkpoint(path)


def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, STATE)
    before = path.read_bytes()
    real_write = os.write

    def full(fd, data):
        real_write(fd, bytes(data)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "write", full)
    with pytest.raises(DiskFullError, match=f"disk full: could not write {path}"):
        save_checkpoint(path, {**STATE, "epoch": 4})
    monkeypatch.undo()
    assert path.read_bytes() == before  # untouched, and no temporary left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(path)["epoch"] == 3


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / "checkpoint.pt.1a2b3c4d.tmp").write_bytes(b"x" * 100)
    (tmp_path / "checkpoint.pt.sha256k2_9wq.tmp").write_bytes(b"x")  # the earlier writer's
    (tmp_path / "log.jsonl.0a0a0a0a.tmp").write_bytes(b"x")
    (tmp_path / "mine.tmp").write_bytes(b"not ours")
    removed = files.remove_stale_temporaries(tmp_path, ["checkpoint.pt", "checkpoint.pt.sha256",
                                                        "log.jsonl"])
    assert len(removed) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["mine.tmp"]


def test_json_refuses_non_finite_numbers():
    assert files.json_text({"a": 1.0}) == '{"a": 1.0}'
    with pytest.raises(ValueError, match=r"metrics.final_method_loss=nan"):
        files.json_text({"metrics": {"final_method_loss": float("nan")}})


@pytest.mark.parametrize("size", [0, 5])
def test_an_empty_or_cut_header_is_called_truncated(tmp_path, size):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(MAGIC[:size])
    with pytest.raises(CheckpointError, match=rf"is empty or truncated \({size} bytes\)"):
        load_checkpoint(path)


def test_a_missing_checkpoint_says_where_it_looked_and_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint at .*nope.pt; check the path "
                                              r"\(run.out_dir\), or start the run without"):
        load_checkpoint(tmp_path / "nope.pt")
