"""Any encoder: ViTs, Swin, timm models and residual/inception/dense nets.

For each family: the layer ``layer=None`` picks, the auxiliary gradient reaching the first block
(not only a stem), the reconstruction's shape, and a state_dict round trip into a fresh attach.
Then token maps (prefix tokens, grids, channels-last), entry points other than ``forward``
(timm's ``forward_features``), refusals, and the loops' features on a ViT (two views, momentum
copies, multi-level taps, autocast, torch.compile, DDP).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.swin_transformer import SwinTransformer

import recon_aux
from adapters.backbones import AlexNetCIFAR, ResNet18CIFAR
from recon_aux import PairingError
from recon_aux.layers import LayerChoiceError
from tests.helpers import REPO
from tests.helpers import free_port as _free_port
from tests.recon_aux.test_loops import _grads

timm = pytest.importorskip("timm")

X = 32  # image side


def images(n: int = 4, seed: int = 0, size: int = X) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- the families ----------------------------------------------------------------------------------
def tv_vit() -> nn.Module:
    return VisionTransformer(image_size=X, patch_size=4, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64)


def tv_swin() -> nn.Module:
    return SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                           window_size=[4, 4])


def timm_vit(**kw) -> nn.Module:
    kw = dict(dict(img_size=X, patch_size=4, depth=2, embed_dim=32, num_heads=2), **kw)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)


def timm_deit() -> nn.Module:  # class + distillation token
    return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=X,
                             patch_size=4, depth=2, embed_dim=32, num_heads=2)


def timm_swin() -> nn.Module:
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=X,
                             window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2))


def resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


# (builder, expected layer, a parameter of the first block, map shape C x h x w, prefix tokens)
FAMILIES = {
    "torchvision-vit": (tv_vit, "encoder.ln",
                        "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
                        (32, 8, 8), 1),
    "torchvision-swin": (tv_swin, "norm", "features.1.0.attn.qkv.weight", (32, 8, 8), 0),
    "timm-vit-registers": (lambda: timm_vit(reg_tokens=4, class_token=True), "norm",
                           "blocks.0.attn.qkv.weight", (32, 8, 8), 5),
    "timm-deit-distilled": (timm_deit, "norm", "blocks.0.attn.qkv.weight", (32, 8, 8), 2),
    "timm-swin": (timm_swin, "norm", "layers.0.blocks.0.attn.qkv.weight", (48, 4, 4), 0),
    "timm-convnext": (lambda: timm.create_model("convnext_atto", pretrained=False), "stages.3",
                      "stages.0.blocks.0.conv_dw.weight", (320, 1, 1), 0),
    "googlenet": (lambda: torchvision.models.googlenet(weights=None, aux_logits=False,
                                                       init_weights=False),
                  "inception5b", "inception3a.branch1.conv.weight", (1024, 1, 1), 0),
    "densenet121": (lambda: torchvision.models.densenet121(weights=None),
                    "features.denseblock4", "features.denseblock1.denselayer1.conv1.weight",
                    (1024, 1, 1), 0),
    "resnet18": (resnet18, "layer4.1.conv2", "layer1.0.conv1.weight", (512, 1, 1), 0),
    "resnet18-cifar": (lambda: ResNet18CIFAR(width=0.25), "layer4.1.conv2",
                       "layer1.0.conv1.weight", (128, 4, 4), 0),
    # timm zero-initialises each block's last BN: no gradient enters a branch at step 0, the
    # stem's conv is the first to get one
    "timm-resnet18": (lambda: timm.create_model("resnet18", pretrained=False), "layer4.1.conv2",
                      "conv1.weight", (512, 1, 1), 0),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), "layer4.2.conv3",
                 "layer1.0.conv1.weight", (2048, 1, 1), 0),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return FAMILIES[name][0]().train()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_layer_gradient_shape_and_round_trip(family):
    _, layer, first_block, fmap, prefix = FAMILIES[family]
    model = build(family)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    aux = recon_aux.attach(model, opt, lpips_weight=0.0)
    x = images()
    model(x)
    loss = aux.loss(x)  # the objective alone: every encoder gradient below comes from it
    assert aux.layer_name == layer
    assert (aux.head.in_channels, *aux.head.in_size) == fmap
    assert aux.tap.layouts[layer].prefix == prefix
    assert aux.last["reconstruction"].shape == x.shape
    loss.backward()
    grad = dict(model.named_parameters())[first_block].grad
    assert grad is not None and grad.abs().sum() > 0, "the objective did not reach the 1st block"
    opt.step()
    # state_dict round trip into a fresh model and attach: same head, same layer, same layout
    fresh = build(family)
    aux2 = recon_aux.attach(fresh, lpips_weight=0.0)
    aux2.load_state_dict(aux.state_dict())
    assert aux2.layer_name == layer and aux2.tap.layouts == aux.tap.layouts
    for a, b in zip(aux.head.state_dict().values(), aux2.head.state_dict().values()):
        assert torch.equal(a, b)
    fresh(x)
    assert torch.isfinite(aux2.loss(x))


class DataParallelFeatures(nn.Module):
    """DeepCluster's AlexNet wraps ``features`` in nn.DataParallel: a wrapper, not a block."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.DataParallel(nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU()))

    def forward(self, x):
        return self.features(x).mean((2, 3))


