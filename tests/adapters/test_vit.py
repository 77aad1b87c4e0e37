"""The small ViT of the vit-cpu benchmark (adapters.backbones.vit)."""

from __future__ import annotations

import pytest
import torch

import recon_aux
from adapters.backbones import ViTCIFAR, build_backbone


def test_vit_cifar_shapes_probe_points_and_size():
    model = build_backbone("vit_cifar")
    x = torch.rand(3, 3, 32, 32)
    assert model(x).shape == (3, 96) and model.out_dim == 96
    feats = model.forward_features(x, ["block2", "norm", "pool"])
    assert feats["block2"].shape == (3, 65, 96) and feats["pool"].shape == (3, 96)
    assert torch.equal(feats["pool"], feats["norm"][:, 0])  # the class token after the norm
    assert model.feature_shape("norm") == (65, 96) and model.feature_shape("pool") == (96,)
    assert sum(p.numel() for p in model.parameters()) == 458_592
    assert ViTCIFAR(dim=64, depth=2, heads=4, mlp_dim=128, patch_size=8)(x).shape == (3, 64)
    with pytest.raises(ValueError, match="multiple of heads"):
        ViTCIFAR(dim=96, heads=5)
    with pytest.raises(ValueError, match="must divide the input size"):
        ViTCIFAR(patch_size=5)


def test_recon_aux_taps_the_final_norm_and_trains_every_block():
    model = ViTCIFAR()
    aux = recon_aux.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           input_shape=(3, 32, 32))
    assert aux.layer_name == "norm"
    x = torch.rand(4, 3, 32, 32)
    model(x)
    aux.loss(x).backward()
    assert aux.last["reconstruction"].shape == x.shape
    for block in ("block1", "block4"):
        assert getattr(model, block).mlp[0].weight.grad.abs().sum() > 0


def test_run_config_recon_block_passes_the_tap_keywords_to_attach():
    from adapters.config import load_run_config

    cfg = load_run_config({"method": {"name": "simclr"}, "backbone": {"name": "vit_cifar"},
                           "recon": {"weight": 0.5, "prefix_tokens": 1, "grid": [8, 8],
                                     "layout": None}})
    assert cfg.recon.tap == {"prefix_tokens": 1, "grid": (8, 8), "layout": None}
    assert cfg.recon.config.weight == 0.5 and cfg.recon.layer is None
    model = ViTCIFAR()
    aux = recon_aux.attach(model, input_shape=(3, 32, 32), config=cfg.recon.config,
                           **cfg.recon.tap)
    assert aux.layer_name == "norm" and aux.head.in_size == (8, 8)
