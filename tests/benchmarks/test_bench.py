"""bench / ablate end to end on a tiny config; the table renderer on fixed inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from adapters.config import RunConfigError, load_run_config
from benchmarks import ablate, bench, matrix, schedule
from benchmarks.matrix import dotted
from tests.adapters.tiny import tiny_config
from tests.benchmarks.fakes import fake_train
from tests.helpers import REPO

TOY_RUN = {
    "method": {"name": "rotation"},  # tests/adapters/toy_method.py, registered per test
    "backbone": {"name": "alexnet_cifar", "width": 0.25},
    "data": {"dataset": "cifar10", "per_class": 10, "test_per_class": 5, "batch_size": 50},
    "train": {"epochs": 1, "lr": 0.05},
    "eval": {"knn": {"layers": ["conv5"], "k": 10, "temperature": 0.1}},
    "run": {"progress": False},
}


@pytest.fixture
def toy_config(tmp_path, monkeypatch, shared_data, toy_method):
    monkeypatch.chdir(tmp_path)  # anything written outside the results folder lands here
    monkeypatch.setenv("RECON_AUX_DATA", str(shared_data))
    path = tmp_path / "toy_run.yaml"
    path.write_text(yaml.safe_dump(TOY_RUN))
    return path


@pytest.mark.slow
def test_bench_end_to_end_and_resume(tmp_path, toy_config, monkeypatch):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "title": "tiny", "seeds": [0], "metrics": ["knn_conv5"], "recon": {"weight": 1.0},
        "methods": {"toy": {"config": str(toy_config), "set": {"train.epochs": 1}}},
        "references": {"toy": ["random-init", "supervised", "recon-only"]},
    }))
    cfg = bench.load_bench_config(cfg_file)
    out = bench.run_bench(cfg, out=tmp_path / "results", progress=False)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(r["id"] for r in runs) == sorted([
        "random-init-alexnet_cifar-seed0", "supervised-alexnet_cifar-seed0",
        "recon-only-alexnet_cifar-seed0", "toy-base-seed0", "toy-recon-seed0"])
    for r in runs:
        assert {"method", "recon", "seed", "metrics", "config", "wall_s", "machine"} <= set(r)
    by_id = {r["id"]: r for r in runs}
    # a method's own `set` must not override what defines a reference row
    assert by_id["random-init-alexnet_cifar-seed0"]["config"]["train"]["epochs"] == 0
    assert by_id["supervised-alexnet_cifar-seed0"]["config"]["method"]["name"] == "supervised"
    assert by_id["toy-base-seed0"]["recon"] is False
    readme = (out / "README.md").read_text()
    assert "random-init (alexnet_cifar)" in readme and "toy +recon" in readme
    assert "transferred supervision" in readme and "Table 1" in readme
    assert (out / "curves.png").is_file()
    assert (out / "pictures" / "toy-recon-seed0.png").is_file()
    # reconstructions show the data set's images: named in the README, never embedded, and
    # ignored by git (plots are embedded)
    assert "![curves.png](curves.png)" in readme and "![pictures/" not in readme
    assert "`pictures/toy-recon-seed0.png`" in readme and "not committed" in readme
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "benchmarks/results/*/pictures/" in ignored
    # every output of the matrix is under its results folder, the runs' checkpoints too
    assert (out / "runs" / "toy-recon-seed0" / "checkpoint.pt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results", "tiny.yaml", "toy_run.yaml"]

    def boom(cfg):  # a resumed matrix must not train finished runs again
        raise AssertionError("re-ran a finished run")

    monkeypatch.setattr(schedule, "train", boom)
    bench.run_bench(cfg, out=tmp_path / "results", progress=False)

    # a changed config is never served from the old results: an error naming the keys, or,
    # with replace_changed, the old run moves to "superseded" and runs again
    changed = bench.load_bench_config(
        cfg_file, ["methods.toy.set={train.epochs: 1, train.lr: 0.01}"])
    with pytest.raises(bench.RunConfigError, match="toy-base-seed0: train.lr"):
        bench.run_bench(changed, out=tmp_path / "results", progress=False)
    trained = []
    monkeypatch.setattr(schedule, "train", lambda c: trained.append(c) or dict(
        runs[0], metrics={"knn_conv5": 1.0}, config=c.to_dict(), train_images=1,
        test_images=1, tapped="conv5.0"))
    bench.run_bench(changed, out=tmp_path / "results", progress=False, replace_changed=True)
    saved = json.loads((out / "results.json").read_text())
    # the references are built from the method's config, so all five rows changed
    assert len(trained) == 5 and all(c.train.lr == 0.01 for c in trained)
    assert sorted(r["id"] for r in saved["superseded"]) == sorted(r["id"] for r in runs)
    assert all(r["superseded_because"] == ["train.lr"] for r in saved["superseded"])
    assert len(saved["runs"]) == 5


@pytest.mark.slow
def test_ablate_end_to_end(tmp_path, toy_config):
    cfg_file = tmp_path / "abl.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "title": "tiny ablation", "seeds": [0], "metrics": ["knn_conv5"],
        "method": {"config": str(toy_config)},
        "recon": {"weight": 1.0, "l2_weight": 1.0, "lpips_weight": 1.0},
        "axes": {"weight": [0, 1.0], "mix": ["l2", "lpips", "l2+lpips"],
                 "layer": [["conv4.0", "conv5.0"]],  # the multi-level head
                 "resize_to": [None],  # the default point again (resize_to: None is default)
                 "lpips_fraction": [0.5],  # a cost knob
                 "set": [{"resize_to": 64, "lpips_crop": 36}]},  # two keys (dumped sorted)
        "references": ["random-init", "recon-only"],
    }))
    out = ablate.run_ablate(ablate.load_ablate_config(cfg_file), out=tmp_path / "abl",
                            progress=False)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 9  # weight=1 and mix=l2+lpips are the same run; 2 references
    assert {r["id"] for r in runs if r["reference"]} == {
        "random-init-alexnet_cifar-seed0", "recon-only-alexnet_cifar-seed0"}
    multi = next(r for r in runs if r["id"] == "layer=conv4.0+conv5.0-seed0")
    assert multi["config"]["recon"]["layer"] == ["conv4.0", "conv5.0"]
    half = next(r for r in runs if r["id"] == "lpips_fraction=0.5-seed0")
    assert half["config"]["recon"]["lpips_fraction"] == 0.5
    both = next(r for r in runs if r["id"] == "set=lpips_crop=36+resize_to=64-seed0")
    assert (both["config"]["recon"]["resize_to"], both["config"]["recon"]["lpips_crop"]) == (64, 36)
    assert (out / "figure2.png").is_file() and (out / "metric_vs_weight.png").is_file()
    text = (out / "README.md").read_text()
    assert "### weight" in text and "mix=lpips" in text
    # the main table: references, the base method (weight 0) and the default +recon point only
    main = text.split("## Results")[1].split("Rows:")[0]
    by_id = {r["id"]: r for r in runs}
    default = by_id["mix=l2+lpips-seed0"]  # safe_dump sorts the axes: mix comes before weight
    method, plus = default["method"], default["metrics"]["knn_conv5"]
    base = by_id["weight=0-seed0"]["metrics"]["knn_conv5"]
    rows = [line for line in main.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0] for row in rows] == [
        "| random-init (alexnet_cifar)", "| recon-only (alexnet_cifar)", f"| {method}",
        f"| {method} +recon", f"| {method}: base − random-init (paired)",
        f"| {method}: +recon − base (paired)", f"| {method}: +recon − recon-only (paired)"]
    assert rows[2] == f"| {method} | {base:.1f} (n=1) |"
    assert rows[3] == f"| {method} +recon | {plus:.1f} (n=1) |"
    # every axis row holds exactly its own runs (one seed here), resize_to=None too
    axis_rows = [line for line in text.split("## Ablation")[1].splitlines()
                 if line.startswith("| ") and not line.startswith("| setting")]
    assert len(axis_rows) == 9 and all(line.endswith(" | 1 |") for line in axis_rows), axis_rows
    assert any(line.startswith("| resize_to=None |") for line in axis_rows)
    assert any(line.startswith("| layer=conv4.0+conv5.0 |") for line in axis_rows)
    assert any(line.startswith("| set=lpips_crop=36+resize_to=64 |") for line in axis_rows)
    # axis rows carry the paired differences to the base method and to recon-only
    only = by_id["recon-only-alexnet_cifar-seed0"]["metrics"]["knn_conv5"]
    lpips_row = next(line for line in text.splitlines() if line.startswith("| mix=lpips |"))
    lpips = by_id["mix=lpips-seed0"]["metrics"]["knn_conv5"]
    assert lpips_row == (f"| mix=lpips | {lpips:.1f} | {lpips - base:+.1f} | {lpips - only:+.1f}"
                         " | 1 |")


def test_an_axis_value_equal_to_the_default_is_the_default_point(tmp_path, monkeypatch,
                                                                  no_training):
    """A grid of one knob, with no weight axis: the point whose value is the default
    (head_out_scale=2) is the default +recon point of the main table and its verdict."""
    written = {}
    monkeypatch.setattr(ablate, "write_report",
                        lambda out, cfg, table, **k: written.update(table=table))
    cfg_file = tmp_path / "abl.yaml"
    run = tmp_path / "simclr.yaml"  # a config names run configs in its own folder
    run.write_text((REPO / "benchmarks" / "configs" / "smoke" / "simclr.yaml").read_text())
    cfg_file.write_text(yaml.safe_dump({
        "title": "one knob", "seeds": [0], "metrics": ["knn_pool"],
        "method": {"config": "simclr.yaml"},
        "recon": {"weight": 1.0}, "axes": {"head_out_scale": [2, 4]}}))
    ablate.run_ablate(ablate.load_ablate_config(cfg_file), out=tmp_path / "abl", progress=False)
    assert [r["id"] for r in written["table"]] == ["head_out_scale=2-seed0"]


def test_second_reference_on_one_backbone_gets_its_own_row(tmp_path, monkeypatch, no_training):
    # AET and DeepCluster share the backbone; AET's random-init row carries AET's config, so it
    # must be its own run, not a silent duplicate of DeepCluster's.
    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "cifar10-cpu.yaml",
                                  ["seeds=[0]", "references.aet=[random-init]"])
    seen = []
    monkeypatch.setattr(schedule, "train", lambda c: seen.append(c) or fake_train(c))
    bench.run_bench(cfg, out=tmp_path, progress=False)
    ids = [r["id"] for r in json.loads((tmp_path / "results.json").read_text())["runs"]]
    assert "random-init-alexnet_cifar-seed0" in ids
    assert "random-init-alexnet_cifar-aet-seed0" in ids
    aet_ref = next(c for c in seen if c.method.name == "aet" and c.train.epochs == 0)
    assert aet_ref.eval.nonlinear.layer == "conv3"


def test_override_below_common_sets_one_dotted_key(tmp_path):
    # common and a method's set hold dotted run-config keys: common.train.epochs=2 must set
    # common's train.epochs, not add a train section that would replace the run's train block
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(TOY_RUN))
    cfg_file = tmp_path / "b.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "seeds": [0, 1], "common": {"train.epochs": 20, "train.lr_schedule": "cosine"},
        "methods": {"toy": {"config": "run.yaml", "set": {"train.lr": 0.05}}},
    }))
    cfg = bench.load_bench_config(cfg_file, ["seeds=[0]", "common.train.epochs=2",
                                             "methods.toy.set.train.lr=0.1"])
    assert cfg.seeds == (0,)
    assert cfg.common == {"train.epochs": 2, "train.lr_schedule": "cosine"}
    assert cfg.methods["toy"].set == {"train.lr": 0.1}
    cfg = bench.load_bench_config(cfg_file, ["common=null", "common.data.per_class=5"])
    assert cfg.common == {"data.per_class": 5}
    with pytest.raises(RunConfigError, match="not valid YAML"):
        bench.load_bench_config(cfg_file, ["common.train.epochs=[2"])


def _one_finished_sela_run(tmp_path, monkeypatch):
    """cifar10-cpu, seed 0, with results.json holding one finished SeLa base run and no
    training allowed; returns (the bench config, that run's config)."""
    monkeypatch.chdir(tmp_path)
    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "cifar10-cpu.yaml",
                                  ["seeds=[0]"])
    monkeypatch.setattr(schedule, "train", lambda c: pytest.fail("report_only trained a run"))
    rc = cfg.methods["sela"].run_config([*dotted(cfg.common), "train.seed=0"], cfg.name,
                                        ["recon=null"])
    done = {"id": "sela-base-seed0", "method": "sela", "recon": False, "seed": 0,
            "reference": None, "metrics": {"knn_conv5": 40.0}, "config": rc.to_dict(),
            "wall_s": 1.0, "machine": "m", "history": [], "train_images": 1, "test_images": 1}
    (tmp_path / "results.json").write_text(json.dumps({"runs": [done]}))
    return cfg, rc


