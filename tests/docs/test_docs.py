"""The API reference builds from the docstrings (``make docs``) with no warning."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_api_reference_builds_strict(tmp_path):
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    page = (tmp_path / "site" / "api" / "recon_aux" / "index.html").read_text()
    assert "recon_aux.attach" in page and "ReconAuxConfig" in page
    methods = (tmp_path / "site" / "api" / "adapters" / "index.html").read_text()
    assert "SeLaConfig" in methods and "load_run_config" in methods


def test_citation_and_changelog_name_this_version():
    import yaml

    import recon_aux

    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["version"] == recon_aux.__version__
    thesis = next(r for r in cff["references"] if r["type"] == "thesis")
    assert thesis["title"] == "Perceptual Image Similarity for Unsupervised Representation Learning"
    assert thesis["year"] == 2020 and thesis["institution"]["name"] == "Brown University"
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and f"## [{recon_aux.__version__}]" in changelog
