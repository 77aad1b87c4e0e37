"""The README's verdict table, rendered from the results folders (benchmarks/summary.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import cli, summary

ROOT = Path(__file__).resolve().parents[2]


def _run(method, recon, seed, knn, reference=None):
    return {"method": method, "recon": recon, "seed": seed, "reference": reference,
            "metrics": {"knn_conv5": knn, "final_method_loss": 1.0},
            "tapped": "conv5.0" if recon else None}


def _folder(tmp_path: Path, name: str, runs, kind="bench") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"made_by": {"kind": kind, "name": name},
                                                     "runs": runs, "superseded": []}))
    return folder


def test_readme_table_is_what_the_committed_results_say():
    # The top-level README's verdict block must be regenerated whenever a results.json changes.
    assert summary.main(ROOT / "README.md", check=True) == 0


def test_rows_verdicts_seeds_and_bold_where_clear(tmp_path):
    runs = []
    for seed, (ri, only, base, plus) in enumerate([(30, 45, 40, 42), (31, 44, 41, 44)]):
        runs += [_run("random-init", False, seed, ri, "random-init"),
                 _run("recon-only", {"weight": 1}, seed, only, "recon-only"),
                 _run("dc", False, seed, base), _run("dc", {"weight": 1}, seed, plus)]
    runs.append(_run("sela", False, 0, 33.0))  # a base row whose +recon row has not run
    rows = summary.summary_rows(_folder(tmp_path, "m", runs))
    dc, sela = rows
    assert (dc["method"], dc["matrix"], dc["answer"]) == ("dc", "m", "yes")
    assert dc["seeds"] == {False: [0, 1], True: [0, 1]} and dc["tapped"] == ["conv5.0"]
    assert dc["vs_random"] == "**kNN conv5 +10.0 ± 0.0**"
    assert dc["paired"] == "**kNN conv5 +2.5 ± 0.7**"
    # +recon − recon-only: -3 and 0 -> -1.5 ± 2.1, not clear, so not bold
    assert dc["vs_recon_only"] == "kNN conv5 -1.5 ± 2.1"
    assert (sela["answer"], sela["reason"]) == ("unclear", "no +recon row yet")
    assert sela["vs_random"] == "kNN conv5 +3.0 (n=1)" and sela["paired"] == "-"
    table = summary.render_summary([tmp_path / "m"])
    assert "| dc (m; conv5.0) | **yes**: +recon clearly better on knn_conv5 | 0, 1 / 0, 1 |" \
        in table
    assert "| sela (m) | **unclear**: no +recon row yet | 0 / none |" in table
    assert "final" not in table  # training statistics are not evaluations


def test_refuses_what_it_cannot_summarise(tmp_path):
    with pytest.raises(summary.SummaryError, match="recon-aux bench"):
        summary.summary_rows(tmp_path)
    ablation = _folder(tmp_path, "ablation", [_run("aet", False, 0, 40.0)], kind="ablate")
    with pytest.raises(summary.SummaryError, match="only bench matrices"):
        summary.summary_rows(ablation)
    with pytest.raises(summary.SummaryError, match="exactly one pair of marker lines"):
        summary.replace_block("no markers here", "table")
    broken = tmp_path / "broken"
    broken.mkdir()
    for text, match in (("{not json", "cannot be read as JSON"),
                        ("[1, 2]", r"made_by: list\); only bench matrices"),
                        ('{"made_by": {"kind": "bench"}}', "has no list of runs")):
        (broken / "results.json").write_text(text)
        with pytest.raises(summary.SummaryError, match=match):
            summary.summary_rows(broken)


def test_write_then_check_from_the_command_line(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    _folder(results, "cifar10-cpu", [_run("random-init", False, 0, 30.0, "random-init"),
                                     _run("aet", False, 0, 36.0),
                                     _run("aet", {"weight": 1}, 0, 38.0)])
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n\n{summary.MARK_BEGIN}\nstale\n{summary.MARK_END}\n\nafter\n")
    assert cli.main(["summary", "--check", str(readme), "--results", str(results)]) == 1
    assert "not what the results say" in capsys.readouterr().out
    assert cli.main(["summary", "--write", str(readme), "--results", str(results)]) == 0
    text = readme.read_text()
    assert "stale" not in text and text.endswith("\n\nafter\n")
    assert "| aet (cifar10-cpu; conv5.0) | **unclear**: fewer than two seeds | 0 / 0 |" in text
    assert cli.main(["summary", "--check", str(readme), "--results", str(results)]) == 0
    (readme).write_text("no markers")
    assert cli.main(["summary", "--write", str(readme), "--results", str(results)]) == 2
    assert "summary error" in capsys.readouterr().err