def test_report_only_marks_a_partial_matrix(tmp_path, monkeypatch):
    cfg, _ = _one_finished_sela_run(tmp_path, monkeypatch)
    out = bench.run_bench(cfg, out=tmp_path, progress=False, report_only=True)
    text = (out / "README.md").read_text()
    assert text.startswith("# PARTIAL: ") and "1 of 11 planned runs finished" in text
    assert "deepcluster-base-seed0" in text and "| sela |" in text


def test_runs_recorded_without_evaluation_details_take_them_from_their_folder(tmp_path,
                                                                              monkeypatch):
    cfg, rc = _one_finished_sela_run(tmp_path, monkeypatch)
    details = {"bn_recalibration": {"bn_layers": 7, "images": 10000}}
    folder = tmp_path / "runs" / "sela-base-seed0"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"config": rc.to_dict(),
                                                    "evaluation": details}))
    out = bench.run_bench(cfg, out=tmp_path, progress=False, report_only=True)
    saved = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert saved["evaluation"] == details
    assert "recalibrated on 10000 clean training images" in (out / "README.md").read_text()


def test_supersede_unplanned_moves_rows_the_config_dropped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "cifar10-cpu.yaml",
                                  ["seeds=[0]"])
    monkeypatch.setattr(schedule, "train", lambda c: pytest.fail("report_only trained a run"))
    old = {"id": "random-init-nin-seed0", "method": "random-init", "recon": False, "seed": 0,
           "reference": "random-init (nin)", "metrics": {"knn_conv2": 31.3}, "config": {},
           "wall_s": 1.0, "machine": "m", "history": [], "train_images": 1, "test_images": 1}
    (tmp_path / "results.json").write_text(json.dumps({"runs": [old]}))
    bench.run_bench(cfg, out=tmp_path, progress=False, report_only=True)  # kept without the flag
    assert [r["id"] for r in json.loads((tmp_path / "results.json").read_text())["runs"]] == [
        "random-init-nin-seed0"]
    bench.run_bench(cfg, out=tmp_path, progress=False, report_only=True,
                    supersede_unplanned=True)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"] == []
    assert [(r["id"], r["superseded_because"]) for r in saved["superseded"]] == [
        ("random-init-nin-seed0", ["not planned by this config"])]


