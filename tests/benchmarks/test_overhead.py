"""The overhead benchmark (benchmarks/studies/overhead.py): its report's structure, --write,
and the settings it refuses; the head's memory-format study and the first-epoch sizing study
beside it. Tiny sizes: the timings themselves mean nothing here."""

from __future__ import annotations

import copy
import os
import re
import shutil

import pytest
import torch

import recon_aux
from adapters.devices import has_cxx_compiler
from benchmarks.studies import first_epoch, head_memory_format, overhead

TINY = ["--rounds", "2", "--warmup", "1", "--batch-size", "8", "--widths", "0.25",
        "--threads", "1"]


def test_report_structure_and_write(tmp_path, one_thread):
    out = tmp_path / "results" / "overhead.txt"
    report = overhead.run_benchmark(overhead.parse_args([*TINY, "--write", str(out)]),
                                    echo=False)
    text = report.text
    for field in ("machine: CPU ", "core", "1 torch thread,", f"torch {torch.__version__}",
                  "device: CPU", "batch 8", "image 32x32", "precision: fp32",
                  "2 timed rounds", "rotating order", "load average before:",
                  "load average after:"):
        assert field in text, field
    assert out.read_text() == text  # --write: the whole printed report
    result = report.results[0.25]
    assert set(result.times) == set(overhead.VARIANTS)
    assert all(len(ts) == 2 and min(ts) > 0 for ts in result.times.values())
    for stats in result.ratios.values():
        assert 0 < stats.low <= stats.median <= stats.high
        assert stats.low <= stats.ci[0] <= stats.ci[1] <= stats.high
    assert result.ratios["base"].median == 1.0
    assert result.memory is None and "step memory" not in text  # CUDA's allocator only
    head = result.ratios[overhead.HEADLINE]
    assert re.fullmatch(r"recon/base step-time ratio: \d+\.\d\d \[\d+\.\d\d, \d+\.\d\d\] "
                        r"\(L2\+LPIPS-alex, width 0\.25\)", report.lines[-1])
    assert f"{head.median:.2f}" in report.lines[-1]


def test_profile_prints_the_variants_ops_and_writes_only_the_report(tmp_path, capsys,
                                                                    one_thread):
    out = tmp_path / "overhead.txt"
    argv = [*TINY, "--rounds", "1", "--profile", "+L2", "--write", str(out)]
    report = overhead.run_benchmark(overhead.parse_args(argv))
    printed = capsys.readouterr().out
    assert "profile of +L2, width 0.25, 5 steps after the timed rounds:" in printed
    table = printed.split("profile of +L2")[1]
    assert "aten::convolution" in table and "Self CPU time total" in table
    assert "profile of" not in out.read_text() and out.read_text() == report.text
    with pytest.raises(overhead.OverheadError, match=r"--profile '\+L3': no such variant; one of"):
        overhead.check_args(overhead.parse_args(["--profile", "+L3"]))


def test_a_variant_times_a_cost_knob_in_the_same_rounds(one_thread, capsys):
    name = "+L2+LPIPS-alex, head_out_scale=4,lpips_fraction=0.5"
    argv = [*TINY, "--rounds", "2", "--variant", "head_out_scale=4,lpips_fraction=0.5",
            "--profile", name]
    report = overhead.run_benchmark(overhead.parse_args(argv), echo=False)
    ratios = report.results[0.25].ratios
    assert list(ratios) == [*overhead.VARIANTS, name] and ratios[name].median > 0
    assert f"  {name} " in report.text  # its row in the width's table


def test_a_variant_may_set_a_knob_that_a_flag_also_sets(one_thread):
    # --variant head_width=32 (with or without --head-width) once raised "attach() got
    # multiple values for keyword argument 'head_width'" on a GPU; the variant's value wins.
    args = overhead.parse_args([*TINY, "--head-width", "16", "--variant", "head_width=8"])
    overhead.check_args(args)
    template = overhead.build_template(args.backbone, 0.25)
    variant = overhead.build_variant(template, args.variants["+L2+LPIPS-alex, head_width=8"], args)
    assert variant.aux.config.head_width == 8
    plain = overhead.build_variant(template, overhead.VARIANTS["+L2"], args)
    assert plain.aux.config.head_width == 16


