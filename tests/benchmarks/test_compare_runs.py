"""benchmarks/studies/compare_runs.py: one row of two results folders, paired by seed."""

from __future__ import annotations

import json

import pytest

from benchmarks.studies import compare_runs


def _folder(path, layer, knn, extra=()):
    recon = {"weight": 1.0} if layer is None else {"weight": 1.0, "layer": layer}
    runs = [{"id": f"simclr-recon-seed{seed}", "seed": seed, "tapped": layer or "layer4",
             "metrics": {"knn_pool": value, "final_method_loss": 5.0},
             "config": {"recon": recon, "train": {"seed": seed},
                        "run": {"out_dir": str(path / "runs" / f"s{seed}")}}}
            for seed, value in enumerate(knn)]
    runs += [{"id": i, "seed": 0, "metrics": {}, "config": {}} for i in extra]
    path.mkdir()
    (path / "results.json").write_text(json.dumps({"runs": runs}))
    return path


def test_paired_difference_over_the_common_seeds_and_what_differs(tmp_path, capsys):
    a = _folder(tmp_path / "a", None, [45.0, 46.0, 47.0])  # the layer=None rule's tap
    b = _folder(tmp_path / "b", "layer4.1.conv2", [44.0, 44.5])  # seed 2 not finished in B
    out = tmp_path / "cmp.txt"
    assert compare_runs.main([str(a), str(b), "--row", "simclr-recon", "--write", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("simclr-recon, seeds 0, 1: ")
    # the differing key is named with both values; run.* (where a run was written) is not
    assert "configs differ in: recon.layer (A: not set (the default), B: layer4.1.conv2)\n" in text
    assert "tapped layer: A: layer4, B: layer4.1.conv2\n" in text  # what the default chose
    # what is left out is named: A's seed 2 has no partner in B
    assert "left out, no partner in the other folder: A seeds [2]\n" in text
    # 45 - 44, 46 - 44.5 -> +1.25 ± 0.35; training statistics are not compared
    assert "| knn_pool | 45.5 ± 0.7 | 44.2 ± 0.4 | +1.2 ± 0.4 (2/2 seeds up; A better) |" in text
    assert "final_method_loss" not in text
    assert out.read_text().startswith("$ python -m benchmarks.studies.compare_runs ")
    assert out.read_text().endswith(text)


@pytest.mark.parametrize("b_seeds, message", [
    ([], "has no finished run simclr-recon-seed<k>; its rows are simclr-base"),
    (None, "is not a readable results file"),
])
def test_clear_errors(tmp_path, b_seeds, message):
    a = _folder(tmp_path / "a", "layer4", [45.0])
    if b_seeds is None:
        b = tmp_path / "b"
        b.mkdir()
    else:
        b = _folder(tmp_path / "b", "layer4", b_seeds, extra=["simclr-base-seed0"])
    with pytest.raises(SystemExit, match=message):
        compare_runs.main([str(a), str(b), "--row", "simclr-recon"])


def test_no_common_seed_is_an_error(tmp_path):
    a = _folder(tmp_path / "a", "layer4", [45.0])
    b = tmp_path / "b"
    b.mkdir()
    runs = [{"id": "simclr-recon-seed3", "seed": 3, "metrics": {"knn_pool": 1.0}, "config": {}}]
    (b / "results.json").write_text(json.dumps({"runs": runs}))
    with pytest.raises(SystemExit, match=r"no seed has both rows \(A: simclr-recon, seeds "
                                         r"\[0\]; B: simclr-recon, seeds \[3\]\)"):
        compare_runs.main([str(a), str(b), "--row", "simclr-recon"])


def test_another_row_of_the_same_folder(tmp_path, capsys):
    """An ablation's point against its default point: two rows of one folder."""
    a = _folder(tmp_path / "a", "layer4", [45.0, 46.0], extra=())
    runs = json.loads((a / "results.json").read_text())["runs"]
    runs += [{**r, "id": r["id"].replace("simclr-recon", "point"),
              "metrics": {"knn_pool": r["metrics"]["knn_pool"] + 2.0}} for r in runs]
    (a / "results.json").write_text(json.dumps({"runs": runs}))
    assert compare_runs.main([str(a), str(a), "--row", "point", "--row-b", "simclr-recon"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("A: point, B: simclr-recon, seeds 0, 1: ")
    assert "| knn_pool | 47.5 ± 0.7 | 45.5 ± 0.7 | +2.0 ± 0.0 (2/2 seeds up; A better) |" in text
    with pytest.raises(SystemExit, match="has no finished run nope-seed<k>; its rows are point"):
        compare_runs.main([str(a), str(a), "--row", "point", "--row-b", "nope"])


def test_a_metric_missing_from_one_run_is_named_not_dropped_silently(tmp_path, capsys):
    a = _folder(tmp_path / "a", None, [45.0, 46.0])
    b = _folder(tmp_path / "b", None, [44.0, 44.5])
    data = json.loads((b / "results.json").read_text())
    data["runs"][0]["metrics"]["linear_pool"] = 50.0  # only B's seed 0 has it
    (b / "results.json").write_text(json.dumps(data))
    text = compare_runs.compare(a, b, "simclr-recon")
    assert "left out, missing from some of these runs: linear_pool\n" in text
    assert "| knn_pool |" in text and "| linear_pool |" not in text