@pytest.fixture
def no_training(tmp_path, monkeypatch):
    """Matrices plan and record runs here, but nothing trains, loads data or draws plots."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(schedule, "train", fake_train)
    monkeypatch.setattr(matrix, "check_run", lambda c, d=None: None)  # no data needed
    monkeypatch.setattr(bench, "write_report", lambda *a, **k: None)


def test_a_result_left_by_another_config_is_a_changed_run(tmp_path, monkeypatch, no_training):
    """A run folder holding a result and no checkpoint (a run with no epochs killed before it
    was recorded) whose config is not the planned one is judged like a checkpoint of another
    config: an error naming the run, or with replace_changed a fresh start over it."""
    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "simclr-cpu.yaml",
                                  ["seeds=[0]"])
    out = tmp_path / "results"
    bench.run_bench(cfg, out=out, progress=False)
    saved = json.loads((out / "results.json").read_text())
    (lost,) = [r for r in saved["runs"] if r["id"].startswith("random-init")]
    saved["runs"].remove(lost)
    (out / "results.json").write_text(json.dumps(saved))  # as if killed before it was recorded
    folder = out / "runs" / lost["id"]
    folder.mkdir(parents=True)
    lost["config"]["train"]["lr"] = 123.0  # another config's result
    (folder / "result.json").write_text(json.dumps(lost))
    with pytest.raises(RunConfigError, match="random-init-resnet18_cifar-seed0: train.lr\\)"
                                             ".*--replace-changed"):
        bench.run_bench(cfg, out=out, progress=False)
    trained = []
    monkeypatch.setattr(schedule, "train", lambda c: trained.append(c) or fake_train(c))
    bench.run_bench(cfg, out=out, progress=False, replace_changed=True)
    assert len(trained) == 1 and trained[0].run.out_dir == str(folder)
    assert trained[0].run.overwrite and not trained[0].run.resume


def test_the_readme_names_the_pictures_from_the_runs_not_from_the_folder(tmp_path,
                                                                         no_training):
    """A fresh clone holds no pictures (git-ignored): its README, made again with
    --report-only, must be the one committed, so the pictures are named from the runs."""
    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "simclr-cpu.yaml",
                                  ["seeds=[0]"])
    out = tmp_path / "results"
    bench.run_bench(cfg, out=out, progress=False)  # fake runs: no picture is written
    runs = json.loads((out / "results.json").read_text())["runs"]
    matrix.write_report(out, cfg, runs)
    readme = (out / "README.md").read_text()
    assert not (out / "pictures").exists()
    assert ("(`pictures/recon-only-resnet18_cifar-seed0.png`, `pictures/simclr-recon-seed0.png`; "
            "2 PNG files), are written into this results folder when the matrix runs") in readme


def test_merge_takes_runs_of_a_parallel_seed(tmp_path, monkeypatch, no_training):
    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "simclr-cpu.yaml",
                                  ["seeds=[0, 1]"])
    side = tmp_path / "seed1"
    bench.run_bench(bench.load_bench_config(REPO / "benchmarks" / "configs" / "simclr-cpu.yaml",
                                            ["seeds=[1]"]), out=side, progress=False)
    monkeypatch.setattr(schedule, "train", lambda c: fake_train(c) if c.train.seed == 0
                        else pytest.fail("re-trained a merged run"))
    out = bench.run_bench(cfg, out=tmp_path / "main", progress=False, merge=side)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 8 and sum(r["seed"] == 1 for r in runs) == 4


def test_merge_leaves_a_run_of_the_same_id_made_with_another_config(tmp_path, monkeypatch,
                                                                     capsys, no_training):
    """simclr-cpu-layer shares simclr-cpu's run ids: merging takes the base and reference rows
    and leaves simclr-cpu's "+recon" rows (another tap), which the layer matrix trains itself."""
    configs = REPO / "benchmarks" / "configs"
    side = tmp_path / "simclr-cpu"
    bench.run_bench(bench.load_bench_config(configs / "simclr-cpu.yaml", ["seeds=[0]"]),
                    out=side, progress=False)
    trained = []
    monkeypatch.setattr(schedule, "train", lambda c: trained.append(c) or fake_train(c))
    out = bench.run_bench(bench.load_bench_config(configs / "simclr-cpu-layer.yaml",
                                                  ["seeds=[0]"]),
                          out=tmp_path / "layer", progress=False, merge=side)
    assert "left 1 made with another config (simclr-recon-seed0)" in capsys.readouterr().out
    assert [c.recon.layer for c in trained] == ["layer4.1.conv2"]  # only its own +recon row
    runs = {r["id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert set(runs) == {"simclr-base-seed0", "simclr-recon-seed0",
                         "random-init-resnet18_cifar-seed0"}
    assert runs["simclr-recon-seed0"]["config"]["recon"]["layer"] == "layer4.1.conv2"


def test_knn_protocol_reproduces_the_runs_own_knn(tmp_path, toy_config, monkeypatch, capsys):
    """benchmarks/studies/knn_protocol.py re-evaluates a finished run from its checkpoint: its
    conv5/avg column must equal the knn_conv5 the run reported (same bank, same k, the same
    BatchNorm recalibration), and its random-init row the knn_conv5 of a 0-epoch run of the
    same seed (the fair reference, not default BatchNorm statistics)."""
    import sys

    from adapters.config import load_run_config
    from adapters.engine import train
    from benchmarks.studies import knn_protocol

    cfg = load_run_config(toy_config, ["run.out_dir=runs/toy-base", "recon=null"])
    result = train(cfg)
    untrained = train(load_run_config(toy_config, ["run.out_dir=runs/toy-init", "recon=null",
                                                   "train.epochs=0"]))
    monkeypatch.setattr(sys, "argv", ["knn_protocol.py", "runs/toy-base", "--k", "10"])
    knn_protocol.main()
    out = capsys.readouterr().out
    assert "BatchNorm statistics recalibrated on 10000 clean training images" in out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| run | conv5/avg | conv5/max | conv5/flatten")
    init = lines[1].split(" | ")  # (the |---| line does not start with "| ")
    assert init[0] == "| random-init"
    assert init[1] == f"{untrained['metrics']['knn_conv5']:.1f}"
    row = lines[2].split(" | ")
    assert row[0] == "| toy-base"
    assert row[1].split(" ")[0] == f"{result['metrics']['knn_conv5']:.1f}"


def test_a_config_pinning_the_layer_a_default_run_tapped_keeps_that_run(tmp_path, monkeypatch,
                                                                        no_training):
    """A run recorded with recon.layer unset that tapped layer4 is the run of a config naming
    layer4 (simclr-cpu pinned its tap when the ResNet default changed); naming another layer
    is a changed config."""
    path = REPO / "benchmarks" / "configs" / "simclr-cpu.yaml"
    out = bench.run_bench(bench.load_bench_config(path, ["seeds=[0]", "recon.layer=null"]),
                          out=tmp_path / "m", progress=False)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {r["id"]: r["tapped"] for r in runs} == {
        "random-init-resnet18_cifar-seed0": None, "recon-only-resnet18_cifar-seed0": "layer4",
        "simclr-base-seed0": None, "simclr-recon-seed0": "layer4"}
    monkeypatch.setattr(schedule, "train", lambda c: pytest.fail(f"re-trained {c.run.out_dir}"))
    bench.run_bench(bench.load_bench_config(path, ["seeds=[0]", "recon.layer=layer4"]),
                    out=out, progress=False)
    with pytest.raises(RunConfigError, match=r"simclr-recon-seed0: recon\.layer"):
        bench.run_bench(bench.load_bench_config(path, ["seeds=[0]", "recon.layer=layer3"]),
                        out=out, progress=False)


def test_runs_recorded_without_the_tapped_layer_take_it_from_their_checkpoint(tmp_path,
                                                                             tiny_tree):
    m = matrix.Matrix("t", tmp_path / "m", progress=False)
    result = schedule.train(load_run_config(tiny_config(tiny_tree, m.run_root / "r"), []))
    (m.run_root / "r" / "result.json").unlink()  # a run folder older than "tapped"
    m.runs = [{"id": "r", "config": result["config"]},  # as recorded before "tapped"
              {"id": "gone", "config": result["config"]}]  # its folder deleted: unknown
    m._backfill_tapped()
    assert m.runs[0]["tapped"] == "conv5.0" and "tapped" not in m.runs[1]
    other = load_run_config(tiny_config(tiny_tree, m.run_root / "r", train={"epochs": 1}), [])
    m.runs = [{"id": "r", "config": other.to_dict()}]  # the folder holds another config's run
    m._backfill_tapped()
    assert "tapped" not in m.runs[0]


def clocked_runs(monkeypatch, seconds=lambda c: 100.0) -> None:
    """Each run trained in the bench process takes ``seconds(its config)`` of the matrix's
    clock (faked), and records that as its ``wall_s``."""
    clock = [0.0]
    monkeypatch.setattr(schedule.time, "perf_counter", lambda: clock[0])

    def clocked(c):
        clock[0] += seconds(c)
        return {**fake_train(c), "wall_s": seconds(c)}

    monkeypatch.setattr(schedule, "train", clocked)


def test_time_budget_starts_only_the_runs_that_fit_and_the_next_call_goes_on(
        tmp_path, monkeypatch, capsys, no_training):
    clocked_runs(monkeypatch)
    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "simclr-cpu.yaml",
                                  ["seeds=[0]"])
    out = tmp_path / "results"
    bench.run_bench(cfg, out=out, progress=False, time_budget=250)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 2  # 0 + 100 and 100 + 100 fit in 250 s; 200 + 100 does not
    assert ("time budget: 3.3 of 4.2 min used and no run left fits: the shortest would take "
            "1.7 (the longest run so far took 1.7 min); 2 run(s) left" in capsys.readouterr().out)
    bench.run_bench(cfg, out=out, progress=False, time_budget=250)
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 4
    with pytest.raises(RunConfigError, match="time budget 0: give a positive number of seconds"):
        bench.run_bench(cfg, out=tmp_path / "other", progress=False, time_budget=0)


