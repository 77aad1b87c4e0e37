"""The wheel holds the add-on only and installs cleanly: built from a copy of the checkout,
installed without dependencies into a fresh virtual environment (torch and the rest borrowed
from this one through a ``.pth`` line), it runs the README's two-line example and
``recon-aux --version`` from a folder outside any checkout."""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import recon_aux
from tests.helpers import REPO

NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build",
                                     "dist", "site", "results", ".pytest_cache", ".ruff_cache",
                                     "runs", "outputs")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_the_readme(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", str(dist), str(source)], cwd=tmp_path)
    (wheel,) = dist.glob("recon_aux-*.whl")
    assert wheel.name.startswith(f"recon_aux-{recon_aux.__version__}-")

    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"recon_aux", f"recon_aux-{recon_aux.__version__}.dist-info"}, tops
    assert "recon_aux/py.typed" in names and "recon_aux/cli.py" in names
    metadata = zipfile.ZipFile(wheel).read(
        f"recon_aux-{recon_aux.__version__}.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in metadata
    assert not re.search(r"Requires-Dist: (torch|torchvision)\b[^;\n]*<", metadata)  # no caps

    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    fresh_site = Path(_run([str(python), "-c", "import sysconfig; "
                            "print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip())
    # Borrow torch, lpips, ... from this environment: plain path lines, so the editable
    # install's finder (run by its own __editable__*.pth) is not installed there.
    borrowed = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    (fresh_site / "borrowed.pth").write_text("\n".join(dict.fromkeys(borrowed)) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
          str(wheel)], cwd=tmp_path)

    outside = tmp_path / "user"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run([str(python), "-c", "import recon_aux; print(recon_aux.__file__)"], outside,
                 env)
    assert Path(where.strip()).resolve().is_relative_to(env_dir.resolve()), where

    readme = (source / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme[readme.index("## The two lines"):],
                     re.S).group(1)
    (outside / "two_lines.py").write_text(code)
    out = _run([str(python), "two_lines.py"], outside, env)
    assert "layer4.1.conv2 " in out and "'lpips'" in out

    script = env_dir / "bin" / "recon-aux"
    assert _run([str(script), "--version"], outside, env).strip() == (
        f"recon-aux {recon_aux.__version__}")
    proc = subprocess.run([str(script), "train", "config.yaml"], cwd=outside, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "checkout of the repository" in proc.stderr
