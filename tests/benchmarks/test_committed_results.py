"""Every committed results README is what the committed code writes from the committed
``results.json`` (``--report-only`` into a fresh folder, as a fresh clone has no pictures and no
run folders): a change to the report code, or a hand edit of a generated README, without
regenerating them fails here."""

from __future__ import annotations

import shutil

import pytest

from benchmarks import ablate, bench
from recon_aux.config import safe_load
from tests.helpers import REPO

RESULTS = REPO / "benchmarks" / "results"
CONFIGS = REPO / "benchmarks" / "configs"
#: Results folders made by a bench or ablate config of the same name, with no overrides.
FOLDERS = {p.parent.name: (p.parent.name, []) for p in RESULTS.glob("*/results.json")
           if (CONFIGS / f"{p.parent.name}.yaml").is_file()}
#: ``make gpu-check``'s short matrix (the Makefile's overrides).
FOLDERS["gpu-check"] = ("cifar10-gpu", [
    "seeds=[0]", "common.train.epochs=2", "methods.sela.set.method.nopts=4",
    "common.eval.linear=null", "common.eval.nonlinear=null",
    "metrics=[knn_conv3, knn_conv5, knn_fc7]"])


def test_the_results_folders_are_found():
    assert {"cifar10-cpu", "simclr-cpu", "ablation-cpu", "cifar10-gpu"} <= set(FOLDERS)
    assert {p.parent.name for p in RESULTS.glob("*/results.json")} == set(FOLDERS)


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_a_committed_results_readme_is_what_its_results_make(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / name
    out.mkdir()
    shutil.copy(RESULTS / name / "results.json", out / "results.json")
    stem, overrides = FOLDERS[name]
    config = CONFIGS / f"{stem}.yaml"
    if "axes" in safe_load(config.read_text()):
        ablate.run_ablate(ablate.load_ablate_config(config, overrides), out=out, progress=False,
                          report_only=True)
    else:
        bench.run_bench(bench.load_bench_config(config, overrides), out=out, progress=False,
                        report_only=True)
    assert (out / "README.md").read_text() == (RESULTS / name / "README.md").read_text(), (
        f"benchmarks/results/{name}/README.md is not what the code writes from its results.json; "
        f"regenerate it with --report-only (benchmarks/configs/{stem}.yaml {overrides})")
