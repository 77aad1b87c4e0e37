"""The examples in examples/ run for a few steps (on a generated ImageFolder, so no download and
no ../shared are needed; with real data they take --data-root)."""

from __future__ import annotations

import csv
import hashlib
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import REPO

EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """train/ and test/ splits of 3 classes of 32x32 PNGs with class-dependent colours."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 6)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                img[..., c] = img[..., c] // 2 + 128
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny(folder, *extra):
    return ["--dataset", str(folder), "--batch-size", "8", "--max-steps", "2", "--epochs", "1",
            "--width", "0.125", "--workers", "0", "--device", "cpu", *extra]


@pytest.mark.parametrize("name", ["lightly_simclr", "lightly_byol", "lightly_swav",
                                  "lightly_vit_dino"])
@pytest.mark.parametrize("recon", ["--recon", "--no-recon"])
def test_plain_loop_examples_run(name, recon, image_folder, tmp_path, capsys):
    pictures = tmp_path / "rec.png"
    top1 = load(name).main(tiny(image_folder, recon, "--pictures", str(pictures)))
    out = capsys.readouterr().out
    assert 0.0 <= top1 <= 100.0 and "kNN top-1" in out
    assert ("recon l2" in out) == (recon == "--recon")
    assert pictures.is_file() == (recon == "--recon")


def test_vit_dino_example_taps_the_last_block(image_folder, capsys):
    top1 = load("lightly_vit_dino").main(tiny(image_folder, "--depth", "2"))
    out = capsys.readouterr().out
    assert 0.0 <= top1 <= 100.0
    # the last block's tokens after the final norm, 64 patch tokens as an 8x8 map (not the
    # patch embedding)
    assert "recon-aux tapped vit.vit.encoder.ln (24 x 8 x 8 map)" in out


def test_lightning_example_trains_checkpoints_and_resumes(image_folder, tmp_path, capsys):
    import pytorch_lightning as pl

    example = load("lightning_simclr")
    out = tmp_path / "logs"
    top1 = example.main(tiny(image_folder, "--out", str(out), "--pictures",
                             str(tmp_path / "rec.png")))
    assert 0.0 <= top1 <= 100.0 and (tmp_path / "rec.png").is_file()
    last = next(out.rglob("last.ckpt"))
    ckpt = torch.load(last, map_location="cpu", weights_only=False)  # Lightning's own file
    keys = list(ckpt["state_dict"])
    assert any(k.startswith("aux.head.") for k in keys) and "aux._extra_state" in keys
    assert not any("lpips" in k or "perceptual" in k for k in keys)
    assert ckpt["global_step"] == 2
    # the optimizer Lightning built holds every trainable parameter once, the head included
    (opt_state,) = ckpt["optimizer_states"]
    n_params = sum(len(g["params"]) for g in opt_state["param_groups"])
    fresh = example.SimCLR(example.backbone(example.parser("").parse_args(tiny(image_folder))))
    assert n_params == len([p for p in fresh.parameters() if p.requires_grad])
    # resume: two more steps from the checkpoint (steps 2 and 3 only are trained and logged)
    logs2 = tmp_path / "logs2"
    resumed = example.main(tiny(image_folder, "--out", str(logs2), "--resume", str(last),
                                "--max-steps", "4", "--epochs", "5"))
    assert 0.0 <= resumed <= 100.0
    assert "after 4 steps" in capsys.readouterr().out
    rows = list(csv.DictReader(next(logs2.rglob("metrics.csv")).open()))
    assert sorted({int(r["step"]) for r in rows if r.get("train_loss")}) == [2, 3]
    # the resume verified the side file written with the checkpoint; a changed file, a file
    # without one, or a remote path is refused before any work, as one line
    side = last.with_name(last.name + ".sha256")
    assert side.read_text().strip() == hashlib.sha256(last.read_bytes()).hexdigest()
    for name, data, keep_side, match in (
            ("changed.ckpt", last.read_bytes() + b"x", True, "does not match"),
            ("bare.ckpt", last.read_bytes(), False, "no bare.ckpt.sha256 beside it")):
        bad = tmp_path / name
        bad.write_bytes(data)
        if keep_side:
            bad.with_name(name + ".sha256").write_text(side.read_text())
        with pytest.raises(SystemExit) as exit_:
            example.main(tiny(image_folder, "--resume", str(bad)))
        assert exit_.value.code == 2 and match in capsys.readouterr().err
    with pytest.raises(SystemExit):
        example.main(tiny(image_folder, "--resume", "https://example.com/last.ckpt"))
    assert "give a local checkpoint file" in capsys.readouterr().err
    # the checkpoint loads strictly into a fresh module (head rebuilt from _extra_state)
    fresh.load_state_dict(ckpt["state_dict"])
    head_keys = [k for k in keys if k.startswith("aux.head.")]
    assert all(torch.equal(fresh.state_dict()[k], ckpt["state_dict"][k]) for k in head_keys)
    assert isinstance(fresh, pl.LightningModule)


def test_lightning_example_with_a_vit_taps_tokens_checkpoints_and_reloads(image_folder,
                                                                         tmp_path):
    """The Lightning loop with a Vision Transformer (vit_cifar): the objective taps the final
    norm's tokens as an 8x8 map, Lightning trains and checkpoints the token head, and a fresh
    module loads the checkpoint strictly."""
    example = load("lightning_simclr")
    argv = [a for a in tiny(image_folder, "--backbone", "vit_cifar")
            if a not in ("--width", "0.125")]
    top1 = example.main([*argv, "--out", str(tmp_path)])
    assert 0.0 <= top1 <= 100.0
    ckpt = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2
    fresh = example.SimCLR(example.backbone(example.parser("").parse_args(argv)))
    assert fresh.aux.layer_name == "norm" and fresh.aux.head.in_channels == 96  # not the stem
    fresh.load_state_dict(ckpt["state_dict"])  # strict: the token head rebuilt the same
    head = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("aux.head.")}
    assert head and all(torch.equal(fresh.state_dict()[k], v) for k, v in head.items())
    with pytest.raises(TypeError, match="width"):
        example.backbone(example.parser("").parse_args([*argv, "--width", "0.5"]))


def test_lightning_module_recon_changes_the_encoder_gradient(image_folder):
    example = load("lightning_simclr")
    args = example.parser("").parse_args(tiny(image_folder))
    torch.manual_seed(0)
    x0, x1 = torch.rand(8, 3, 32, 32), torch.rand(8, 3, 32, 32)
    grads = {}
    for recon in (False, True):
        torch.manual_seed(0)
        module = example.SimCLR(example.backbone(args), recon=recon)
        module.log = module.log_dict = lambda *a, **k: None  # no Trainer attached here
        module.training_step(((x0, x1), None, None), 0).backward()
        if recon:
            assert all(p.grad is not None for p in module.aux.parameters())
        grads[recon] = module.backbone.conv1[0].weight.grad.clone()
    assert not torch.allclose(grads[False], grads[True])


def test_lightning_trainer_trains_the_head_and_the_encoder(image_folder, tmp_path):
    import pytorch_lightning as pl
    from lightly.transforms import SimCLRTransform

    example = load("lightning_simclr")
    args = example.parser("").parse_args(tiny(image_folder))
    torch.manual_seed(0)
    module = example.SimCLR(example.backbone(args))
    head0 = {k: v.clone() for k, v in module.aux.state_dict().items() if torch.is_tensor(v)}
    conv0 = module.backbone.conv1[0].weight.detach().clone()
    loader = example.train_loader(args, SimCLRTransform(input_size=32, gaussian_blur=0.0))
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    head1 = module.aux.state_dict()
    assert any(not torch.equal(head0[k], head1[k]) for k in head0 if k.endswith("weight"))
    assert not torch.equal(conv0, module.backbone.conv1[0].weight)
    assert module.aux.calls == 4  # two views per step, two steps


def test_demo_recon_runs_on_real_cifar10(shared_data, tmp_path):
    """``make demo-recon`` (``python -m examples.demo``) at a tiny scale: pictures and metrics."""
    from examples import demo

    result = demo.main(["--data-root", str(shared_data), "--out", str(tmp_path), "--epochs", "1",
                        "--per-class", "20", "--test-per-class", "5", "--batch-size", "100"])
    assert (tmp_path / "reconstructions.png").is_file() and (tmp_path / "metrics.json").is_file()
    assert len(result["history"]) == 1 and result["settings"]["train_images"] == 200


@pytest.mark.parametrize("name", ["lightly_simclr", "lightly_byol", "lightly_swav",
                                  "lightly_vit_dino", "lightning_simclr"])
def test_examples_refuse_a_batch_larger_than_the_training_set(name, image_folder, capsys):
    """48 training images and batches of 64: only full batches train, so no step would run.
    Each example says so in one line (exit status 2) before it trains, instead of failing
    after its loop on a name no batch ever set."""
    argv = [a for a in tiny(image_folder) if a != "8"]
    argv.insert(argv.index("--batch-size") + 1, "64")
    with pytest.raises(SystemExit) as exit_:
        load(name).main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--batch-size 64 is more than the 48 training images" in err
    assert "Lower --batch-size or raise --per-class" in err


def test_examples_report_a_missing_data_folder_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        load("lightly_simclr").main(["--data-root", str(tmp_path / "absent"), "--epochs", "1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not an existing directory" in err
    assert "--data-root DIR" in err  # the fix, among the ways to name the folder


@pytest.mark.parametrize("flag", ["--epochs", "--batch-size", "--max-steps", "--per-class"])
def test_examples_refuse_counts_below_one(flag, image_folder, capsys):
    with pytest.raises(SystemExit) as exit_:
        load("lightly_simclr").main([*tiny(image_folder), flag, "0"])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be at least 1, got 0" in capsys.readouterr().err


def test_demo_recon_checks_its_arguments_before_loading_data(tmp_path, capsys):
    from examples import demo

    with pytest.raises(SystemExit):
        demo.main(["--per-class", "5", "--batch-size", "128", "--data-root", str(tmp_path)])
    assert "--batch-size 128 is more than the 50 training images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--data-root", str(tmp_path / "absent")])
    assert "is not an existing directory" in capsys.readouterr().err