def test_time_budget_expects_a_run_to_take_what_its_row_took_with_another_seed(
        tmp_path, monkeypatch, capsys, no_training):
    """A +recon run is not as short as the base run before it: the budget takes a row's time
    from its recorded seeds, where there are any, not from the longest run of this call; a
    run that does not fit is passed over for a later one that does, and with a record even
    the first run must fit."""
    # runs with the objective take 300 s, the others 100 s
    clocked_runs(monkeypatch, lambda c: 100.0 if c.recon is None else 300.0)
    path = REPO / "benchmarks" / "configs" / "simclr-cpu.yaml"
    out = tmp_path / "results"

    def run_seed(seed, budget):
        bench.run_bench(bench.load_bench_config(path, [f"seeds=[{seed}]"]), out=out,
                        progress=False, time_budget=budget)
        runs = json.loads((out / "results.json").read_text())["runs"]
        return [r["id"].removeprefix("simclr-").removesuffix(f"-seed{seed}")
                for r in runs if r["seed"] == seed]

    assert run_seed(0, None) == ["random-init-resnet18_cifar", "recon-only-resnet18_cifar",
                                 "base", "recon"]
    capsys.readouterr()
    # seed 1 in 250 s: random init (100 s with seed 0); recon-only would fit by the longest
    # run of this call (100 + 100) but not by its row's 300 s; the base run after it fits
    assert run_seed(1, 250) == ["random-init-resnet18_cifar", "base"]
    text = capsys.readouterr().out
    assert ("time budget: simclr-base-seed1 starts (expected to take 1.7 min, simclr-base took "
            "1.7 min with another seed); the 1 run(s) before it would end past the budget" in text)
    assert ("3.3 of 4.2 min used and no run left fits: the shortest would take 5.0 "
            "(recon-only-resnet18_cifar took 5.0 min with another seed); 2 run(s) left" in text)
    assert run_seed(2, 50) == []  # every row has a record, and none fits
    assert schedule.row_of("lpips_fraction=0.25-seed12") == "lpips_fraction=0.25"