def test_resnet_tap_is_the_residual_branch_not_the_shortcut():
    # One block per stage: layer4.0 has a downsample shortcut, whose conv runs after conv2 in
    # torchvision's BasicBlock; the tap is still the branch's last conv, not the shortcut's.
    from torchvision.models.resnet import BasicBlock, ResNet
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    aux = recon_aux.attach(model, input_shape=(3, X, X), lpips_weight=0.0)
    assert aux.layer_name == "layer4.0.conv2"
    aux.remove()
    # a ResNet whose last stage is post-processed by a block of another kind keeps that block
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), _LastBlock())
    aux = recon_aux.attach(model, input_shape=(3, X, X), lpips_weight=0.0)
    assert aux.layer_name == "1"


class _LastBlock(nn.Module):
    """A residual BasicBlock followed, inside one block, by another conv: the block's output is
    not the BasicBlock's, so its branch conv is not the representation."""

    def __init__(self) -> None:
        super().__init__()
        from adapters.backbones.resnet import BasicBlock
        self.res = BasicBlock(3, 8)
        self.post = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.post(self.res(x))


def test_plain_cnns_keep_the_last_conv(tiny_alexnet):
    # the benchmarks' encoders tap what they tapped before: AlexNet-style nets have no blocks
    for model, expected in ((AlexNetCIFAR(width=0.25), "conv5.0"), (tiny_alexnet, "features.13"),
                            (torchvision.models.vgg11(), "features.18"),
                            (DataParallelFeatures(), "features.module.3")):
        aux = recon_aux.attach(model, input_shape=(3, X, X), lpips_weight=0.0)
        assert aux.layer_name == expected
        aux.remove()


def test_input_shape_builds_the_token_head_before_any_forward():
    # Lightning's pattern: attach in __init__ with input_shape (a dry forward), no optimizer
    model = timm_vit()
    aux = recon_aux.attach(model, input_shape=(3, X, X), lpips_weight=0.0)
    assert aux.layer_name == "norm" and aux.head.in_size == (8, 8)
    assert aux.tap.pending == []
    x = images()
    model(x)
    assert aux.loss(x).requires_grad
    assert aux.reconstruct(x).shape == x.shape


# -- entry points ------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [None, "blocks.1"])
def test_forward_features_is_captured(layer):
    model = timm_vit().train()
    aux = recon_aux.attach(model, layer=layer, lpips_weight=0.0)
    x0, x1 = images(seed=0), images(seed=1)
    model.forward_features(x0), model.forward_features(x1)  # hooks of forward never run
    recon = aux.loss(x1) + aux.loss(x0)  # paired by identity
    assert aux.layer_name == (layer or "norm") and aux.tap.stem == "patch_embed.proj"
    recon.backward()  # the reconstruction alone: its gradient must reach the first block
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(PairingError, match="already used"):
        aux.loss(x0)
    # forward_head after forward_features, and forward itself, still pair as before
    model(x0)
    assert torch.isfinite(aux.loss(x0))


