"""On real CIFAR-10 images, the head alone learns to reconstruct from a frozen encoder."""

from __future__ import annotations

import pytest
import torch

import recon_aux
from adapters.backbones import AlexNetCIFAR
from adapters.data import balanced_subset, load_dataset


@pytest.mark.slow
def test_head_alone_learns_to_reconstruct(shared_data):
    torch.manual_seed(0)
    train = load_dataset("cifar10", data_root=shared_data, train=True)
    idx = balanced_subset(train.targets, 512 // 10 + 1, seed=0)[:512]
    images = torch.from_numpy(train.images[idx]).permute(0, 3, 1, 2).float() / 255
    encoder = AlexNetCIFAR(width=0.5).requires_grad_(False)  # frozen random encoder
    aux = recon_aux.attach(encoder, input_shape=(3, 32, 32))
    opt = torch.optim.Adam(aux.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    l2 = []
    for step in range(250):
        batch = images[torch.randint(0, len(images), (64,), generator=g)]
        if step == 0:  # the warning a frozen encoder gets, once
            with pytest.warns(RuntimeWarning, match="trains the head only"):
                encoder(batch)
        else:
            encoder(batch)
        loss = aux.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        l2.append(float(aux.last["l2"]))
    first, last = sum(l2[:10]) / 10, sum(l2[-10:]) / 10
    assert last <= 0.5 * first, f"L2 went from {first:.4f} to {last:.4f} in 250 steps"
    assert all(p.grad is None for p in encoder.parameters())