def test_time_budget_lengthens_its_estimates_when_this_calls_runs_are_slower(
        tmp_path, monkeypatch, capsys, no_training):
    """Records made on a faster host, or with fewer runs sharing a GPU, mislead: once a run of
    this call has taken 1.5x its row's record, every later estimate is 1.5x its record."""
    clocked_runs(monkeypatch, lambda c: 100.0 if c.train.seed == 0 else 150.0)
    path = REPO / "benchmarks" / "configs" / "simclr-cpu.yaml"
    out = tmp_path / "results"
    bench.run_bench(bench.load_bench_config(path, ["seeds=[0]"]), out=out, progress=False)
    capsys.readouterr()
    # seed 1 in 260 s: the first run ends at 150 s; the next would be expected to take its
    # record's 100 s (and end at 250 s, but take 150 s), and is expected to take 150 s instead
    bench.run_bench(bench.load_bench_config(path, ["seeds=[1]"]), out=out, progress=False,
                    time_budget=260)
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["id"] for r in runs if r["seed"] == 1] == ["random-init-resnet18_cifar-seed1"]
    assert ("2.5 of 4.3 min used and no run left fits: the shortest would take 2.5 "
            "(recon-only-resnet18_cifar took 1.7 min with another seed, x1.50 as this call's runs "
            "are slower than their records)" in capsys.readouterr().out)


