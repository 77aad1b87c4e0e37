"""Bench and ablate configs cannot write outside their results folder or import anything, every
key is checked, a results folder of another config is refused, every planned run is checked
before the first trains, a killed matrix run resumes, and the ETA is never "nan"."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from adapters.config import RunConfigError, load_run_config
from adapters.engine import StopTraining
from benchmarks import ablate, bench, schedule
from benchmarks.matrix import Matrix
from benchmarks.schedule import eta_text
from tests.adapters.tiny import tiny_config
from tests.benchmarks.fakes import fake_train


@pytest.fixture
def run_yaml(tiny_tree, tmp_path):
    path = tmp_path / "configs" / "tiny_run.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(tiny_config(tiny_tree, "unused")))
    return path


def write(tmp_path, name: str, content: dict):
    path = tmp_path / "configs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(content))
    return path


BENCH = {"title": "t", "seeds": [0], "metrics": ["knn_conv5"], "recon": {"weight": 1.0},
         "methods": {"toy": {"config": "tiny_run.yaml"}}}


@pytest.mark.parametrize("change, match", [
    ({"name": "../../../../tmp/x"}, r"name='../../../../tmp/x' is not a plain name"),
    ({"name": "/tmp/x"}, "is not a plain name"),
    ({"name": ".."}, "is not a plain name"),
    ({"methods": {"/abs": {"config": "tiny_run.yaml"}}}, r"a key of methods \('/abs'\)"),
    ({"methods": {"../up": {"config": "tiny_run.yaml"}}}, "is not a plain name"),
    ({"methods": {"a/b": {"config": "tiny_run.yaml"}}}, "is not a plain name"),
])
def test_names_cannot_leave_the_results_folder(run_yaml, tmp_path, change, match):
    path = write(tmp_path, "b.yaml", {**BENCH, **change})
    with pytest.raises(RunConfigError, match=match):
        bench.load_bench_config(path)
    with pytest.raises(RunConfigError, match="is not a plain name"):
        Matrix("../escape", None, progress=False)


@pytest.mark.parametrize("axes, match", [
    ({"lpips_fraction": [1.0, 2.0]}, "lpips_fraction=2.0 is more than the whole batch"),
    ({"head_max_width": [0]}, "head_max_width=0 must be >= 1"),
    ({"lpips_crop": [8]}, "lpips_crop=8 is smaller than the 31x31 pixels LPIPS-alex needs"),
])
def test_ablate_cost_knob_values_are_checked_before_any_run(run_yaml, tmp_path, axes, match):
    cfg = ablate.load_ablate_config(write(tmp_path, "a.yaml", {
        "method": {"config": "tiny_run.yaml"}, "axes": axes}))
    with pytest.raises((RunConfigError, ValueError), match=match):
        ablate.run_ablate(cfg, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "runs").exists()


def test_ablate_names_and_axis_values_stay_plain(run_yaml, tmp_path):
    base = {"method": {"config": "tiny_run.yaml"}, "axes": {"weight": [0, 1]}}
    with pytest.raises(RunConfigError, match="is not a plain name"):
        ablate.load_ablate_config(write(tmp_path, "a.yaml", {**base, "name": "../x"}))
    cfg = ablate.load_ablate_config(write(tmp_path, "a.yaml", {
        **base, "axes": {"layer": ["../../conv5"]}}))
    with pytest.raises(RunConfigError, match=r"axes.layer value '../../conv5'"):
        ablate.run_ablate(cfg, out=tmp_path / "out", progress=False)


@pytest.mark.parametrize("change, match", [
    ({"seed": [1, 2]}, r"unknown key\(s\) \['seed'\] in bench config b.yaml; valid ones: .*seeds"),
    ({"methds": {}}, r"unknown key\(s\) \['methds'\]"),
    ({"seeds": []}, r"seeds=\[\] must be a non-empty list of distinct seeds >= 0"),
    ({"seeds": [0, 0]}, "distinct"),
    ({"seeds": [-1]}, ">= 0"),
    ({"seeds": 3}, r"seeds expects tuple\[int, ...\]"),
    ({"metrics": []}, "names no column"),
    ({"methods": {"toy": None}}, "names no method to run"),
    ({"references": {"toy": ["random_init"]}}, r"unknown reference row\(s\) \['random_init'\]; "
                                               "rows: random-init, supervised, recon-only"),
    ({"methods": {"toy": {"config": "tiny_run.yaml", "sett": {}}}},
     r"unknown key\(s\) \['sett'\] in methods.toy"),
])
def test_bench_keys_and_values_are_checked(run_yaml, tmp_path, change, match):
    with pytest.raises(RunConfigError, match=match):
        bench.load_bench_config(write(tmp_path, "b.yaml", {**BENCH, **change}))


@pytest.mark.parametrize("change, match", [
    ({"axes": {}}, "names no axis"),
    ({"axes": {"weight": []}}, "axes.weight is empty"),
    ({"axes": {"weight": [-1]}}, "must be numbers >= 0"),
    ({"axes": {"mix": ["l3"]}}, r"axes.mix: \['l3'\] not among"),
    ({"axes": {"lr": [1]}}, "unknown axis 'lr'"),
    ({"axes": {"set": [64]}}, "each value is a mapping of recon keys"),
    ({"axes": {"set": [{"weight": 2}]}}, "the weights have their own axes"),
    ({"references": ["supervized"]}, r"unknown reference row\(s\) \['supervized'\]"),
])
def test_ablate_keys_and_values_are_checked(run_yaml, tmp_path, change, match):
    base = {"method": {"config": "tiny_run.yaml"}, "axes": {"weight": [0, 1]}}
    with pytest.raises(RunConfigError, match=match):
        ablate.load_ablate_config(write(tmp_path, "a.yaml", {**base, **change}))


def test_no_config_value_imports_anything(tmp_path, monkeypatch, run_yaml):
    """A module planted on sys.path, named by every config value that names something: nothing
    imports it (methods and backbones come from their registries, data sets are names or
    paths, presets and pools are choices)."""
    marker = tmp_path / "RAN"
    (tmp_path / "planted.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                         "class Evil:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for override in ["method.name=planted:Evil", "method.name=planted",
                     "backbone.name=planted:Evil", "data.augment=[planted:Evil]",
                     "eval.knn.pool=planted:Evil", "recon.net=planted:Evil",
                     "recon.norm=planted:Evil", "eval.linear={layer: conv5, recipe: planted}"]:
        with pytest.raises(RunConfigError):
            load_run_config(run_yaml, [override])
    path = write(tmp_path, "b.yaml", {**BENCH, "methods": {"toy": {
        "config": "tiny_run.yaml", "set": {"method.name": "planted:Evil"}}}})
    with pytest.raises((RunConfigError, ValueError)):
        bench.run_bench(bench.load_bench_config(path), out=tmp_path / "out", progress=False)
    assert "planted" not in sys.modules and not marker.exists()


def _fake_train(c):
    return fake_train(c, metric="knn_conv5")


def test_results_folder_of_another_config_is_refused(run_yaml, tmp_path, monkeypatch):
    monkeypatch.setattr(schedule, "train", _fake_train)
    monkeypatch.setattr(bench, "write_report", lambda *a, **k: None)
    out = tmp_path / "out"
    first = bench.load_bench_config(write(tmp_path, "first.yaml", BENCH))
    bench.run_bench(first, out=out, progress=False)
    saved = json.loads((out / "results.json").read_text())
    assert saved["made_by"] == {"kind": "bench", "name": "first"} and len(saved["runs"]) == 2
    other = bench.load_bench_config(write(tmp_path, "other.yaml", BENCH))
    with pytest.raises(RunConfigError, match=r"holds the results of bench config 'first', not "
                                             r"of bench config 'other'.*--reuse-folder"):
        bench.run_bench(other, out=out, progress=False)
    bench.run_bench(other, out=out, progress=False, reuse_folder=True)  # explicit: allowed
    assert json.loads((out / "results.json").read_text())["made_by"]["name"] == "other"

    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(RunConfigError, match="is not empty and holds no results.json"):
        bench.run_bench(first, out=stranger, progress=False)
    legacy = tmp_path / "legacy"  # results.json from before the identity was recorded
    legacy.mkdir()
    (legacy / "results.json").write_text(json.dumps({"runs": []}))
    bench.run_bench(first, out=legacy, progress=False)
    (legacy / "results.json").write_text("{not json")
    with pytest.raises(RunConfigError, match="results.json is unreadable"):
        bench.run_bench(first, out=legacy, progress=False)
    # a run id names a folder: one that climbs out of the results folder is refused on reading
    (legacy / "results.json").write_text(json.dumps({"runs": [{"id": "../../x", "config": {}}]}))
    with pytest.raises(RunConfigError, match=r"runs\[0\] has a bad id: id='../../x' is not a "
                                             "plain name"):
        bench.run_bench(first, out=legacy, progress=False)
    (legacy / "results.json").write_text(json.dumps({"runs": [{"id": "a"}]}))
    with pytest.raises(RunConfigError, match=r"runs\[0\] is not a run \(no config\)"):
        bench.run_bench(first, out=legacy, progress=False)


def test_every_planned_run_is_checked_before_the_first_trains(run_yaml, tmp_path, monkeypatch):
    monkeypatch.setattr(schedule, "train", lambda c: pytest.fail("trained before every check"))
    path = write(tmp_path, "b.yaml", {**BENCH, "methods": {
        "toy": {"config": "tiny_run.yaml"},
        "big": {"config": "tiny_run.yaml", "set": {"eval.knn.k": 100}}}})
    with pytest.raises(RunConfigError, match=r"run big-base-seed0: eval.knn.k=100 but the kNN "
                                             r"bank holds the 24 training images"):
        bench.run_bench(bench.load_bench_config(path), out=tmp_path / "out", progress=False)


def test_a_killed_matrix_run_resumes_and_the_eta_is_never_nan(run_yaml, tmp_path, capsys):
    assert eta_text(0.0, 0, 4) == "ETA unknown" and eta_text(120.0, 2, 2) == "ETA 2.0 min"
    stop = {**BENCH, "common": {"run.stop_after_epoch": 1}}
    with pytest.raises(StopTraining, match="run toy-base-seed0 stopped with its checkpoint "
                                           "intact; the same command continues it"):
        bench.run_bench(bench.load_bench_config(write(tmp_path, "b.yaml", stop)),
                        out=tmp_path / "out", progress=False)
    out = capsys.readouterr().out
    assert "run 1/2: toy-base-seed0 (ETA unknown)" in out
    changed = {**BENCH, "methods": {"toy": {"config": "tiny_run.yaml",
                                            "set": {"train.lr": 0.01}}}}
    with pytest.raises(RunConfigError, match=r"1 unfinished run\(s\) in .* were started with "
                                             r"another config \(toy-base-seed0: train.lr\)"):
        bench.run_bench(bench.load_bench_config(write(tmp_path, "b.yaml", changed)),
                        out=tmp_path / "out", progress=False)
    bench.run_bench(bench.load_bench_config(write(tmp_path, "b.yaml", BENCH)),
                    out=tmp_path / "out", progress=False)
    out = capsys.readouterr().out
    assert "resumed from" in out and "after epoch 1" in out
    assert "run 2/2: toy-recon-seed0 (ETA " in out and "nan" not in out
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [len(r["history"]) for r in runs] == [2, 2]
    log = (tmp_path / "out" / "runs" / "toy-base-seed0" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in log] == [1, 2]


def test_a_config_given_to_the_other_command_names_that_command(run_yaml, tmp_path):
    abl = write(tmp_path, "a.yaml", {"method": {"config": "tiny_run.yaml"},
                                     "axes": {"weight": [0, 1]}})
    with pytest.raises(RunConfigError, match=r"\['axes', 'method'\] in bench config a.yaml; .*"
                                             r"Its 'axes' says it is a config for recon-aux "
                                             r"ablate: run it with that\.$"):
        bench.load_bench_config(abl)
    with pytest.raises(RunConfigError, match=r"\['methods'\] in ablate config b.yaml; .*"
                                             r"config for recon-aux bench: run it with that\.$"):
        ablate.load_ablate_config(write(tmp_path, "b.yaml", BENCH))
    with pytest.raises(RunConfigError, match=r"\['methds'\][^I]*$"):  # no hint for a typo
        bench.load_bench_config(write(tmp_path, "c.yaml", {**BENCH, "methds": {}}))


@pytest.mark.parametrize("where", ["outside", "absolute"])
def test_a_run_config_outside_the_configs_folder_is_refused(run_yaml, tmp_path, where):
    outside = tmp_path / "elsewhere.yaml"  # beside configs/, which holds the bench config
    outside.write_text(run_yaml.read_text())
    name = "../elsewhere.yaml" if where == "outside" else str(outside)
    with pytest.raises(RunConfigError, match=r"methods.toy.config .*elsewhere.yaml' is outside .*"
                                             r"configs, the folder of the config that names it"):
        bench.load_bench_config(write(tmp_path, "b.yaml", {**BENCH, "methods": {
            "toy": {"config": name}}}))
    inside = bench.load_bench_config(write(tmp_path, "c.yaml", {**BENCH, "methods": {
        "toy": {"config": str(run_yaml)}}}))  # absolute, but in the folder: accepted
    assert inside.methods["toy"].config == run_yaml


def test_a_metric_no_planned_run_reports_is_refused_before_any_run(run_yaml, tmp_path):
    cfg = bench.load_bench_config(write(tmp_path, "b.yaml", {**BENCH,
                                                             "metrics": ["knn_conv5", "knn_c99"]}))
    with pytest.raises(RunConfigError, match=r"metrics \['knn_c99'\]: no planned run reports "
                                             r"them \(their eval gives \['final_method_loss', "
                                             r"'knn_conv5'\]\)"):
        bench.run_bench(cfg, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "runs").exists()


def test_an_empty_config_says_what_it_lacks(tmp_path):
    empty = tmp_path / "configs" / "e.yaml"
    empty.parent.mkdir()
    empty.write_text("")
    with pytest.raises(RunConfigError, match="methods names no method to run"):
        bench.load_bench_config(empty)
    with pytest.raises(RunConfigError, match="axes names no axis to vary"):
        ablate.load_ablate_config(empty)


@pytest.mark.parametrize("common", [{"run.out_dir": "/tmp/x"}, {"run.resume": True},
                                    {"run": {"progress": True}}])
def test_run_settings_bench_sets_itself_are_refused_in_common(run_yaml, tmp_path, common):
    with pytest.raises(RunConfigError, match=r"common: run\.\w+ is set by bench and ablate "
                                             r"themselves .*choose the results folder with "
                                             r"--out-dir"):
        bench.load_bench_config(write(tmp_path, "b.yaml", {**BENCH, "common": common}))
    cfg = bench.load_bench_config(write(tmp_path, "c.yaml", {
        **BENCH, "common": {"run.save_checkpoints": True}}))  # not one of bench's: accepted
    assert cfg.common == {"run.save_checkpoints": True}
