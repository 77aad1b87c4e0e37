"""The clustering scale study runs end to end at a tiny size (its numbers mean nothing here):
each measurement in its own process, float32 labels compared with float64, the extrapolation
lines written with --write."""

from __future__ import annotations

import pytest

from benchmarks.studies import clustering_scale


@pytest.mark.slow  # four fresh interpreters
def test_tiny_run_writes_every_line(tmp_path):
    out = tmp_path / "scale.txt"
    assert clustering_scale.main(["--sizes", "600", "--ks", "20", "--threads", "1",
                                  "--write", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# ") and "each measurement in its own process" in text
    assert text.count("sinkhorn N=") == 1 and text.count("kmeans   N=") == 1
    assert "labels equal" in text and "-> sinkhorn K=20" in text
    assert "-> kmeans K=20" in text and "bytes per N x K entry" in text


def test_limit_check_runs_at_the_fraction_of_the_fitted_limit(tmp_path, monkeypatch):
    """With --limit-check F the study runs Sinkhorn once more at F x (memory / fitted bytes per
    row) and prints the measurement beside the fit's prediction (measurements faked here: 1 us
    and 16 bytes per entry for float64 input, 12 for float32)."""
    calls = []

    def fake_case(n, k, threads, baseline):
        calls.append(n)
        return {"f64": {"s": n * 1e-6, "iters": 11, "peak_gb": 16e-9 * n * k},
                "f32": {"s": n * 1e-6, "iters": 11, "peak_gb": 12e-9 * n * k}, "agree": 1.0}

    monkeypatch.setattr(clustering_scale, "_child", lambda spec: {"peak_gb": 0.5})
    monkeypatch.setattr(clustering_scale, "sinkhorn_case", fake_case)
    out = tmp_path / "scale.txt"
    assert clustering_scale.main(["--sizes", "1000", "4000", "--ks", "100", "--skip-kmeans",
                                  "--memory-gb", "1.6", "--limit-check", "0.5",
                                  "--write", str(out)]) == 0
    assert calls == [1000, 4000, 500_000]  # 0.5 * 1.6 GB / (16 B x 100) per row
    text = out.read_text()
    assert "# python -m benchmarks.studies.clustering_scale --sizes 1000 4000" in text
    assert "16.0 bytes per N x K entry with float64 input, 12.0 with float32" in text
    assert "fits the given 1.6 GB: ~1,000,000 (float64 input), ~1,333,333 (float32 input)" in text
    assert ("at 0.5 of that limit, N=500,000: f64 input 0.5s (fit 0.5s) 11 it +0.80GB "
            "(fit 0.80GB) | f32 input 0.5s 11 it +0.60GB (fit 0.60GB)") in text


def test_limit_check_refuses_a_fraction_outside_0_1(capsys):
    with pytest.raises(SystemExit):
        clustering_scale.main(["--limit-check", "1.5"])
    assert "argument --limit-check: must be in (0, 1]" in capsys.readouterr().err