def test_pieces_run_elsewhere_merge_into_the_report_without_training_here(tmp_path, monkeypatch,
                                                                          no_training):
    """A matrix run in pieces on a lent machine (--time-budget, --out-dir there), merged here
    with --merge --report-only: the finished runs are taken and nothing trains here."""
    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "simclr-cpu.yaml",
                                  ["seeds=[0]"])
    piece = tmp_path / "piece"
    bench.run_bench(cfg, out=piece, progress=False, time_budget=1e-9)  # the first run only
    assert len(json.loads((piece / "results.json").read_text())["runs"]) == 1
    monkeypatch.setattr(schedule, "train", lambda c: pytest.fail("trained here"))
    out = bench.run_bench(cfg, out=tmp_path / "main", progress=False, merge=piece,
                          report_only=True)
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 1


@pytest.mark.slow
def test_parallel_runs_give_the_sequential_results(tmp_path, toy_config):
    """--jobs 2: each run trains in a spawned process of its own (the toy method, registered
    here at run time, reaches it), with its output in its run folder; the results are those of
    the runs trained one after another."""
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "title": "tiny", "seeds": [0], "metrics": ["knn_conv5"], "recon": {"weight": 1.0},
        "methods": {"toy": {"config": str(toy_config)}},
        "references": {"toy": ["random-init"]}}))
    cfg = bench.load_bench_config(cfg_file)
    one = bench.run_bench(cfg, out=tmp_path / "one", progress=False)
    two = bench.run_bench(cfg, out=tmp_path / "two", progress=False, jobs=2)

    def by_id(out):
        return {r["id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}

    seq, par = by_id(one), by_id(two)
    assert sorted(par) == sorted(seq) == [
        "random-init-alexnet_cifar-seed0", "toy-base-seed0", "toy-recon-seed0"]
    for run_id, r in seq.items():
        assert par[run_id]["metrics"] == r["metrics"]
        assert par[run_id]["history"] == r["history"]
        assert "epoch 1" in (two / "runs" / run_id / "console.txt").read_text() \
            or r["config"]["train"]["epochs"] == 0
    assert (two / "pictures" / "toy-recon-seed0.png").is_file()


def _threads_for_processes(monkeypatch, train):
    """Run the parallel path's workers as threads with ``train`` in place of a run."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(schedule, "ProcessPoolExecutor",
                        lambda jobs, **_: ThreadPoolExecutor(jobs))
    monkeypatch.setattr(schedule, "_train_in_process", lambda c, console, threads, method: train(c))


def test_parallel_runs_respect_the_time_budget_after_the_first_ones(tmp_path, monkeypatch,
                                                                    capsys, no_training):
    def a_third_of_a_second(c):
        time.sleep(0.3)
        return fake_train(c)

    _threads_for_processes(monkeypatch, a_third_of_a_second)
    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "simclr-cpu.yaml",
                                  ["seeds=[0]"])  # 4 runs
    out = tmp_path / "results"
    bench.run_bench(cfg, out=out, progress=False, time_budget=0.5, jobs=2)
    # the first two start at once; when one ends, 0.3 s used + 0.3 s longest > 0.5 s
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 2
    text = capsys.readouterr().out
    assert "run 2/4 started" in text and "2 run(s) left" in text and "run 3/4" not in text
    bench.run_bench(cfg, out=out, progress=False, jobs=2)  # the same command goes on
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 4


def test_the_last_run_left_trains_as_its_parallel_siblings_did(tmp_path, monkeypatch,
                                                              no_training):
    """With --jobs, one run left also trains in a process of its own (its thread count, which
    changes a CPU run's last bits, is the one its siblings had)."""
    clocked_runs(monkeypatch)
    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "simclr-cpu.yaml",
                                  ["seeds=[0]"])  # 4 runs
    out = tmp_path / "results"
    bench.run_bench(cfg, out=out, progress=False, time_budget=350)  # 3 fit, 1 is left
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 3
    in_workers = []
    _threads_for_processes(monkeypatch, lambda c: in_workers.append(c) or fake_train(c))
    monkeypatch.setattr(schedule, "train", lambda c: pytest.fail("trained in the bench process"))
    bench.run_bench(cfg, out=out, progress=False, jobs=2)
    assert len(in_workers) == 1 and len(json.loads((out / "results.json").read_text())["runs"]) == 4


@pytest.mark.slow
def test_a_worker_that_dies_abruptly_loses_only_its_own_run(tmp_path, monkeypatch, no_training):
    """A worker killed outright (a segfault, the OOM killer) ends its own run only: the runs
    under way beside it finish and are recorded, and the error names the lost run."""
    from tests.benchmarks.fakes import crash_or_fake

    monkeypatch.setattr(schedule, "_train_in_process", crash_or_fake)
    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "simclr-cpu.yaml",
                                  ["seeds=[0]"])  # 4 runs, random init first
    out = tmp_path / "results"
    with pytest.raises(Exception, match="terminated abruptly") as info:
        bench.run_bench(cfg, out=out, progress=False, jobs=3)
    assert "random-init-resnet18_cifar-seed0" in "".join(getattr(info.value, "__notes__", []))
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(r["id"] for r in runs) == ["recon-only-resnet18_cifar-seed0",
                                             "simclr-base-seed0"]


def test_a_failed_parallel_run_stops_new_starts_and_keeps_the_others(tmp_path, monkeypatch,
                                                                     no_training):
    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "simclr-cpu.yaml",
                                  ["seeds=[0]"])
    calls = []

    def fail_first(c):
        calls.append(c)
        if len(calls) == 1:
            raise ValueError("diverged")
        time.sleep(0.2)
        return fake_train(c)

    _threads_for_processes(monkeypatch, fail_first)
    out = tmp_path / "results"
    with pytest.raises(ValueError, match="diverged") as info:
        bench.run_bench(cfg, out=out, progress=False, jobs=2)
    assert any("console.txt" in note for note in info.value.__notes__)
    assert len(calls) == 2  # no run started after the failure
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 1


