"""The ``recon-aux`` console script: the version, and the hand-over to a checkout's harness."""

from __future__ import annotations

import subprocess
import sys

import pytest

import recon_aux
from recon_aux import cli
from tests.helpers import REPO


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"recon-aux {recon_aux.__version__}"


def test_unknown_command_and_no_command(capsys):
    assert cli.main(["serve"]) == 2
    assert "unknown command 'serve'" in capsys.readouterr().err
    assert cli.main([]) == 2 and "usage: recon-aux" in capsys.readouterr().out


def test_finds_the_packages_own_checkout_first_then_upwards(tmp_path):
    checkout = tmp_path / "clone"
    (checkout / "benchmarks").mkdir(parents=True)
    (checkout / "benchmarks" / "cli.py").write_text("")
    (checkout / "adapters").mkdir()
    deep = checkout / "runs" / "x"
    deep.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert cli.find_checkout(deep, package_dir=elsewhere / "recon_aux") == checkout
    assert cli.find_checkout(elsewhere, package_dir=checkout / "recon_aux") == checkout
    assert cli.find_checkout(elsewhere, package_dir=elsewhere / "recon_aux") is None
    assert cli.find_checkout(REPO / "docs") == REPO
    # the editable install's own checkout wins over one the command runs in: a folder cannot
    # put its benchmarks/cli.py in place of the harness beside the imported library
    assert cli.find_checkout(deep, package_dir=REPO / "recon_aux") == REPO


def test_outside_a_checkout_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(cli, "find_checkout", lambda: None)
    assert cli.main(["train", "config.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs from a checkout of the repository" in err[0]
    assert "git clone" in err[0] and "make venv" in err[0]


def test_hands_over_to_the_checkouts_command_line(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)  # found through the editable install's package folder
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "--help"])
    assert done.value.code == 0 and "usage: recon-aux bench" in capsys.readouterr().out


def test_the_library_never_imports_the_harness():
    code = ("import sys, recon_aux, recon_aux.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'adapters', 'benchmarks', "
            "'examples', 'lightly', 'matplotlib', 'faiss'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
