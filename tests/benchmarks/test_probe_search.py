"""The weight-decay search study: both searches on the same features, one report."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks.studies import probe_search


def test_compare_reports_both_searches_on_the_same_probes():
    g = torch.Generator().manual_seed(7)
    centres = torch.randn(10, 64, generator=g)
    y = torch.randint(0, 10, (1500,), generator=g)
    x = centres[y] * 0.35 + torch.randn(1500, 64, generator=g)
    lines = probe_search.compare(x[:1000], y[:1000], x[1000:], y[1000:], "cpu")
    rows = lines[1:8]  # one per candidate weight decay
    assert len(rows) == 7
    for row in rows:  # the same scores and plateau epochs from both searches
        top_seq, top_bat, ep_seq, ep_bat = re.findall(r"[\d.]+", row)[1:]
        assert top_seq == top_bat and ep_seq == ep_bat
    chosen = re.match(r"chosen: (\S+) / (\S+);", lines[8])
    assert chosen and chosen[1] == chosen[2]
    assert re.match(r"search epochs: sequential \d+ \(the candidates' sum\), batched \d+",
                    lines[9])
    assert lines[10].startswith("wall time, search + final fit: sequential ")


def test_refusals(capsys):
    with pytest.raises(SystemExit):
        probe_search.parse_args(["--device", "tpu"])
    assert "argument --device: invalid choice: 'tpu'" in capsys.readouterr().err