def test_a_parallel_run_stopped_by_its_config_says_how_the_matrix_continues(
        tmp_path, monkeypatch, no_training):
    import pickle

    from adapters.engine import StopTraining

    crossed = pickle.loads(pickle.dumps(StopTraining(1)))  # as from a worker process
    assert (crossed.epoch, crossed.checkpoint, str(crossed)) == (
        1, True, "stopped after epoch 1 (run.stop_after_epoch); continue with run.resume=true")
    assert pickle.loads(pickle.dumps(StopTraining(2, "x", checkpoint=False))).checkpoint is False

    def stop(c):
        raise StopTraining(1)

    _threads_for_processes(monkeypatch, stop)
    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "simclr-cpu.yaml",
                                  ["seeds=[0]"])
    with pytest.raises(StopTraining, match=r"run \S+-seed0 stopped with its checkpoint intact; "
                                           "the same command continues it"):
        bench.run_bench(cfg, out=tmp_path / "results", progress=False, jobs=2)

    def stop_without_checkpoint(c):
        raise StopTraining(1, "no checkpoint", checkpoint=False)

    _threads_for_processes(monkeypatch, stop_without_checkpoint)
    with pytest.raises(StopTraining, match=r"run \S+-seed0 stopped without a checkpoint \(run."
                                           r"save_checkpoints=false\); the same command starts "
                                           "it again from scratch"):
        bench.run_bench(cfg, out=tmp_path / "results", progress=False, jobs=2)