def test_a_torchvision_encoder_is_timed_as_the_repo_backbones_are(one_thread):
    # resnet50 and vit_s16 at 224 px are where the FLOP table sets its targets; resnet18 at
    # 32 px stands for them here (the same path: benchmarks.studies.encoders)
    args = overhead.parse_args(["--rounds", "1", "--warmup", "0", "--batch-size", "2",
                                "--threads", "1", "--backbone", "resnet18", "--image-size", "32"])
    report = overhead.run_benchmark(args, echo=False)
    assert "model: resnet18, widths 1.0, batch 2, image 32x32" in report.text
    assert "tapped layer4." in report.text and report.results[1.0].ratios["+L2"].median > 0


@pytest.mark.parametrize("argv,message", [
    (["--backbone", "vit_s16", "--image-size", "64"],
     r"--image-size 64: --backbone vit_s16 cannot take it \(Wrong image height"),
    (["--backbone", "resnet50", "--widths", "0.5"],
     r"--backbone resnet50 has no width factor; pass --widths 1\.0"),
])
def test_a_torchvision_encoder_refuses_what_it_cannot_take(argv, message):
    with pytest.raises(overhead.OverheadError, match=message):
        overhead.check_args(overhead.parse_args(argv))


@pytest.mark.parametrize("spec,message", [
    ("head_out_scal=4",
     r"unknown config key\(s\) \['head_out_scal'\]\. Valid keys: .*head_out_scale"),
    ("head_out_scale=3", r"head_out_scale=3 .*"),
    ("head_out_scale", r"give KEY=VALUE\[,KEY=VALUE\]"),
    ("lpips_fraction=[", r"--variant 'lpips_fraction=\['"),
])
def test_a_bad_variant_is_refused_before_any_work(spec, message):
    with pytest.raises(overhead.OverheadError, match=message):
        overhead.check_args(overhead.parse_args(["--variant", spec]))
    with pytest.raises(overhead.OverheadError, match="is given twice"):
        overhead.check_args(overhead.parse_args(["--variant", "head_out_scale=4",
                                                 "--variant", "head_out_scale=4"]))


