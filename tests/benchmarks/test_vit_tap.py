"""The ViT tap study trains both taps and scores them at a tiny size on random images (its
numbers mean nothing here): the tapped layers are the ones it names, both taps start from the
same weights, and the table holds every metric for every setting."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")

from benchmarks.studies import vit_tap  # noqa: E402


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    floats = lambda n: torch.rand(n, 3, 32, 32, generator=g)  # noqa: E731
    labels = lambda n: torch.arange(n) % 10  # noqa: E731
    return {"train_u8": torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g),
            "bank_x": floats(40), "bank_y": labels(40), "query_x": floats(20),
            "query_y": labels(20), "recon_x": floats(6)}


def test_both_taps_start_from_the_same_weights_and_tap_what_they_name(data, monkeypatch):
    tapped, first = [], []
    attach = vit_tap.recon_aux.attach

    def spy(model, *args, **kwargs):
        tapped.append(kwargs["layer"])
        first.append(model.patch_embed.proj.weight.detach().clone())
        return attach(model, *args, **kwargs)

    monkeypatch.setattr(vit_tap.recon_aux, "attach", spy)
    args = type("Args", (), {"steps": 2, "batch_size": 8})()
    rows = {tap: vit_tap.train(tap, 0, data, args) for tap in vit_tap.TAPS}
    assert tapped == ["blocks.3", "norm"]
    assert torch.equal(first[0], first[1])
    for row in rows.values():
        assert set(row) == {"l2", "lpips", "knn_cls", "knn_patch_mean", "seconds"}
        assert 0 <= row["knn_cls"] <= 100 and row["l2"] > 0 and row["lpips"] > 0


def test_report_gives_every_metric_per_setting_and_the_seeds_where_norm_is_lower():
    rows = {}
    for s, (block, norm) in enumerate([(0.5, 0.4), (0.3, 0.35)]):
        rows[("random", s)] = {"knn_cls": 10.0, "knn_patch_mean": 11.0}
        for tap, v in (("block", block), ("norm", norm)):
            rows[(tap, s)] = {"l2": v / 10, "lpips": v, "knn_cls": 20.0, "knn_patch_mean": 21.0,
                              "seconds": 30.0}
    text = vit_tap.report(rows, [0, 1], "HEADER")
    assert text.startswith("HEADER\n")
    assert "test LPIPS-alex  tap norm (after)" in text and "(0.4000, 0.3500)" in text
    assert text.count("norm lower than block  1/2 seeds") == 2
    assert "kNN class token  untrained" in text and "training time, all runs: 2.0 min" in text