def test_a_setting_without_effect_is_warned_once_for_the_runs_it_concerns(tmp_path,
                                                                          no_training):
    from adapters.config import IneffectiveSettingWarning

    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "simclr-cpu.yaml",
                                  ["seeds=[0]", "common.train.lr_schedule=step"])
    with pytest.warns(IneffectiveSettingWarning) as caught:
        bench.run_bench(cfg, out=tmp_path / "results", progress=False)
    (warning,) = caught  # the untrained reference row trains nothing: not named
    assert str(warning.message).startswith("train.lr_schedule=step without train.milestones")
    assert str(warning.message).endswith("(runs recon-only-resnet18_cifar-seed0, "
                                         "simclr-base-seed0, simclr-recon-seed0).")


@pytest.mark.parametrize("jobs", [0, -1, True, 1.5])
def test_jobs_must_be_a_positive_whole_number(tmp_path, jobs):
    cfg = bench.load_bench_config(REPO / "benchmarks" / "configs" / "simclr-cpu.yaml")
    with pytest.raises(RunConfigError, match=f"jobs {jobs!r}: give a whole number"):
        bench.run_bench(cfg, out=tmp_path / "r", progress=False, jobs=jobs)
    assert not (tmp_path / "r").exists()  # refused before the results folder is made


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    from pathlib import Path

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_parallel_worker_ends_when_the_bench_process_is_killed(tmp_path):
    pidfile = tmp_path / "worker.pid"
    script = tmp_path / "bench_process.py"
    script.write_text(f"""
import multiprocessing, os, signal, time
from concurrent.futures import ProcessPoolExecutor
from benchmarks.schedule import die_with_parent

def worker(path):
    die_with_parent()
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(60)

if __name__ == "__main__":
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    pool.submit(worker, {str(pidfile)!r})
    while not os.path.exists({str(pidfile)!r}) or not open({str(pidfile)!r}).read():
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)  # as a time limit's kill -9 would
""")
    subprocess.run([sys.executable, str(script)], cwd=REPO, timeout=120,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 20
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(pid)
