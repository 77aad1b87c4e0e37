"""The FLOP study: the objective adds FLOPs in the order the variants promise, and the LPIPS
per-layer table finds the 1 x 1 maps where they are (AlexNet at 32 px: the last three)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks.studies import flops
from benchmarks.studies.encoders import Model


def test_lpips_layers_at_32_px_end_in_three_1x1_maps():
    layers = flops.lpips_layer_flops("alex", 32)
    assert [hw for _, hw, _ in layers] == [(7, 7), (3, 3), (1, 1), (1, 1), (1, 1)]
    assert all(f > 0 for _, _, f in layers)
    assert [hw for _, hw, _ in flops.lpips_layer_flops("alex", 64)][2:] == [(3, 3)] * 3


@pytest.mark.slow  # six forward + backward passes of AlexNet-CIFAR
def test_recon_variants_cost_more_than_base_and_half_batch_less_than_full(tmp_path, capsys):
    model = flops.MODELS["alexnet_cifar"]
    base, l2, full, half = (flops.step_cost(model, flops.VARIANTS[v], batch=4) for v in
                            ("base", "+L2", "+L2+LPIPS-alex", "+L2+LPIPS-alex, half batch"))
    assert base.flops < l2.flops < half.flops < full.flops
    assert base.saved_bytes < l2.saved_bytes < full.saved_bytes
    out = tmp_path / "flops.md"
    assert flops.main(["--models", "alexnet_cifar", "--variants", "base", "+L2",
                       "--batch-size", "2", "--lpips-sizes", "32", "--write", str(out)]) == 0
    text = out.read_text()
    assert "| base (GFLOPs per image) | 0.667 |" in text and "| base (MiB per image) |" in text
    assert "| +L2 / base | 1.028x |" in text  # the committed table's FLOP ratio
    assert "| 32 px | 7x7" in text and "1 x 1 maps: share" in text
    with pytest.raises(SystemExit):  # ratios need the base
        flops.main(["--models", "alexnet_cifar", "--variants", "+L2"])
    assert "--variants must include base" in capsys.readouterr().err


class _Tiny(nn.Module):
    """conv (3 -> 4 channels, 8 x 8) then ReLU: conv saves its input, ReLU its output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


def test_saved_bytes_count_each_activation_once_and_no_weights():
    """The base step of a conv + ReLU encoder (4 x 8 x 8 output) on a batch of 2: the input
    (2 x 3 x 8 x 8) kept by the conv, the ReLU's output (2 x 4 x 8 x 8) kept by the ReLU and
    by the linear head (one storage, counted once), the head's log-softmax (2 x 10), all
    float32, and the NLL loss's labels (2, int64) and total weight (one float32); the conv's
    and the head's weights are not activations."""
    model = Model(_Tiny, 8, "tiny")
    cost = flops.step_cost(model, None, batch=2)
    assert cost.saved_bytes == 4 * (2 * 3 * 8 * 8 + 2 * 4 * 8 * 8 + 2 * 10) + 8 * 2 + 4
