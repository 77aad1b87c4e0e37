"""Run folders and the checks before training, on the tiny data set: a used folder is never
written over without resume or overwrite, every data-dependent setting is refused before the
first step, the log never holds an epoch twice, a full disk keeps the last checkpoint, and
runs of the earlier checkpoint format resume."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from adapters import engine, files
from adapters.checkpoint import MAGIC, load_checkpoint
from adapters.config import IneffectiveSettingWarning, RunConfigError, load_run_config
from adapters.engine import StopTraining, train
from adapters.runs import RunFolderError
from tests.adapters.tiny import tiny_config


def cfg(tree, out, *overrides, **sections):
    return load_run_config(tiny_config(tree, out, **sections), overrides)


def epochs(folder: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (folder / "log.jsonl").read_text().splitlines()]


def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_used_folder_needs_resume_or_overwrite(tiny_tree, tmp_path):
    out = tmp_path / "run"
    first = train(cfg(tiny_tree, out))
    before = (out / "checkpoint.pt").read_bytes()
    for overrides in ([], ["train.lr=0.1"]):  # the same config or another one
        with pytest.raises(RunFolderError, match=r"already holds a run \(checkpoint.pt, log.jsonl, "
                                                 r"result.json, reconstructions.png\); continue it "
                                                 r"with --resume .* --overwrite"):
            train(cfg(tiny_tree, out, *overrides))
    assert (out / "checkpoint.pt").read_bytes() == before and epochs(out) == [1, 2]
    with pytest.raises(RunConfigError, match="eval.knn.k=100"):  # refused before anything goes
        train(cfg(tiny_tree, out, "run.overwrite=true", "eval.knn.k=100"))
    assert (out / "checkpoint.pt").read_bytes() == before and epochs(out) == [1, 2]
    again = train(cfg(tiny_tree, out, "run.overwrite=true"))  # deleted, then trained again
    assert again["metrics"] == first["metrics"] and epochs(out) == [1, 2]
    resumed = train(cfg(tiny_tree, out, "run.resume=true"))  # finished: evaluates again
    assert resumed["metrics"] == first["metrics"] and epochs(out) == [1, 2]
    with pytest.raises(RunConfigError, match="exclude each other"):
        cfg(tiny_tree, out, "run.resume=true", "run.overwrite=true")


def test_resume_without_a_checkpoint_refuses_another_runs_result(tiny_tree, tmp_path,
                                                                    monkeypatch):
    """--resume where only a result is left (no checkpoint: ``run.save_checkpoints=false``, or
    deleted) starts from scratch only over its own run's files: another config's result is
    refused before anything is loaded, and left as it was."""
    out = tmp_path / "run"
    train(cfg(tiny_tree, out, "run.save_checkpoints=false"))
    result = (out / "result.json").read_bytes()
    again = train(cfg(tiny_tree, out, "run.save_checkpoints=false", "run.resume=true"))
    assert again["metrics"] == json.loads(result)["metrics"]  # its own: trained again
    _no_loading(monkeypatch)
    with pytest.raises(RunFolderError, match=r"result of a run with a different config "
                                             r"\(differing keys: \['train.lr'\]\) and no "
                                             r"checkpoint.*--overwrite"):
        train(cfg(tiny_tree, out, "run.resume=true", "train.lr=0.1"))
    (out / "result.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="cannot be read as a run's result"):
        train(cfg(tiny_tree, out, "run.resume=true"))
    assert (out / "result.json").read_text() == "{not json"


def test_settings_that_cannot_take_effect_are_warned_and_the_run_goes_on(tiny_tree, tmp_path):
    with pytest.warns(IneffectiveSettingWarning) as caught:
        result = train(cfg(tiny_tree, tmp_path / "run", "train.lr_schedule=step",
                           "run.stop_after_epoch=2"))  # the tiny run has 2 epochs
    assert [str(w.message).split(" ")[0] for w in caught] == ["train.lr_schedule=step",
                                                              "run.stop_after_epoch=2"]
    assert [row["epoch"] for row in result["history"]] == [1, 2]


def _no_loading(monkeypatch):
    monkeypatch.setattr(engine, "load_dataset",
                        lambda *a, **k: pytest.fail("loaded data for a refused folder"))


def test_folder_that_is_a_file_or_not_writable_is_refused_first(tiny_tree, tmp_path,
                                                                  monkeypatch):
    _no_loading(monkeypatch)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        train(cfg(tiny_tree, tmp_path / "file"))
    with pytest.raises(RunFolderError, match="cannot create the run folder"):
        train(cfg(tiny_tree, tmp_path / "file" / "run"))
    real = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".write-test"):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(RunFolderError, match="is not writable \\(Permission denied\\)"):
        train(cfg(tiny_tree, tmp_path / "ro"))
    if os.geteuid() != 0:  # a real read-only folder (root writes anyway)
        monkeypatch.setattr(Path, "write_bytes", real)
        (tmp_path / "ro2").mkdir(mode=0o500)
        with pytest.raises(RunFolderError, match="not writable"):
            train(cfg(tiny_tree, tmp_path / "ro2"))


@pytest.mark.parametrize("overrides, match", [
    (["data.batch_size=25"], r"data.batch_size=25 is larger than the 24 training images: .* "
                             r"0 steps. Use data.batch_size <= 24"),
    (["eval.knn.k=30"], r"eval.knn.k=30 but the kNN bank holds the 24 training images; use "
                        r"eval.knn.k <= 24"),
    (["data.per_class=13"], r"data.per_class=13 but class 'ant' has only 12 training images; "
                            r"use data.per_class <= 12"),
    (["data.test_per_class=5"], r"data.test_per_class=5 but class 'ant' has only 4 test"),
    (["eval.knn.layers=[conv5, conv9]"], r"eval.knn.layers: 'conv9' is not a layer of backbone "
                                         r"'alexnet_cifar'; its probe points: conv1, conv2"),
    (["eval.linear={layer: fc9}"], r"eval.linear.layer: 'fc9' is not a layer"),
    (["eval.nonlinear={layer: conv0}"], r"eval.nonlinear.layer: 'conv0' is not a layer"),
    (["recon.layer=conv9"], r"recon.layer: 'conv9' is not a module of backbone"),
    (["data.resize=64"], r"data.resize=64 does not fit backbone 'alexnet_cifar'"),
    (["method={name: deepcluster, k: 30}"], r"method.k=30 clusters for 24 training images"),
    (["eval.linear={layer: conv5, val_fraction: 0.01}"], r"eval.linear.val_fraction=0.01 holds "
                                                         r"out 0 of the 24 training images"),
    (["eval.nonlinear={layer: conv5, num_classes: 1}"], r"eval.nonlinear.num_classes=1 but the "
                                                        r"data's labels go up to 1; use "
                                                        r"eval.nonlinear.num_classes >= 2"),
    (["eval.linear={layer: conv5, num_classes: 1}"], r"eval.linear.num_classes=1 but"),
    (["eval.knn.num_classes=1"], r"eval.knn.num_classes=1 but the data's labels go up to 1"),
])
def test_data_dependent_settings_refused_before_training(tiny_tree, tmp_path, monkeypatch,
                                                         overrides, match):
    monkeypatch.setattr(engine.Trainer, "_step", lambda *a: pytest.fail("trained a step"))
    with pytest.raises(RunConfigError, match=match):
        train(cfg(tiny_tree, tmp_path / "run", *overrides))
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    with pytest.raises(RunConfigError, match=match):  # what bench checks before any run
        engine.check_run(cfg(tiny_tree, tmp_path / "run", *overrides))


def test_zero_epochs_writes_valid_json_without_a_loss(tiny_tree, tmp_path):
    result = train(cfg(tiny_tree, tmp_path, "train.epochs=0"))
    assert "final_method_loss" not in result["metrics"]
    assert strict_json(tmp_path / "result.json")["metrics"] == result["metrics"]


def test_log_never_holds_an_epoch_twice_and_temporaries_go(tiny_tree, tmp_path):
    full = train(cfg(tiny_tree, tmp_path / "full"))
    out = tmp_path / "cut"
    with pytest.raises(StopTraining):
        train(cfg(tiny_tree, out, "run.stop_after_epoch=1"))
    # what the earlier writer left when killed between its log append and its checkpoint: the
    # row of an epoch the checkpoint does not hold, and a 14 MB temporary file
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "step": 6}) + "\n")
    (out / "checkpoint.ptk2_9wq.tmp").write_bytes(b"\0" * (14 << 20))
    (out / "checkpoint.pt.sha256abc123.tmp").write_bytes(b"x")
    resumed = train(cfg(tiny_tree, out, "run.resume=true"))
    assert resumed["metrics"] == full["metrics"] and epochs(out) == [1, 2]
    assert (out / "log.jsonl").read_text() == (tmp_path / "full" / "log.jsonl").read_text()
    assert not list(out.glob("*.tmp"))


def _disk_full_on(name: str, nth: int = 1):
    """``os`` for adapters.files whose ``write`` fails with ENOSPC on the nth file ``name``."""

    class Full:
        def __init__(self):
            self.fds, self.count = {}, 0

        def __getattr__(self, attr):
            return getattr(os, attr)

        def open(self, path, *args):
            fd = os.open(path, *args)
            if Path(path).name.startswith(name + "."):
                self.count += 1
                if self.count == nth:
                    self.fds[fd] = path
            return fd

        def write(self, fd, data):
            if fd in self.fds:
                os.write(fd, bytes(data[:100]))  # a partial write, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
            return os.write(fd, data)

    return Full()


@pytest.mark.parametrize("name, nth, last", [
    ("checkpoint.pt", 1, "no checkpoint of this run was written yet"),
    ("checkpoint.pt", 2, r"the last good checkpoint, .*checkpoint.pt \(after epoch 1\), is "
                         "intact"),
    ("log.jsonl", 2, r"the last good checkpoint, .* \(after epoch 2\), is intact"),
    ("result.json", 1, r"the last good checkpoint, .* \(after epoch 2\), is intact"),
    ("reconstructions.png", 1, r"the last good checkpoint, .* \(after epoch 2\), is intact"),
])
def test_disk_full_on_any_file_names_it_and_resume_works(tiny_tree, tmp_path, monkeypatch,
                                                         name, nth, last):
    full = train(cfg(tiny_tree, tmp_path / "full"))
    out = tmp_path / "run"
    monkeypatch.setattr(files, "os", _disk_full_on(name, nth))
    with pytest.raises(files.DiskFullError, match=f"disk full: could not write {out / name}; "
                                                   f"{last}. Free some space, then continue with "
                                                   "--resume"):
        train(cfg(tiny_tree, out))
    monkeypatch.setattr(files, "os", os)
    assert not list(out.glob("*.tmp"))
    resumed = train(cfg(tiny_tree, out, "run.resume=true"))
    assert resumed["metrics"] == full["metrics"] and resumed["history"] == full["history"]
    assert epochs(out) == [1, 2]


def test_run_of_the_earlier_checkpoint_format_resumes(tiny_tree, tmp_path):
    full = train(cfg(tiny_tree, tmp_path / "full"))
    out = tmp_path / "cut"
    with pytest.raises(StopTraining):
        train(cfg(tiny_tree, out, "run.stop_after_epoch=1"))
    ckpt = out / "checkpoint.pt"
    data = ckpt.read_bytes()
    assert data.startswith(MAGIC)
    payload = data[data.index(b"\n") + 1:]  # the torch.save file and a .sha256 side file
    ckpt.write_bytes(payload)
    (out / "checkpoint.pt.sha256").write_text(hashlib.sha256(payload).hexdigest() + "\n")
    assert load_checkpoint(ckpt)["epoch"] == 1
    resumed = train(cfg(tiny_tree, out, "run.resume=true"))
    assert resumed["metrics"] == full["metrics"]
    assert not (out / "checkpoint.pt.sha256").exists() and ckpt.read_bytes().startswith(MAGIC)


def test_a_non_finite_diagnostic_is_null_in_valid_json(tiny_tree, tmp_path, monkeypatch):
    from tests.adapters.toy_method import Rotation

    start = Rotation.on_epoch_start

    def with_nan(self, ctx):
        start(self, ctx)
        ctx.log({"nmi": float("nan")})  # e.g. a clustering diagnostic that is undefined

    monkeypatch.setattr(Rotation, "on_epoch_start", with_nan)
    result = train(cfg(tiny_tree, tmp_path))
    assert [row["nmi"] for row in result["history"]] == [None, None]
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))
            for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [row["nmi"] for row in rows] == [None, None]
    assert strict_json(tmp_path / "result.json")["history"][0]["nmi"] is None


def test_naming_the_default_tap_trains_the_same_run_bit_for_bit(tiny_tree, tmp_path):
    # what benchmarks.matrix.run_config_diff relies on to match a run recorded with
    # recon.layer unset to a config that names the layer it tapped
    default = train(cfg(tiny_tree, tmp_path / "default"))
    named = train(cfg(tiny_tree, tmp_path / "named", "recon.layer=conv5.0"))
    assert default["tapped"] == named["tapped"] == "conv5.0"
    assert default["history"] == named["history"] and default["metrics"] == named["metrics"]
    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("default", "named"))
    for part in ("backbone", "aux"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]
                   if isinstance(a[part][k], torch.Tensor))
    assert train(cfg(tiny_tree, tmp_path / "base", recon=None))["tapped"] is None


def test_the_picture_needs_the_objective_and_an_even_count(tiny_tree, tmp_path):
    base = engine.Trainer(cfg(tiny_tree, tmp_path / "base", recon=None))
    with pytest.raises(ValueError, match="this run has recon: null, so nothing reconstructs"):
        base.save_reconstructions(tmp_path / "base" / "p.png")
    recon = engine.Trainer(cfg(tiny_tree, tmp_path / "recon"))
    with pytest.raises(ValueError, match=r"n=3: give an even number of images"):
        recon.save_reconstructions(tmp_path / "recon" / "p.png", n=3)
    assert not (tmp_path / "recon" / "p.png").exists()


def test_lpips_weights_that_cannot_be_used_fail_before_the_data_loads(tiny_tree, tmp_path,
                                                                      monkeypatch):
    """A bench checks every planned run with check_run before the first trains, so a +recon
    row whose LPIPS weights are missing fails before the base rows have trained."""
    monkeypatch.setattr(engine, "load_dataset",
                        lambda *a, **k: pytest.fail("loaded data for a refused config"))
    missing = tmp_path / "nope.pth"
    bad = cfg(tiny_tree, tmp_path / "run", recon={"lpips_weights": str(missing)})
    for attempt in (lambda: engine.train(bad), lambda: engine.check_run(bad)):
        with pytest.raises(RunConfigError, match=rf"recon.lpips_weights='{missing}': weights "
                                                 rf"file {missing} does not exist"):
            attempt()
    # no LPIPS term, nothing to look for
    engine.check_lpips_weights(cfg(tiny_tree, tmp_path / "l2", recon={
        "lpips_weights": str(missing), "lpips_weight": 0.0}))


@pytest.mark.parametrize("out_dir", ["../elsewhere", "/tmp/elsewhere", "runs/../../x"])
def test_a_config_file_names_its_run_folder_only_below_the_working_directory(tmp_path, out_dir):
    """``run.overwrite`` deletes a run's files in ``run.out_dir``: a config file (which may come
    from anyone) cannot point it outside; the command line can."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"method": {"name": "sela"}, "run": {"out_dir": out_dir}}))
    with pytest.raises(RunConfigError, match=r"leaves the working directory; a config file may "
                                             r"name only a folder below it.*--out-dir DIR"):
        load_run_config(path)
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump({"method": {"name": "sela"}, "run": {"out_dir": "runs/x"}}))
    assert load_run_config(plain, [f"run.out_dir={out_dir}"]).run.out_dir == out_dir
    assert load_run_config(plain).run.out_dir == "runs/x"


@pytest.mark.parametrize("name", ["../x", "a/b", ".."])
def test_a_config_name_is_a_plain_name(name):
    with pytest.raises(RunConfigError, match="is not a plain name: it names the run folder"):
        load_run_config({"name": name, "method": {"name": "sela"}})
