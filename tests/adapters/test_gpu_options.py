"""The engine's options for a GPU (``train.precision``, ``train.channels_last``,
``data.augment_on_device``, ``data.prefetch``, ``train.compile``) on the tiny data set: off, they
leave a run bit for bit as it was; prefetching never changes a run; bf16 autocast trains on the
CPU; fp16 is refused before anything is loaded where there is no CUDA; a compiled run trains as
the eager one and evaluates eagerly. The CUDA halves are marked ``cuda``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from adapters import devices, engine
from adapters.checkpoint import load_checkpoint
from adapters.config import RunConfigError, config_diff, load_run_config
from adapters.data import BatchLoader, ImageArrays
from adapters.devices import has_cxx_compiler
from adapters.engine import Trainer, check_run, train
from tests.adapters.tiny import tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cfg(tree, out, *overrides, **sections):
    return load_run_config(tiny_config(tree, out, **sections), overrides)


def weights(folder) -> dict[str, torch.Tensor]:
    state = load_checkpoint(folder / "checkpoint.pt")
    return {f"{part}.{k}": v for part in ("backbone", "method", "aux")
            for k, v in (state[part] or {}).items() if torch.is_tensor(v)}


def assert_same_weights(a, b) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_prefetch_changes_nothing_and_resumes_across_values(tiny_tree, tmp_path):
    plain = train(cfg(tiny_tree, tmp_path / "plain"))
    ahead = train(cfg(tiny_tree, tmp_path / "ahead", "data.prefetch=3"))
    assert ahead["metrics"] == plain["metrics"] and ahead["history"] == plain["history"]
    assert_same_weights(tmp_path / "plain", tmp_path / "ahead")
    # a run checkpointed with one value resumes with another (it is not part of the run)
    with pytest.raises(engine.StopTraining):
        train(cfg(tiny_tree, tmp_path / "cut", "data.prefetch=2", "run.stop_after_epoch=1"))
    train(cfg(tiny_tree, tmp_path / "cut", "run.resume=true"))
    assert_same_weights(tmp_path / "plain", tmp_path / "cut")


def test_options_off_or_on_cpu_keep_the_run_bit_for_bit(tiny_tree, tmp_path):
    plain = train(cfg(tiny_tree, tmp_path / "plain"))
    # on a CPU run, "augment on the training device" is the same computation
    same = train(cfg(tiny_tree, tmp_path / "same", "data.augment_on_device=true",
                     "train.precision=fp32", "train.channels_last=false"))
    assert same["metrics"] == plain["metrics"]
    assert_same_weights(tmp_path / "plain", tmp_path / "same")


def test_bf16_autocast_trains_on_cpu(tiny_tree, tmp_path, monkeypatch):
    seen = []
    real = torch.autocast

    def spy(device_type, dtype=None, **kw):
        if kw.get("enabled", True):  # (recon_aux switches autocast off around its float32 parts)
            seen.append((device_type, dtype))
        return real(device_type, dtype=dtype, **kw)

    monkeypatch.setattr(torch, "autocast", spy)
    plain = train(cfg(tiny_tree, tmp_path / "plain"))
    assert seen == []  # fp32: no autocast at all
    result = train(cfg(tiny_tree, tmp_path / "bf16", "train.precision=bf16"))
    assert seen and set(seen) == {("cpu", torch.bfloat16)}
    rows = result["history"]
    assert all(np.isfinite(r["method_loss"]) and np.isfinite(r["recon_loss"]) for r in rows)
    assert rows != plain["history"]  # the forward really ran in bfloat16
    for value in weights(tmp_path / "bf16").values():  # the weights stay float32
        assert not value.is_floating_point() or value.dtype == torch.float32


def test_channels_last_keeps_the_weights_in_that_format(tiny_tree, tmp_path):
    trainer = Trainer(cfg(tiny_tree, tmp_path / "cl", "train.channels_last=true",
                          "train.epochs=1"))
    convs = [p for p in trainer.backbone.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    result = trainer.fit()
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)  # still
    plain = train(cfg(tiny_tree, tmp_path / "plain", "train.epochs=1"))
    # the same training up to rounding (other kernels): the epoch's losses agree closely
    for key in ("method_loss", "recon_loss"):
        assert result["history"][0][key] == pytest.approx(plain["history"][0][key], rel=1e-3)
    # and the same evaluation: kNN within one image of 8 test images
    for key, value in plain["metrics"].items():
        if key.startswith("knn_"):
            assert abs(result["metrics"][key] - value) <= 100 / 8 + 1e-6, key


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_fp16_without_cuda_is_refused_before_anything(tiny_tree, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "load_dataset",
                        lambda *a, **k: pytest.fail("loaded data for a refused config"))
    bad = cfg(tiny_tree, tmp_path / "fp16", "train.precision=fp16")
    for attempt in (lambda: train(bad), lambda: check_run(bad)):
        with pytest.raises(RunConfigError, match="train.precision=fp16 needs a CUDA device.*"
                                                 "use bf16"):
            attempt()
    assert not (tmp_path / "fp16").exists()
    with pytest.raises(RunConfigError,
                       match="train.precision='fp8' must be one of 'fp32', 'bf16', 'fp16'"):
        cfg(tiny_tree, tmp_path, "train.precision=fp8")


def test_recorded_configs_without_the_new_keys_are_the_same_run(tiny_tree, tmp_path):
    new = cfg(tiny_tree, tmp_path)
    old = new.to_dict()
    for section, key in (("train", "precision"), ("train", "channels_last"),
                         ("data", "augment_on_device"), ("data", "prefetch"),
                         ("train", "compile"), ("train", "compile_backend")):
        del old[section][key]
    assert config_diff(old, new) == []
    assert config_diff(old, new.override("data.prefetch=4")) == []
    assert config_diff(old, new.override("train.precision=bf16")) == ["train.precision"]
    assert config_diff(old, new.override("train.channels_last=true")) == ["train.channels_last"]
    assert config_diff(old, new.override("train.compile=default")) == ["train.compile"]


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _count_evaluation_graphs(monkeypatch) -> list[int]:
    """Graphs compiled while ``Trainer.evaluate`` ran, one entry per call."""
    compiled, evaluate = [], Trainer.evaluate

    def spy(self):
        before = _graphs()
        out = evaluate(self)
        compiled.append(_graphs() - before)
        return out

    monkeypatch.setattr(Trainer, "evaluate", spy)
    return compiled


def test_compiled_run_trains_as_the_eager_one_and_resumes(tiny_tree, tmp_path, monkeypatch):
    # aot_eager runs dynamo and AOTAutograd (graph capture, the hooks) without a C++ compiler
    opts = ("train.compile=default", "train.compile_backend=aot_eager")
    torch._dynamo.reset()
    plain = train(cfg(tiny_tree, tmp_path / "plain"))
    # a compiled base run first, as in a bench: its graphs must not serve the hooked backbone
    train(cfg(tiny_tree, tmp_path / "base", *opts, recon=None))
    evaluation_graphs = _count_evaluation_graphs(monkeypatch)
    before = _graphs()
    full = train(cfg(tiny_tree, tmp_path / "full", *opts))
    assert _graphs() > before  # the training forward really was compiled
    assert evaluation_graphs == [0]  # the evaluation ran eagerly
    for a, b in zip(full["history"], plain["history"], strict=True):
        for key in ("method_loss", "recon_loss", "recon_l2", "recon_lpips"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    wf, wp = weights(tmp_path / "full"), weights(tmp_path / "plain")
    assert wf.keys() == wp.keys()  # compiled in place: the checkpoint's names are unchanged
    for key in wp:
        torch.testing.assert_close(wf[key], wp[key], rtol=1e-4, atol=1e-5, msg=key)
    with pytest.raises(engine.StopTraining):
        train(cfg(tiny_tree, tmp_path / "cut", *opts, "run.stop_after_epoch=1"))
    resumed = train(cfg(tiny_tree, tmp_path / "cut", *opts, "run.resume=true"))
    assert resumed["history"] == full["history"]
    assert_same_weights(tmp_path / "full", tmp_path / "cut")


@pytest.mark.slow
@pytest.mark.skipif(not has_cxx_compiler(),
                    reason="inductor on the CPU needs a C++ compiler")
def test_inductor_compiled_run_trains_as_the_eager_one(tiny_tree, tmp_path):
    torch._dynamo.reset()
    plain = train(cfg(tiny_tree, tmp_path / "plain"))
    fast = train(cfg(tiny_tree, tmp_path / "fast", "train.compile=default"))
    for a, b in zip(fast["history"], plain["history"], strict=True):
        assert a["method_loss"] == pytest.approx(b["method_loss"], rel=1e-3)
        assert a["recon_loss"] == pytest.approx(b["recon_loss"], rel=1e-3)


def test_compile_settings_are_refused_before_anything(tiny_tree, tmp_path, monkeypatch):
    with pytest.raises(RunConfigError, match="train.compile=reduce-overhead is a mode of the "
                                             "inductor backend.*use train.compile=default"):
        cfg(tiny_tree, tmp_path, "train.compile=reduce-overhead",
            "train.compile_backend=aot_eager")
    with pytest.raises(RunConfigError, match="train.compile='fast' must be one of 'default', "
                                             "'reduce-overhead'"):
        cfg(tiny_tree, tmp_path, "train.compile=fast")
    monkeypatch.setattr(engine, "load_dataset",
                        lambda *a, **k: pytest.fail("loaded data for a refused config"))
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    bad = cfg(tiny_tree, tmp_path / "nocc", "train.compile=default")
    for attempt in (lambda: train(bad), lambda: check_run(bad)):
        with pytest.raises(RunConfigError, match="needs a C\\+\\+ compiler.*train.compile_"
                                                 "backend=aot_eager"):
            attempt()
    assert not (tmp_path / "nocc").exists()


def test_prefetch_raises_a_failing_batch_at_its_place():
    arrays = ImageArrays(np.zeros((16, 8, 8, 3), np.uint8), np.zeros(16, np.int64), ["a"])
    calls = []

    def augment(x, generator):
        calls.append(len(calls))
        if len(calls) == 3:
            raise RuntimeError("bad batch")
        return x.float()

    loader = BatchLoader(arrays, 4, augment=augment, shuffle=False, prefetch=2)
    got = []
    with pytest.raises(RuntimeError, match="bad batch"):
        for _images, _, idx in loader:
            got.append(idx.tolist())
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match="prefetch must be >= 0"):
        BatchLoader(arrays, 4, prefetch=-1)


@pytest.mark.cuda
@cuda
def test_augmenting_on_the_gpu_gives_the_cpu_batches():
    arrays = ImageArrays(np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), np.uint8),
                         np.zeros(64, np.int64), ["a"])
    kw = dict(augment=["simclr", "crop_flip"], seed=3)
    cpu = BatchLoader(arrays, 16, **kw)
    gpu = BatchLoader(arrays, 16, device="cuda", pin_memory=True, prefetch=2, **kw)
    for (a, _, ia), (b, _, ib) in zip(cpu.epoch_batches(0), gpu.epoch_batches(0), strict=True):
        assert torch.equal(ia, ib)
        for va, vb in zip(a, b, strict=True):
            assert vb.device.type == "cuda"
            torch.testing.assert_close(vb.cpu(), va, atol=1e-4, rtol=0)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("preset", ["simclr", "crop_flip"])
def test_augmenting_on_the_gpu_never_waits_for_it(preset):
    """The random parameters are drawn on the host and copied over without a synchronisation
    (a blocking copy waits for all the work queued on the device).

    The profiler synchronises the device once itself as it stops (an H200 run counted that one
    ``cudaDeviceSynchronize``), so the augmentation's waits are compared with those of a profile
    around a single kernel."""
    from torch.profiler import ProfilerActivity, profile

    from adapters.data.augment import make_augment

    def waits(work) -> dict[str, int]:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            work()
        return {e.key: e.count for e in prof.key_averages() if e.key in
                ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")}

    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    augment = make_augment(preset, size=32)
    augment(images, torch.Generator().manual_seed(0))  # warm-up: pinned blocks, kernels
    profiler_own = waits(lambda: images.float())
    assert sum(profiler_own.values()) <= 1
    assert waits(lambda: augment(images, torch.Generator().manual_seed(1))) == profiler_own


@pytest.mark.cuda
@cuda
def test_fp16_with_a_grad_scaler_trains_and_resumes(tiny_tree, tmp_path):
    opts = ("train.device=cuda", "train.precision=fp16", "train.channels_last=true",
            "data.augment_on_device=true", "data.prefetch=2")
    full = train(cfg(tiny_tree, tmp_path / "full", *opts))
    assert all(np.isfinite(r["method_loss"]) for r in full["history"])
    assert load_checkpoint(tmp_path / "full" / "checkpoint.pt")["scaler"]["scale"] > 0
    with pytest.raises(engine.StopTraining):
        train(cfg(tiny_tree, tmp_path / "cut", *opts, "run.stop_after_epoch=1"))
    resumed = train(cfg(tiny_tree, tmp_path / "cut", *opts, "run.resume=true"))
    # cuDNN may pick non-deterministic kernels: the same run up to their rounding
    for a, b in zip(resumed["history"], full["history"], strict=True):
        assert a["method_loss"] == pytest.approx(b["method_loss"], rel=1e-2)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_run_on_the_gpu_trains_as_the_eager_one(tiny_tree, tmp_path, mode):
    """Inductor's kernels (and, with reduce-overhead, CUDA graphs) with the objective's hooks."""
    opts = ("train.device=cuda", "data.augment_on_device=true")
    torch._dynamo.reset()
    plain = train(cfg(tiny_tree, tmp_path / "plain", *opts))
    fast = train(cfg(tiny_tree, tmp_path / "fast", *opts, f"train.compile={mode}"))
    # TF32 and fused kernels: the same run up to their rounding
    for a, b in zip(fast["history"], plain["history"], strict=True):
        assert a["method_loss"] == pytest.approx(b["method_loss"], rel=1e-2)
        assert a["recon_loss"] == pytest.approx(b["recon_loss"], rel=1e-2)
