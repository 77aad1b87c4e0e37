"""The harness's command line (``python -m benchmarks.cli``, behind ``recon-aux``): the run
folder printed, ``--resume``/``--overwrite``, and every error the user can fix as one line on
stderr with exit status 2."""

from __future__ import annotations

import errno
import json
import os
import pickle

import pytest
import yaml

from adapters import files
from benchmarks import cli as cli_module
from benchmarks.cli import error_line
from benchmarks.cli import main as cli
from recon_aux.weights import WeightsError
from tests.adapters.tiny import tiny_config
from tests.helpers import REPO, TOY


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


@pytest.fixture
def tiny_yaml(tiny_tree, tmp_path, monkeypatch):
    """The tiny run config as a file; its run folder ``run`` is below the working directory
    (the test's folder), as a config file's must be."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_tree, "run")))
    return path


def one_line(capsys, code: int, expected: int = 2) -> str:
    err = capsys.readouterr().err
    assert code == expected, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("recon-aux: "), err
    return lines[0]


def test_train_prints_its_folder_and_refuses_a_used_one(tiny_yaml, tmp_path, capsys):
    run = (tmp_path / "run").absolute()
    assert cli(["train", str(tiny_yaml)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"run folder: {run}"
    assert out[-2] == f"run folder: {run} (result.json, log.jsonl, checkpoint.pt)"
    assert json.loads(out[-1])["out_dir"] == str(run)
    line = one_line(capsys, cli(["train", str(tiny_yaml), "train.lr=0.1"]))
    assert "run folder error:" in line and "already holds a run" in line and "--overwrite" in line
    assert cli(["train", str(tiny_yaml), "--overwrite"]) == 0
    assert cli(["train", str(tiny_yaml), "--resume"]) == 0  # finished: evaluated again
    rows = (run / "log.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    with pytest.raises(SystemExit) as exit_:  # the two flags exclude each other
        cli(["train", str(tiny_yaml), "--resume", "--overwrite"])
    assert exit_.value.code == 2
    line = one_line(capsys, 2)
    assert line.startswith("recon-aux: usage error: argument --overwrite: not allowed with "
                           "argument --resume (see recon-aux train --help)")


def test_stop_after_epoch_says_how_to_continue(tiny_yaml, tmp_path, capsys):
    code = cli(["train", str(tiny_yaml), "run.stop_after_epoch=1"])
    line = one_line(capsys, code, expected=3)
    assert "stopped after epoch 1" in line and "continue with --resume" in line
    assert "run.resume=true" not in line  # the command line's way, not the config key
    assert cli(["train", str(tiny_yaml), "--resume"]) == 0
    code = cli(["train", str(tiny_yaml), "--overwrite", "run.stop_after_epoch=1",
                "run.save_checkpoints=false"])
    warned, line = capsys.readouterr().err.strip().splitlines()  # warned, then stopped
    assert code == 3 and warned.startswith("recon-aux: warning: run.stop_after_epoch=1 with "
                                           "run.save_checkpoints=false leaves no checkpoint")
    assert line.startswith("recon-aux: stopped after epoch 1") and line.endswith(
        "no checkpoint was written (run.save_checkpoints=false): the run can only start again "
        f"(run folder {(tmp_path / 'run').absolute()})")
    assert str((tmp_path / "run").absolute()) in line
    assert cli(["train", str(tiny_yaml), "--resume"]) == 0


def test_arguments_a_backbone_or_method_refuses_are_one_line(tiny_yaml, tmp_path, capsys):
    """The backbone and the method check their own arguments as they are built, before the
    first step: a config error (one line, exit 2), not a traceback."""
    line = one_line(capsys, cli(["train", str(tiny_yaml), "backbone.width=0"]))
    assert line.startswith("recon-aux: config error: backbone 'alexnet_cifar' with {'width': 0}: "
                           "width must be a positive number")
    line = one_line(capsys, cli(["train", str(tiny_yaml), "method={name: deepcluster, k: 3, "
                                 "pca_dim: 8, layer: fc99}", "--overwrite"]))
    assert line.startswith("recon-aux: config error: method 'deepcluster': method.layer='fc99' "
                           "is neither a submodule nor a probe point")
    assert not (tmp_path / "run" / "log.jsonl").exists()  # no epoch ran
    line = one_line(capsys, cli(["train", str(REPO / "benchmarks" / "configs" / "quick.yaml")]))
    assert line.endswith("Its 'methods' says it is a config for recon-aux bench: run it with that.")
    twice = tmp_path / "twice.yaml"
    twice.write_text(tiny_yaml.read_text() + "train: {epochs: 5}\n")
    line = one_line(capsys, cli(["train", str(twice)]))
    assert "key 'train' is written twice in one mapping" in line


def test_errors_are_one_line_with_exit_2(tiny_yaml, tmp_path, capsys, monkeypatch):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: {name: sela\ntrain: [1, 2\n")
    line = one_line(capsys, cli(["train", str(bad_yaml)]))
    assert "is not valid YAML" in line and "line " in line

    line = one_line(capsys, cli(["train", str(tiny_yaml), "eval.knn.tempreature=0.5"]))
    assert "config error: unknown key(s) ['tempreature'] in eval.knn; valid ones:" in line
    line = one_line(capsys, cli(["train", str(tiny_yaml), "recon.wieght=1"]))
    assert "config error" in line and "wieght" in line
    line = one_line(capsys, cli(["train", str(tiny_yaml), "eval.knn.k=100"]))
    assert "eval.knn.k=100 but the kNN bank holds the 24 training images" in line
    line = one_line(capsys, cli(["train", str(tiny_yaml), "data.batch_size=64"]))
    assert "data.batch_size=64 is larger than the 24 training images" in line

    line = one_line(capsys, cli(["train", str(tiny_yaml), "data.dataset=cifar100",
                                 f"data.root={tmp_path / 'nowhere'}"]))
    assert line.startswith("recon-aux: data error: ") and "data.root=DIR (recon-aux train;" in line

    (tmp_path / "afile").write_text("x")
    line = one_line(capsys, cli(["train", str(tiny_yaml), "--out-dir", str(tmp_path / "afile")]))
    assert "run folder error:" in line and "is a file" in line

    assert cli(["train", str(tiny_yaml), "run.stop_after_epoch=1"]) == 3
    capsys.readouterr()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-3] + b"abc")
    line = one_line(capsys, cli(["train", str(tiny_yaml), "--resume"]))
    assert "checkpoint error:" in line and "corrupt or was changed" in line

    class Full:
        def __getattr__(self, name):
            return getattr(os, name)

        def write(self, fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "os", Full())
    line = one_line(capsys, cli(["train", str(tiny_yaml), "--out-dir", str(tmp_path / "full")]))
    assert line.startswith("recon-aux: disk full: could not write ") and "--resume" in line


def test_jobs_reaches_the_matrix_and_a_bad_count_is_one_line(tmp_path, capsys, monkeypatch):
    from benchmarks import bench

    seen = {}
    monkeypatch.setattr(bench, "run_bench", lambda cfg, **kw: seen.update(kw))
    assert cli(["bench", "benchmarks/configs/simclr-cpu.yaml", "--jobs", "3"]) == 0
    assert seen["jobs"] == 3
    monkeypatch.undo()
    line = one_line(capsys, cli(["bench", "benchmarks/configs/simclr-cpu.yaml", "--jobs", "0",
                                 "--out-dir", str(tmp_path / "r")]))
    assert "jobs 0: give a whole number of runs at once, 1 or more" in line


def test_error_lines_of_the_other_known_errors():
    assert error_line(pickle.UnpicklingError("invalid load key, 'x'.")) == \
        "recon-aux: unpickling error: invalid load key, 'x'."
    assert error_line(WeightsError("alexnet.ckpt: sha256 mismatch\nget it again")) == \
        "recon-aux: LPIPS weights error: alexnet.ckpt: sha256 mismatch get it again"
    assert error_line(PermissionError(errno.EACCES, "Permission denied", "/x/result.json")) == \
        "recon-aux: file error: Permission denied: /x/result.json"
    assert error_line(ZeroDivisionError("a bug")) is None  # keeps its traceback


def test_unexpected_errors_keep_their_traceback(tiny_yaml, monkeypatch):
    def bug(cfg):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli_module, "train", bug)
    with pytest.raises(ZeroDivisionError):
        cli(["train", str(tiny_yaml)])


def test_overrides_may_follow_the_options_and_own_warnings_are_one_line(tiny_yaml, tmp_path,
                                                                        capsys):
    out = tmp_path / "late"
    assert cli(["train", str(tiny_yaml), "--out-dir", str(out), "train.lr_schedule=step"]) == 0
    assert json.loads((out / "result.json").read_text())["config"]["train"]["lr_schedule"] == \
        "step"
    assert capsys.readouterr().err.splitlines() == [
        "recon-aux: warning: train.lr_schedule=step without train.milestones keeps the learning "
        "rate constant; give the epochs at which it drops (config 'tiny')."]
    for argv in (["train", str(tiny_yaml), "--resume", "--nope"],
                 ["summary", "--check", "README.md", "a=b"]):
        with pytest.raises(SystemExit) as exit_:
            cli(argv)
        assert exit_.value.code == 2
        assert "unrecognized arguments: " + argv[-1] in capsys.readouterr().err


def test_a_warning_turned_error_is_one_line_too():
    from adapters.config import IneffectiveSettingWarning

    assert error_line(IneffectiveSettingWarning("train.milestones [9] ...")) == \
        "recon-aux: config warning: train.milestones [9] ..."