def test_nothing_written_without_write(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    overhead.run_benchmark(overhead.parse_args([*TINY, "--rounds", "1"]), echo=False)
    assert list(tmp_path.iterdir()) == []


def test_rotating_order_puts_each_variant_first():
    orders = list(overhead.rotations(["a", "b", "c"], 6))
    assert [o[0] for o in orders] == ["a", "b", "c", "a", "b", "c"]
    assert all(sorted(o) == ["a", "b", "c"] for o in orders)


def test_bootstrap_interval_is_seeded_and_brackets_the_median():
    values = [1.0, 1.1, 1.2, 1.05, 1.3, 1.15, 1.12]
    low, high = overhead.bootstrap_median(values, 500, seed=0)
    assert (low, high) == overhead.bootstrap_median(values, 500, seed=0)
    assert min(values) <= low <= sorted(values)[3] <= high <= max(values)


def test_busy_machine_is_flagged():
    assert overhead.machine_busy(1.0) and not overhead.machine_busy(0.1)
    assert not overhead.machine_busy(None)
    in_use = overhead.cpu_in_use(0.2)
    assert in_use is None or 0.0 <= in_use <= (os.cpu_count() or 1) + 1e-6
    args = overhead.parse_args(TINY)
    overhead.check_args(args)
    lines = overhead.header(args, (99.0, 99.0, 99.0), 1.5)
    assert lines[-1].startswith("WARNING: the machine is busy")
    assert "ratios are not overhead measurements" in lines[-1]


@pytest.mark.parametrize("argv,message", [
    (["--precision", "fp16"], "--precision fp16 needs --device cuda"),
    (["--image-size", "224"], "--backbone alexnet_cifar cannot take it"),
    (["--backbone", "alexnet", "--widths", "0.5"], "has no width factor; pass --widths 1.0"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--compile", "default", "--warmup", "0"], "give --warmup 1 or more"),
    (["--backbone", "alexnet_cifar2"], "unknown backbone 'alexnet_cifar2'; valid names:"),
])
def test_refused_settings(argv, message, capsys):
    assert overhead.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("overhead: ") and message in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("device,mode", [
    pytest.param("cpu", "default", marks=pytest.mark.skipif(
        not has_cxx_compiler(),
        reason="inductor on the CPU needs a C++ compiler")),
    pytest.param("cuda", "reduce-overhead", marks=pytest.mark.cuda),
])
def test_compiled_variants_are_timed_after_their_compilation(device, mode, one_thread):
    torch.compiler.reset()
    argv = [*TINY, "--rounds", "2", "--device", device, "--compile", mode,
            "--profile", "+L2 (compiled)"]
    report = overhead.run_benchmark(overhead.parse_args(argv), echo=False)
    text = report.text
    assert f"each variant also torch.compile'd, mode {mode} (inductor)" in text
    names = [*overhead.VARIANTS, *map(overhead.compiled, overhead.VARIANTS)]
    ratios = report.results[0.25].ratios
    assert list(ratios) == names and all(s.median > 0 for s in ratios.values())
    assert re.search(rf"compiled \({mode}, width 0.25\): base step \d+\.\d\d \[[\d., ]+\] "
                     r"of the eager base step; \+L2\+LPIPS-alex / base, both compiled: "
                     r"\d+\.\d\d", text)
    assert report.lines[-1].startswith("recon/base step-time ratio: ")  # the eager headline
    with pytest.raises(overhead.OverheadError, match="is a compiled variant: add --compile"):
        overhead.check_args(overhead.parse_args([*TINY, "--profile", "base (compiled)"]))


def test_compiler_missing_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert overhead.main(["--compile", "default"]) == 2
    err = capsys.readouterr().err
    assert "needs a C++ compiler" in err and "--compile default" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_cuda_refused_without_gpu(capsys):
    assert overhead.main(["--device", "cuda"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_precisions(precision, one_thread):
    argv = [*TINY, "--rounds", "1", "--device", "cuda", "--precision", precision,
            "--channels-last"]
    report = overhead.run_benchmark(overhead.parse_args(argv), echo=False)
    assert "device: CUDA " in report.text and f"precision: {precision}" in report.text
    assert all(s.median > 0 for s in report.results[0.25].ratios.values())
    memory = report.results[0.25].memory  # a step's activations at least, more with the head
    assert "step memory (MiB)" in report.text and 0 < memory["base"] < memory["+L2"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_head_memory_format_study_sets_each_heads_format(tmp_path, device, one_thread):
    out = tmp_path / "head.txt"
    text = head_memory_format.main(
        ["--device", device, "--precision", "fp32", "--backbone", "alexnet_cifar",
         "--image-size", "32", "--batch-size", "4", "--rounds", "1", "--warmup", "0",
         "--write", str(out)])
    assert out.read_text() == text
    names = [line[:30].strip() for line in text.splitlines()[2:]]
    assert names == list(head_memory_format.VARIANTS)


def test_first_epoch_rows_are_the_trained_rows_plus_extras():
    todo = first_epoch.rows("benchmarks/configs/cifar10-gpu.yaml", [],
                            ["sela-recon:data.augment_on_device=false,data.prefetch=0"])
    names = [name for name, _ in todo]
    assert names[:6] == [f"{m}-{v}" for m in ("deepcluster", "sela", "aet")
                         for v in ("base", "recon")]
    extra = todo[-1][1]
    assert not extra.data.augment_on_device and extra.recon is not None
    assert extra.method.config.nopts == 42  # the config's own schedule, not a shortened one
    with pytest.raises(SystemExit, match="ROW one of"):
        first_epoch.rows("benchmarks/configs/cifar10-gpu.yaml", [], ["nope:train.lr=1"])
    with pytest.raises(SystemExit, match=r"--profile \['sela'\]: no such row; rows: \["):
        first_epoch.main(["benchmarks/configs/cifar10-gpu.yaml", "--profile", "sela"])


def _table_total_ms(table: str) -> float:
    """The profiler table's "Self CUDA time total" in ms."""
    value, unit = re.search(r"Self CUDA time total: ([\d.]+)(s|ms|us)", table).groups()
    return float(value) * {"s": 1e3, "ms": 1.0, "us": 1e-3}[unit]


# "auto" is the engine's default train.device (CUDA when torch sees one)
@pytest.mark.parametrize("device", ["cpu", "auto", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_first_epoch_profile_reports_per_step_time_and_synchronisations(tiny_tree, tmp_path,
                                                                       device):
    from adapters.config import load_run_config
    from tests.adapters.tiny import tiny_config

    rc = load_run_config(tiny_config(tiny_tree, tmp_path / "run", data={"batch_size": 4},
                                     train={"device": device}), [])  # 6 steps an epoch
    line, table = first_epoch.profile_epoch("rotation-recon", rc, wait=1, warmup=1, active=3)
    match = re.fullmatch(r"profile of rotation-recon, steps 3-5 of epoch 1: ([\d.]+) ms per step "
                         r"\(median, host clock\), device kernels ([\d.]+) ms per step, "
                         r"([\d.]+) host-device synchronisations per step", line)
    assert match and float(match[1]) > 0
    if device == "cpu" or not torch.cuda.is_available():  # no kernels to run or wait for
        assert float(match[2]) == 0 and float(match[3]) == 0
    else:  # the kernels ran there, and the objective's checks (at least) waited for them
        assert float(match[2]) > 0 and float(match[3]) >= 1
        # the kernels' time alone: not the ops' rows again, nor the profiler's step ranges
        assert float(match[2]) == pytest.approx(_table_total_ms(table) / 3, rel=0.01, abs=0.01)
    assert "aten::convolution" in table
    with pytest.raises(SystemExit, match="epoch 1 has 6 steps, fewer than the 8 profiled"):
        first_epoch.profile_epoch("rotation-recon", rc.with_run(out_dir=str(tmp_path / "again")),
                                  wait=2, warmup=1, active=5)


@pytest.mark.parametrize("train", [
    {"device": "cpu", "compile": "default", "compile_backend": "aot_eager"},
    pytest.param({"device": "cuda", "compile": "reduce-overhead"}, marks=pytest.mark.cuda),
], ids=["cpu-aot_eager", "cuda-reduce-overhead"])
def test_first_epoch_profile_of_a_compiled_row(tiny_tree, tmp_path, train):
    """The profile counts the steps of a compiled row too (its first step compiles, unprofiled)."""
    from adapters.config import load_run_config
    from tests.adapters.tiny import tiny_config

    rc = load_run_config(tiny_config(tiny_tree, tmp_path / "run", data={"batch_size": 4},
                                     train=train), [])
    line, table = first_epoch.profile_epoch("rotation-recon", rc, wait=1, warmup=1, active=3)
    assert re.fullmatch(r"profile of rotation-recon, steps 3-5 of epoch 1: [\d.]+ ms per step .*",
                        line)
    # the compiled graphs ran in the profiled steps: eagerly launched, they are rows of their
    # autograd function; replayed as CUDA graphs (an H200 run), rows "## Call CompiledFxGraph …"
    assert "CompiledFunction" in table or "CompiledFxGraph" in table, table


def test_first_epoch_times_later_epochs_apart_from_set_up(tiny_tree, tmp_path):
    from adapters.config import load_run_config
    from tests.adapters.tiny import tiny_config

    rc = load_run_config(tiny_config(tiny_tree, tmp_path / "run", data={"batch_size": 4},
                                     train={"epochs": 4}), [])  # 6 steps an epoch
    line = first_epoch.timed_row("rotation-recon", rc, 3)
    assert re.fullmatch(r"rotation-recon +[\d.]+ s  \(set-up \+ epoch 1\), then [\d.]+ s "
                        r"per epoch over epochs 2-3 \(6 steps each, median step [\d.]+ ms, "
                        r"host clock\)", line), line
    with pytest.raises(SystemExit, match=r"--epochs 40: choose 1 to one less than each row's "
                                         r"train.epochs .*too many for \['aet-base'"):
        first_epoch.main(["benchmarks/configs/cifar10-gpu.yaml", "--epochs", "40"])


def test_first_epoch_writes_each_line_as_it_is_measured(tiny_tree, tmp_path, monkeypatch):
    """--write keeps what was measured when the study is cut short (a device's time limit)."""
    import yaml

    from tests.adapters.tiny import tiny_config

    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(tiny_config(tiny_tree, "unused")))  # the study sets its own
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "title": "tiny", "seeds": [0], "metrics": ["knn_conv5"], "recon": {"weight": 1.0},
        "methods": {"rotation": {"config": str(run)}}}))
    real, done = first_epoch.train_epochs, []

    def cut_after_one_row(rc, epochs):
        if done:
            raise KeyboardInterrupt  # as the time limit would
        real(rc, epochs)
        done.append(rc)

    monkeypatch.setattr(first_epoch, "train_epochs", cut_after_one_row)
    out = tmp_path / "first-epoch.txt"
    with pytest.raises(KeyboardInterrupt):
        first_epoch.main([str(config), "--write", str(out)])
    lines = out.read_text().splitlines()
    # the header gives the whole command, flags too, so the file says how it was measured
    assert len(lines) == 3 and lines[0].startswith(
        f"python -m benchmarks.studies.first_epoch {config} --write {out}; ")
    assert lines[1].startswith("loading the data") and lines[2].startswith("rotation-base ")


def test_step_memory_is_the_peak_over_what_was_allocated_before(monkeypatch, one_thread):
    """The CUDA-only column, its arithmetic and its table on a CPU machine: torch.cuda's
    counters faked, each step allocating 100 MiB more per variant than the one before."""
    allocated, peak = [0], [0]

    def fake_step(v, images, labels, args):
        peak[0] = allocated[0] + (len(seen) + 1) * 100 * 2**20
        allocated[0] += 2**20  # the gradients it leaves
        seen.append(v)
        return 0.01

    seen: list = []
    monkeypatch.setattr(overhead, "step", fake_step)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: allocated[0])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: peak.__setitem__(0, 0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peak[0])
    args = overhead.parse_args([*TINY, "--rounds", "1"])
    args.device = "cuda"
    memory = overhead.step_memory({"base": "b", "+L2": "l"}, None, None, args)
    assert memory == {"base": 100 * 2**20, "+L2": 200 * 2**20} and seen == ["b", "l"]
    result = overhead.WidthResult(0.25, {}, {"base": 0.01, "+L2": 0.02},
                                  {n: overhead.RatioStats(1.0, 1.0, 1.0, (1.0, 1.0))
                                   for n in ("base", "+L2")}, memory)
    template = overhead.build_template("alexnet_cifar", 0.25)
    aux = recon_aux.attach(copy.deepcopy(template), input_shape=(3, 32, 32), lpips_weight=0.0)
    lines = overhead.width_table(result, template, aux, args).splitlines()
    assert lines[2].endswith("step memory (MiB)")
    assert lines[3].split()[-1] == "100" and lines[4].split()[-1] == "200"
