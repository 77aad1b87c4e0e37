"""docs/upstream.md: each patch is shown in the doc, names its commit, and (where a snapshot of
the original repository is on this machine) still applies with ``git apply --check``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import REPO

DOC = REPO / "docs" / "upstream.md"
# patch -> (repository, commit, paths to export)
PATCHES = {
    "deepcluster.patch": ("facebookresearch/deepcluster",
                          "2d1927e8e3dd272329e879e510fbbdf1b1d02d17", ["main.py"]),
    "self-label.patch": ("yukimasano/self-label",
                         "3891e376a82d1e4ac6de6d39505b692b8885c971", ["cifar.py", "main.py"]),
    "AET.patch": ("maple-research-lab/AET", "042be3361490ae1e839c881a4211ba5fe5125407",
                  ["cifar/projective/main.py"]),
}
MIRRORS = Path(os.environ.get("RECON_AUX_MIRRORS", "/work/.mirror"))


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_patch_is_documented_with_its_commit(name):
    text = DOC.read_text()
    repo, commit, _ = PATCHES[name]
    assert f"docs/upstream/{name}" in text and commit in text and repo in text
    patch = (REPO / "docs" / "upstream" / name).read_text()
    added = [line for line in patch.splitlines()
             if line.startswith("+") and not line.startswith("+++")]
    assert any("recon_aux.attach(" in line for line in added)
    assert any(".loss(" in line for line in added)


def _git_dir(repo: str) -> Path | None:
    base = MIRRORS / repo.replace("/", "+")
    for cand in (base / "repo" / ".git", base / "repo"):
        if (cand / "HEAD").is_file():
            return cand
    return None


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_patch_applies_to_the_named_commit(name, tmp_path):
    repo, commit, paths = PATCHES[name]
    git_dir = _git_dir(repo)
    if git_dir is None or shutil.which("git") is None:
        pytest.skip(f"no snapshot of {repo} under {MIRRORS} (set RECON_AUX_MIRRORS)")
    archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", commit, "--", *paths],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    check = subprocess.run(["git", "apply", "--check", str(REPO / "docs" / "upstream" / name)],
                           cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