def test_entry_point_that_stops_before_the_tapped_layer_says_so():
    model = AlexNetCIFAR(width=0.25).train()
    aux = recon_aux.attach(model, lpips_weight=0.0, input_shape=(3, X, X))
    x = images()
    model.forward_features(x, ["conv2"])  # enters at the stem, stops before conv5
    with pytest.raises(PairingError, match="entered at the stem 'conv1.0'.*not run the tapped"):
        aux.loss(x)
    model.forward_features(x, ["conv5"])
    assert torch.isfinite(aux.loss(x))


class LinearEmbedViT(nn.Module):
    """Patches by unfold + Linear (no Conv2d), then a transformer block: no stem to watch."""

    def __init__(self, prefix: int = 1, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(3 * 16 * 16, dim)
        self.prefix = nn.Parameter(torch.zeros(1, prefix, dim))
        self.block = nn.TransformerEncoderLayer(dim, 2, 32, batch_first=True, dropout=0.0)

    def tokens(self, x):
        p = nn.functional.unfold(x, 16, stride=16).transpose(1, 2)
        t = self.embed(p)
        return self.block(torch.cat([self.prefix.expand(len(t), -1, -1), t], 1))

    def forward(self, x):
        return self.tokens(x)[:, 0]


def test_entry_without_conv_stem_pairs_by_batch_size_and_says_when_ambiguous():
    model = LinearEmbedViT()
    aux = recon_aux.attach(model, layer="block", prefix_tokens=1, lpips_weight=0.0)
    x = images()
    model.tokens(x)  # not model(x): the capture's input is unknown
    loss = aux.loss(x)
    assert aux.head.in_size == (2, 2) and torch.isfinite(loss)
    model.tokens(x)
    model.tokens(images(seed=1))
    with pytest.raises(PairingError, match="ambiguous"):
        aux.loss(x)


# -- token maps: prefix tokens, grids, layouts ---------------------------------------------------
def test_ambiguous_token_count_names_the_fix():
    # 5 tokens on a 32 px image: 1 prefix + 2x2 patches, or 4 + 1x1. Without a conv stem whose
    # grid would settle it, recon_aux asks; prefix_tokens= or grid= answers.
    x = images()
    model = LinearEmbedViT()
    aux = recon_aux.attach(model, layer="block", lpips_weight=0.0)
    model(x)
    with pytest.raises(ValueError, match="ambiguous.*prefix_tokens"):
        aux.loss(x)
    aux.remove()
    for kw in ({"prefix_tokens": 1}, {"grid": (2, 2)}):
        aux = recon_aux.attach(model, layer="block", lpips_weight=0.0, **kw)
        model(x)
        aux.loss(x)
        assert aux.head.in_size == (2, 2) and aux.tap.layouts["block"].prefix == 1
        aux.remove()
    with pytest.raises(ValueError, match=r"prefix_tokens=-1 must be an int >= 0"):
        recon_aux.attach(model, prefix_tokens=-1)
    with pytest.raises(ValueError, match=r"grid=\(2,\) must be \(h, w\)"):
        recon_aux.attach(model, grid=(2,))


@pytest.mark.parametrize("kw, problem, fix", [
    ({"prefix_tokens": 5}, "prefix_tokens=5 but the tapped layer 'block' returned 5 tokens",
     "or prefix_tokens=None to infer it"),
    ({"grid": (3, 3)}, "grid=(3, 3) has 9 cells but the tapped layer 'block' returned 5 tokens",
     "or grid=None to infer it"),
])
def test_token_settings_that_do_not_fit_the_tokens_name_the_fix(kw, problem, fix):
    model = LinearEmbedViT()  # 1 prefix + 2x2 patch tokens on 32 px
    aux = recon_aux.attach(model, layer="block", lpips_weight=0.0, **kw)
    model(images())
    with pytest.raises(ValueError) as err:
        aux.loss(images())
    assert problem in str(err.value) and fix in str(err.value)


@pytest.mark.parametrize("grid", [None, (2, 2)])
def test_tokens_that_form_no_patch_grid_are_refused_not_reshaped(grid):
    """13 tokens, 1 of them declared prefix: 12 patch tokens form no patch grid of a 32 px image
    (they were reshaped to 3x4, a grid the tokens do not have)."""
    model = LinearEmbedViT(prefix=9)  # 9 + 2x2 tokens
    aux = recon_aux.attach(model, layer="block", prefix_tokens=1, grid=grid, lpips_weight=0.0)
    model(images())
    given = r" \(grid=\(2, 2\) has 4 cells\)" if grid else ""
    with pytest.raises(ValueError, match=rf"'block' has 12 patch tokens{given}, which form no "
                                         r"patch grid of \(32, 32\) images.*pass its grid="):
        aux.loss(images())


def test_a_tapped_layer_that_changes_form_names_the_fix():
    """Tokens at the first forward, a 4-D map at the next (and the other way round)."""
    tokens, maps = (4, 5, 16), (4, 16, 2, 2)
    for first, then in ((tokens, maps), (maps, tokens)):
        model = nn.Sequential(nn.Conv2d(3, 16, 16, stride=16), nn.Identity())
        outputs = iter([torch.rand(first, requires_grad=True),
                        torch.rand(then, requires_grad=True)])
        model[1].register_forward_hook(lambda *_, out=outputs: next(out))
        aux = recon_aux.attach(model, layer="1", lpips_weight=0.0)
        model(images())
        aux.loss(images())
        model(images())
        with pytest.raises(ValueError, match="before and now .*the same form every forward: "
                                             r"tap a layer whose output keeps its form"):
            aux.loss(images())


def test_non_square_grid_and_explicit_grid():
    model = timm_vit(img_size=(32, 48))
    aux = recon_aux.attach(model, lpips_weight=0.0)
    x = torch.rand(2, 3, 32, 48)
    model(x)
    aux.loss(x)
    assert aux.head.in_size == (8, 12) and aux.last["reconstruction"].shape == x.shape
    aux.remove()
    aux = recon_aux.attach(model, grid=(8, 12), lpips_weight=0.0)
    model(x)
    aux.loss(x)
    assert aux.tap.layouts["norm"].prefix == 1 and aux.head.in_size == (8, 12)


class Maps(nn.Module):
    """Returns a 4-D tensor whose layout its shape cannot tell: N x 8 x 8 x 8 on 32 px."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.out = nn.Identity()

    def forward(self, x):
        return self.out(self.conv(x)).mean((2, 3))


def test_ambiguous_channels_last_map_asks_for_layout():
    model = Maps()
    aux = recon_aux.attach(model, layer="out", lpips_weight=0.0)
    x = images()
    model(x)
    with pytest.raises(ValueError, match="layout='nchw'"):
        aux.loss(x)
    aux.remove()
    aux = recon_aux.attach(model, layer="out", layout="nchw", lpips_weight=0.0)
    model(x)
    aux.loss(x)
    assert aux.tap.layouts["out"].kind == "nchw"
    with pytest.raises(ValueError, match=r"layout='NHWC' must be one of \('nchw', 'nhwc'\)"):
        recon_aux.attach(nn.Conv2d(3, 3, 1), layout="NHWC")


class TupleBlock(nn.Module):
    def __init__(self, extra: bool) -> None:
        super().__init__()
        self.conv, self.extra = nn.Conv2d(3, 8, 3, padding=1), extra

    def forward(self, x):
        y = self.conv(x)
        return (y, y.mean()) if self.extra else (y, None)


def test_tuple_outputs_accepted_or_refused_clearly():
    x = images()
    model = nn.Sequential(TupleBlock(extra=False))
    aux = recon_aux.attach(model, layer="0", lpips_weight=0.0)
    model(x)
    assert torch.isfinite(aux.loss(x))
    model = nn.Sequential(TupleBlock(extra=True))
    aux = recon_aux.attach(model, layer="0", lpips_weight=0.0)
    with pytest.raises(ValueError, match=r"returned a tuple of \[\(4, 8, 32, 32\), \(\)\]"):
        model(x)


# -- never a stem ----------------------------------------------------------------------------------
class MixerLike(nn.Module):
    """Conv patch embedding, then token-mixing MLPs (no attention module to recognise)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16))
                                      for _ in range(2)])

    def forward(self, x):
        return self.blocks(self.stem(x).flatten(2).transpose(1, 2)).mean(1)


