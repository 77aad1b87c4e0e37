"""The shared engine: end to end on real CIFAR-10, exact resume, config errors, non-finite stop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from adapters.checkpoint import CheckpointError, load_checkpoint
from adapters.config import RunConfigError, load_run_config
from adapters.engine import StopTraining, reported_metrics, train
from recon_aux import NonFiniteLossError
from tests.helpers import TOY


def toy(tmp_path, *overrides: str, data=None):
    cfg = load_run_config(TOY, [f"run.out_dir={tmp_path}", f"data.root={data}", *overrides])
    return cfg


@pytest.fixture(autouse=True)
def registered(toy_method):
    """Every test here may train the toy method."""


@pytest.mark.parametrize("recon", [True, False])
def test_end_to_end_outputs(tmp_path, shared_data, recon):
    cfg = toy(tmp_path, *([] if recon else ["recon=null"]), data=shared_data)
    result = train(cfg)
    assert set(result["metrics"]) >= {"knn_conv5", "knn_fc7"}
    assert set(result["metrics"]) <= reported_metrics(cfg)  # what bench checks its columns by
    assert (tmp_path / "result.json").is_file() and (tmp_path / "checkpoint.pt").is_file()
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert ("recon_l2" in rows[0]) == recon
    assert (tmp_path / "reconstructions.png").is_file() == recon
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (state["aux"] is not None) == recon
    if recon:
        assert not any("lpips" in k for k in state["aux"])


def test_resume_is_exact(tmp_path, shared_data):
    full = train(toy(tmp_path / "full", data=shared_data))
    with pytest.raises(StopTraining):
        train(toy(tmp_path / "cut", "run.stop_after_epoch=1", data=shared_data))
    resumed = train(toy(tmp_path / "cut", "run.resume=true", data=shared_data))
    assert resumed["metrics"] == full["metrics"]
    assert resumed["history"] == full["history"]
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for key in ("backbone", "method", "aux"):
        for name, value in a[key].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b[key][name]), (key, name)


def test_resume_refuses_other_config_and_corrupt_file(tmp_path, shared_data):
    with pytest.raises(StopTraining):
        train(toy(tmp_path, "run.stop_after_epoch=1", data=shared_data))
    with pytest.raises(CheckpointError, match=r"differing keys: \['recon.weight', 'train.lr'\]"):
        train(toy(tmp_path, "run.resume=true", "train.lr=0.1", "recon.weight=0.5",
                  data=shared_data))
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-4] + b"XXXX")
    with pytest.raises(CheckpointError, match="corrupt"):
        train(toy(tmp_path, "run.resume=true", data=shared_data))


def test_non_finite_stops_with_epoch_and_step(tmp_path, shared_data):
    with pytest.raises(NonFiniteLossError, match=r"method_loss .* epoch 2, step 4"):
        train(toy(tmp_path, "method.nan_at_step=4", "data.batch_size=100", data=shared_data))
    state = load_checkpoint(tmp_path / "checkpoint.pt")  # epoch 1's checkpoint is intact
    assert state["epoch"] == 1


@pytest.mark.parametrize("overrides, match", [
    (["trian.epochs=1"], "unknown top-level section"),
    (["train.epoch=1"], r"unknown key\(s\) \['epoch'\] in section 'train'"),
    (["train.lr_schedule=linear"], "lr_schedule='linear' must be one of 'constant', 'cosine'"),
    (["recon.wieght=1"], "unknown config key"),
    (["train.epochs"], "is not key=value"),
    (["method.name=null"], "method.name is required"),
    (["method.name=[a,b]"], r"method \['a', 'b'\] is unknown; methods: deepcluster"),
])
def test_config_errors(overrides, match):
    with pytest.raises((RunConfigError, ValueError), match=match):
        load_run_config(TOY, overrides)


def test_unknown_method_lists_valid():
    with pytest.raises(ValueError, match="methods: deepcluster, sela, aet, simclr"):
        load_run_config(TOY, ["method.name=moco"])


def test_recipe_options_sela_augmented_labels_aet_pooled_conv_and_augment_overrides(
        tmp_path, shared_data):
    """The recipe switches of the CPU-scale pilots run end to end and resume exactly."""
    sela = ["method={name: sela, hc: 2, k: 10, nopts: 3, head_schedule: all, "
            "label_pass: augmented}", "data.augment=[{preset: simclr, scale: [0.2, 1.0]}]",
            "recon=null"]
    full = train(toy(tmp_path / "full", *sela, data=shared_data))
    assert full["history"][0]["sk_updates"] >= 1
    with pytest.raises(StopTraining):
        train(toy(tmp_path / "cut", *sela, "run.stop_after_epoch=1", data=shared_data))
    resumed = train(toy(tmp_path / "cut", *sela, "run.resume=true", data=shared_data))
    assert resumed["metrics"] == full["metrics"]
    aet = train(toy(tmp_path / "aet", "method={name: aet, feature_layer: conv5}",
                    data=shared_data))
    assert aet["metrics"]["knn_conv5"] > 0
    with pytest.raises(ValueError, match="needs a 'preset' key"):
        train(toy(tmp_path / "bad", "data.augment=[{scale: [0.2, 1.0]}]", data=shared_data))
    with pytest.raises(ValueError, match="feature_layer='conv9' is not a module"):
        train(toy(tmp_path / "bad2", "method={name: aet, feature_layer: conv9}",
                  data=shared_data))


def test_deepcluster_reassign_clusters_on_schedule_and_resumes_exactly(tmp_path,
                                                                              shared_data):
    dc = ["method={name: deepcluster, k: 10, pca_dim: 16, pca_epsilon: 0.001, "
          "reassign: 2, top_layer_momentum: true}", "train.epochs=3", "recon=null"]
    full = train(toy(tmp_path / "full", *dc, data=shared_data))
    assert ["kmeans_loss" in row for row in full["history"]] == [True, False, True]
    with pytest.raises(StopTraining):
        train(toy(tmp_path / "cut", *dc, "run.stop_after_epoch=2", data=shared_data))
    resumed = train(toy(tmp_path / "cut", *dc, "run.resume=true", data=shared_data))
    assert resumed["metrics"] == full["metrics"]


def test_read_scalars_reads_once_and_gives_what_float_gives(monkeypatch):
    from adapters.engine import read_scalars

    values = {"a": torch.tensor(0.1), "b": 3, "c": torch.tensor([2.5], dtype=torch.bfloat16),
              "d": torch.tensor(1 / 3, dtype=torch.float64), "e": torch.tensor(7),
              "f": torch.tensor(float("nan"), dtype=torch.float16), "g": 0.25}
    copies = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: copies.append(t.shape) or real(t))
    read = read_scalars(values)
    assert list(read) == list(values) and copies == [torch.Size([5])]  # one read, 5 tensors
    for name, value in values.items():
        want = float(value)
        assert read[name] == want or (math.isnan(want) and math.isnan(read[name]))
        assert type(read[name]) is float
    with pytest.raises(RuntimeError):  # as float() refuses a tensor of two values
        read_scalars({"x": torch.zeros(2)})
