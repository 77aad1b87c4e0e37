"""Every committed bench and ablate config loads, and every run it plans validates."""

from __future__ import annotations

import re

import pytest

from benchmarks import ablate, bench
from benchmarks.matrix import dotted
from tests.helpers import REPO

CONFIGS = REPO / "benchmarks" / "configs"
BENCH_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", BENCH_CONFIGS, ids=lambda p: p.name)
def test_bench_config_valid(path, tmp_path, monkeypatch, capsys):
    """The whole plan: every run the config would train (base and +recon rows, the reference
    rows, each ablation point, every seed) is built and validated, and its ``metrics`` are
    reported by some run, as ``bench``/``ablate --report-only`` does without training."""
    monkeypatch.chdir(tmp_path)  # run config paths resolve against the config's folder
    out = tmp_path / "out"
    if path.name.startswith("ablation"):
        cfg = ablate.load_ablate_config(path)
        assert set(cfg.axes) <= set(ablate.AXES)
        ablate.run_ablate(cfg, out=out, report_only=True, progress=False)
    else:
        bench.run_bench(bench.load_bench_config(path), out=out, report_only=True, progress=False)
    planned = re.search(r"(\d+) runs planned, 0 already done", capsys.readouterr().out)
    assert planned and int(planned.group(1)) >= 2
    assert (out / "README.md").is_file() and not (out / "runs").exists()  # nothing trained


def test_cifar10_cpu_runs_recon_only_on_each_methods_recipe(tmp_path):
    from benchmarks.matrix import Matrix, add_references

    cfg = bench.load_bench_config(CONFIGS / "cifar10-cpu.yaml")
    plan = Matrix(cfg.name, tmp_path / "results", progress=False)  # planned, nothing run
    for ref_from, rows in cfg.references.items():
        add_references(plan, cfg, cfg.methods[ref_from], ref_from, rows, dotted(cfg.common), 0)
    by_id = {run_id: (rc, meta) for run_id, rc, meta in plan.plan}
    shared, _ = by_id["recon-only-alexnet_cifar-seed0"]
    for method in ("aet", "sela"):
        rc, meta = by_id[f"recon-only-alexnet_cifar-{method}-seed0"]
        assert meta == {"reference": f"recon-only (alexnet_cifar, {method}'s recipe)",
                        "method": "recon-only", "ref_from": method}
        own = cfg.methods[method].run_config([*dotted(cfg.common), "train.seed=0"], cfg.name)
        assert rc.method.name == "recon_only" and rc.recon == shared.recon
        # the method's own recipe: its augmentation, optimizer and batch, not DeepCluster's
        assert (rc.data, rc.train, rc.eval, rc.backbone) == (own.data, own.train, own.eval,
                                                             own.backbone)
    assert "ref_from" not in by_id["recon-only-alexnet_cifar-seed0"][1]


def _gpu_check_commands() -> list[list[str]]:
    """The commands of the Makefile's gpu-check target as make runs them (``make -n``: its
    variables expanded; the venv taken as built), continuation lines joined, split."""
    import shlex
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not on PATH: the gpu-check target is read with `make -n`")
    text = subprocess.run(["make", "-s", "-n", "-o", ".venv/.installed", "gpu-check"], cwd=REPO,
                          capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in text.replace("\\\n", " ").splitlines()
            if line.startswith(".venv/bin/")]


def test_gpu_check_commands_parse_on_a_cpu_machine():
    """make gpu-check runs only where there is a GPU, rarely: its arguments are checked here."""
    from benchmarks.studies import first_epoch, head_memory_format, overhead, probe_search

    commands = _gpu_check_commands()
    studies = {"overhead": overhead.parse_args, "head_memory_format": head_memory_format.parse_args,
               "first_epoch": first_epoch.parse_args, "probe_search": probe_search.parse_args}
    seen = set()
    for argv in commands:
        if argv[1:3] == ["-m", "pytest"]:
            seen.add("pytest")
        elif argv[1] == "-m" and argv[2].startswith("benchmarks.studies."):
            name = argv[2].rsplit(".", 1)[1]
            seen.add(name)
            args = studies[name](argv[3:])
            if name == "first_epoch":  # its rows are built from the bench config
                todo = first_epoch.rows(str(REPO / args.config), args.overrides, args.extra)
                assert set(args.profile) <= {row for row, _ in todo}
        elif argv[0].endswith("recon-aux") and argv[1] == "bench":
            seen.add("bench")
            overrides = [a for a in argv[3:] if not a.startswith("--") and "/" not in a]
            cfg = bench.load_bench_config(REPO / argv[2], overrides)
            rows = [rc for _, _, rc in bench.trained_rows(cfg, 0)]
            assert list(cfg.seeds) == [0] and len(rows) == 6
            assert all(rc.train.epochs == 2 and rc.eval.linear is None
                       and rc.eval.nonlinear is None for rc in rows)
    assert seen == {"pytest", "overhead", "head_memory_format", "first_epoch", "probe_search",
                    "bench"}