def test_a_stem_is_never_picked_silently():
    model = MixerLike()
    aux = recon_aux.attach(model, lpips_weight=0.0)
    with pytest.raises(LayerChoiceError, match=r"'stem'.*is a stem.*layer='blocks.1'"):
        model(images())
    aux.remove()
    aux = recon_aux.attach(model, layer="blocks.1", lpips_weight=0.0)  # as the error says
    x = images()
    model(x)
    aux.loss(x).backward()
    assert model.blocks[0][1].weight.grad.abs().sum() > 0


# -- the loops' features on a ViT ----------------------------------------------------------------
def test_vit_two_views_momentum_copy_and_multi_level():
    student = timm_vit(depth=3).train()
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    aux = recon_aux.attach(student, opt, layer=["blocks.0", "blocks.1", "blocks.2"],
                           lpips_weight=0.0)
    teacher = copy.deepcopy(student)  # DINO's teacher, copied after attach: never captured
    x0, x1 = images(seed=0), images(seed=1)
    s0, s1 = student(x0), student(x1)
    with torch.no_grad():
        t0, t1 = teacher(x0), teacher(x1)
    assert len(aux.tap.pending) == 2
    loss = (s0 - t1).pow(2).mean() + (s1 - t0).pow(2).mean() + aux.loss(x0) + aux.loss(x1)
    assert aux.head.levels == 3 and aux.head.in_channels == (32, 32, 32)
    assert aux.last["reconstruction"].shape == x1.shape
    loss.backward()
    assert all(lat[0].weight.grad.abs().sum() > 0 for lat in aux.head.laterals)
    assert all(p.grad is None for p in teacher.parameters())
    opt.step()


