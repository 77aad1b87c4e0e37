"""The FLOP study: the objective adds FLOPs in the order the variants promise, and the LPIPS
per-layer table finds the 1 x 1 maps where they are (AlexNet at 32 px: the last three)."""

from __future__ import annotations

import pytest

from benchmarks.studies import flops


def test_lpips_layers_at_32_px_end_in_three_1x1_maps():
    layers = flops.lpips_layer_flops("alex", 32)
    assert [hw for _, hw, _ in layers] == [(7, 7), (3, 3), (1, 1), (1, 1), (1, 1)]
    assert all(f > 0 for _, _, f in layers)
    assert [hw for _, hw, _ in flops.lpips_layer_flops("alex", 64)][2:] == [(3, 3)] * 3


@pytest.mark.slow  # six forward + backward passes of AlexNet-CIFAR
def test_recon_variants_cost_more_than_base_and_half_batch_less_than_full(tmp_path):
    model = flops.MODELS["alexnet_cifar"]
    base, l2, full, half = (flops.step_flops(model, flops.VARIANTS[v], batch=4) for v in
                            ("base", "+L2", "+L2+LPIPS-alex", "+L2+LPIPS-alex, half batch"))
    assert base < l2 < half < full
    out = tmp_path / "flops.md"
    assert flops.main(["--models", "alexnet_cifar", "--variants", "base", "+L2",
                       "--batch-size", "2", "--lpips-sizes", "32", "--write", str(out)]) == 0
    text = out.read_text()
    assert "| alexnet_cifar" in text and "| 32 px | 7x7" in text and "1 x 1 maps: share" in text
