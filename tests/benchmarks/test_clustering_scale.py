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