def test_vit_autocast_bf16():
    model = tv_vit()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    aux = recon_aux.attach(model, opt)  # with LPIPS
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = out.float().pow(2).mean() + aux.loss(x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    opt.step()


def seeded_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm_vit()


@pytest.mark.parametrize("order", ["attach_then_compile", "compile_then_attach"])
@pytest.mark.parametrize("choice", ["named", pytest.param("layer_none", marks=pytest.mark.slow)])
def test_vit_torch_compile_gives_eager_gradients(order, choice):
    # layer=None chooses from one forward hooked at every module; those hooks run eagerly
    # (graph breaks), so that compiled first forward traces slowly (slow test).
    def kw(backend):
        if choice == "layer_none":
            return {}
        compiled_root = backend and order == "compile_then_attach"
        return {"layer": "_orig_mod.blocks.1" if compiled_root else "blocks.1"}

    eager = _grads(order, None, build=seeded_vit, **kw(None))
    compiled = _grads(order, "aot_eager", build=seeded_vit, **kw("aot_eager"))
    for name, g in eager.items():
        torch.testing.assert_close(compiled[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # and the reconstruction term really reaches the first block: the base loss alone (same
    # weights, same images as _grads) gives another gradient there
    base = seeded_vit()
    base(torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))).pow(2).mean() \
        .backward()
    first = "blocks.0.attn.qkv.weight"
    assert not torch.allclose(base.get_parameter(first).grad, eager[first])


DDP_SCRIPT = textwrap.dedent("""
    import json, torch, torch.distributed as dist, timm, recon_aux
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=4, depth=2, embed_dim=32, num_heads=2)
    net = DDP(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    aux = recon_aux.attach(net, opt, lpips_weight=0.0)
    g = torch.Generator().manual_seed(100 + dist.get_rank())
    for _ in range(2):
        x = torch.rand(4, 3, 32, 32, generator=g)
        loss = net(x).pow(2).mean() + aux.loss(x)
        opt.zero_grad(); loss.backward(); opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in aux.parameters()])
    out = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(out, flat)
    if dist.get_rank() == 0:
        print(json.dumps({"layer": aux.layer_name, "agree": torch.equal(*out)}))
    # As ddp_loop.py: drop the DDP wrapper (its reducer holds the process group) before gloo is
    # torn down, or a rank can abort at exit ("terminate called without an active exception").
    import gc
    del net, aux, opt, model
    gc.collect()
    dist.barrier(); dist.destroy_process_group()
""")


@pytest.mark.slow
def test_vit_under_ddp(tmp_path):
    script = tmp_path / "ddp_vit.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("{"))
    assert '"layer": "module.norm"' in line and '"agree": true' in line
