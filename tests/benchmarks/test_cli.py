"""The harness's command line (``python -m benchmarks.cli``, behind ``recon-aux``)."""

from __future__ import annotations

import json

import yaml

from benchmarks.cli import main as cli
from tests.helpers import TOY


def test_cli_overrides_and_error_exit(tmp_path, capsys, shared_data, toy_method):
    cfg_file = tmp_path / "toy.yaml"
    cfg_file.write_text(yaml.safe_dump(TOY))
    assert cli(["train", str(cfg_file), "train.epochs=1", "recon=null",
                f"data.root={shared_data}", f"run.out_dir={tmp_path / 'run'}"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    summary = json.loads(line)
    assert summary["recon"] is False and "knn_conv5" in summary["metrics"]
    assert cli(["train", str(cfg_file), "train.nope=1"]) == 2
    assert "unknown key(s) ['nope']" in capsys.readouterr().err
