"""The knobs that make the objective cheaper at scale: LPIPS windows and batch shares, the cap of
the head's default width (recon_aux.config, recon_aux.perceptual, recon_aux.head)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import recon_aux
from recon_aux import ConfigError, ReconAuxConfig
from recon_aux.perceptual import PerceptualLoss


def _calls(loss: PerceptualLoss) -> list[tuple]:
    """Record the shapes LPIPS is called with."""
    seen = []
    inner = loss.lpips.forward

    def spy(a, b, *args, **kwargs):
        seen.append((tuple(a.shape), tuple(b.shape)))
        return inner(a, b, *args, **kwargs)

    loss.lpips.forward = spy
    return seen


def test_lpips_reads_one_window_per_image_only_when_the_image_is_larger():
    torch.manual_seed(0)
    loss = PerceptualLoss(lpips_crop=48)
    seen = _calls(loss)
    small = torch.rand(4, 3, 48, 48)
    big = torch.rand(4, 3, 96, 80)
    loss.components(small, small.flip(0))
    parts = loss.components(big, big.flip(0))
    assert seen == [((4, 3, 48, 48),) * 2, ((4, 3, 48, 48),) * 2]
    # the same window in the reconstruction and its target: identical images give 0
    assert float(loss.components(big, big.clone())["lpips"]) == pytest.approx(0.0, abs=1e-6)
    # L2 always reads the whole image
    assert float(parts["l2"]) == pytest.approx(float(((big - big.flip(0)) ** 2).mean()))


def test_lpips_window_matches_the_same_crop_of_both_images():
    torch.manual_seed(1)
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    loss = PerceptualLoss(lpips_crop=40)
    state = loss.generator.get_state()
    got = float(loss.components(a, b)["lpips"])
    loss.generator.set_state(state)
    r, t = loss._sample(a, b)
    # each image's window is a contiguous 40x40 crop found at the same place in a and b
    for i in range(2):
        hits = [(y, x) for y in range(25) for x in range(25)
                if torch.equal(a[i, :, y:y + 40, x:x + 40], r[i])]
        assert len(hits) == 1 and torch.equal(b[i, :, hits[0][0]:hits[0][0] + 40,
                                                hits[0][1]:hits[0][1] + 40], t[i])
    whole = PerceptualLoss(lpips_crop=None)
    assert got != pytest.approx(float(whole.components(a, b)["lpips"]))


def test_lpips_sample_gradient_lands_on_each_window_of_each_drawn_image_only():
    torch.manual_seed(3)
    a, b = torch.rand(3, 3, 50, 60, requires_grad=True), torch.rand(3, 3, 50, 60)
    loss = PerceptualLoss(lpips_crop=32, lpips_fraction=0.5)  # windows of 2 of the 3 images
    r, t = loss._sample(a, b)
    g = torch.randn_like(r)
    grad, = torch.autograd.grad((r * g).sum(), a)
    expected = torch.zeros_like(a)
    for i in range(r.shape[0]):
        hits = [(j, y, x) for j in range(3) for y in range(19) for x in range(29)
                if torch.equal(a[j, :, y:y + 32, x:x + 32], r[i])]
        assert len(hits) == 1
        j, y, x = hits[0]
        assert torch.equal(b[j, :, y:y + 32, x:x + 32], t[i])
        expected[j, :, y:y + 32, x:x + 32] += g[i]
    assert torch.equal(grad, expected)


def test_lpips_fraction_reads_a_random_share_and_is_unbiased():
    torch.manual_seed(2)
    a, b = torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32)
    half = PerceptualLoss(lpips_fraction=0.3)
    seen = _calls(half)
    half.components(a, b)
    assert seen[0][0][0] == 3  # ceil(0.3 * 8)
    full = float(PerceptualLoss().components(a, b)["lpips"])
    draws = [float(half.components(a, b)["lpips"]) for _ in range(300)]
    assert sum(draws) / len(draws) == pytest.approx(full, rel=0.03)
    assert min(draws) < full < max(draws)


def test_lpips_sampling_draws_nothing_from_the_global_rng_and_resumes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    aux = recon_aux.attach(model, opt, input_shape=(3, 64, 64), lpips_crop=32,
                           lpips_fraction=0.5)
    x = torch.rand(4, 3, 64, 64)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    model(x)
    aux.loss(x)
    assert torch.equal(before, torch.get_rng_state())
    state = aux.state_dict()
    model(x)
    expected = float(aux.loss(x).detach())
    aux.remove()
    fresh = recon_aux.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             input_shape=(3, 64, 64), lpips_crop=32, lpips_fraction=0.5)
    fresh.load_state_dict(state)
    model(x)
    # the same windows and the same share of the batch
    assert float(fresh.loss(x).detach()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad, match", [
    ({"lpips_fraction": 1.5}, "lpips_fraction=1.5 is more than the whole batch"),
    ({"lpips_fraction": 0.0}, "lpips_fraction=0.0"),
    ({"lpips_crop": 20}, "lpips_crop=20 is smaller than the 31x31"),
    ({"lpips_crop": 0}, "lpips_crop=0"),
    ({"head_min_width": 64, "head_max_width": 32}, "head_min_width=64 is above head_max_width"),
])
def test_cost_knobs_refuse_bad_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        ReconAuxConfig(**bad)


def test_head_width_is_capped_for_wide_encoders_and_old_heads_still_load():
    model = torchvision.models.resnet50(weights=None)
    model.fc = nn.Identity()
    aux = recon_aux.attach(model, input_shape=(3, 64, 64), lpips_weight=0.0)
    assert aux.head.channels[0] == 128  # 2048 // 4 capped
    wide = recon_aux.attach(torchvision.models.resnet50(weights=None), input_shape=(3, 64, 64),
                            lpips_weight=0.0, head_max_width=512)
    assert wide.head.channels[0] == 512
    # a checkpoint written before the cap existed (its spec has no max_width: cap 512)
    state = wide.state_dict()
    state["_extra_state"]["head_spec"].pop("max_width")
    with pytest.raises(ValueError, match="head_max_width=512"):
        aux.load_state_dict(state)
    old = recon_aux.attach(torchvision.models.resnet50(weights=None), input_shape=(3, 64, 64),
                           lpips_weight=0.0, head_max_width=512)
    old.load_state_dict(state)
    # a narrow encoder's old head is the same head under either cap
    small = recon_aux.attach(nn.Sequential(nn.Conv2d(3, 64, 3, stride=4)), lpips_weight=0.0,
                             input_shape=(3, 32, 32))
    legacy = small.state_dict()
    legacy["_extra_state"]["head_spec"].pop("max_width")
    again = recon_aux.attach(nn.Sequential(nn.Conv2d(3, 64, 3, stride=4)), lpips_weight=0.0,
                             input_shape=(3, 32, 32))
    again.load_state_dict(legacy)
