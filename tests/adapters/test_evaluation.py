"""Tests of adapters.evaluation: kNN, linear and non-linear probes, feature extraction."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adapters.evaluation import (
    Features,
    NonLinearHead,
    Standardize,
    _training,
    extract_features,
    knn_eval,
    linear_probe,
    linear_probe_eval,
    nonlinear_probe,
    nonlinear_probe_eval,
    pool_features,
    recalibrate_batchnorm,
    recalibrated_batchnorm,
    weighted_knn,
)
from adapters.evaluation._training import Plateau, inverse_sqrt_lr, resident, step_lr
from adapters.evaluation.linear import WEIGHT_DECAYS


def _random_features(n: int, dim: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


def _separable(n: int, dim: int, classes: int, seed: int, margin: float = 6.0):
    """Gaussian blobs around well-separated class means."""
    g = torch.Generator().manual_seed(seed)
    means = margin * torch.randn(classes, dim, generator=g) / math.sqrt(dim)
    y = torch.randint(0, classes, (n,), generator=g)
    return means[y] + 0.5 * torch.randn(n, dim, generator=g) / math.sqrt(dim), y


# ------------------------------------------------------------------------------------ kNN


def test_knn_identical_train_and_test_features_give_100_percent():
    x, y = _random_features(2000, 128, 10, seed=0)
    result = weighted_knn(x, y, x.clone(), y.clone())
    assert result["top1"] == 100.0
    assert result["top5"] == 100.0
    assert result["protocol"] == "knn"
    assert (result["k"], result["temperature"], result["normalize"]) == (200, 0.1, True)
    assert (result["num_train"], result["num_test"], result["num_classes"]) == (2000, 2000, 10)


def test_knn_random_features_give_chance():
    x_train, y_train = _random_features(2000, 128, 10, seed=1)
    x_test, y_test = _random_features(2000, 128, 10, seed=2)
    result = weighted_knn(x_train, y_train, x_test, y_test)
    assert 7.0 <= result["top1"] <= 13.0
    assert 40.0 <= result["top5"] <= 60.0


def test_knn_chunking_does_not_change_the_result_and_features_are_normalised():
    x_train, y_train = _separable(600, 32, 5, seed=3)
    x_test, y_test = _separable(301, 32, 5, seed=3)
    whole = weighted_knn(x_train, y_train, x_test, y_test, k=20, chunk_size=1000)
    chunked = weighted_knn(x_train, y_train, x_test, y_test, k=20, chunk_size=7)
    scaled = weighted_knn(x_train * 50.0, y_train, x_test * 0.01, y_test, k=20)
    assert whole["top1"] == chunked["top1"] == scaled["top1"]
    assert whole["top1"] > 90.0
    assert chunked["chunk_size"] == 7


def test_knn_errors_name_the_problem_and_the_fix():
    x, y = _random_features(50, 8, 3, seed=4)
    with pytest.raises(ValueError, match=r"k=200 .*bank holds 50.*1 <= k <= 50"):
        weighted_knn(x, y, x, y)
    with pytest.raises(ValueError, match="feature/label count mismatch: 50 feature rows but 49"):
        weighted_knn(x, y[:49], x, y, k=5)
    with pytest.raises(ValueError, match="dimension 8 but test features 4"):
        weighted_knn(x, y, x[:, :4], y, k=5)
    with pytest.raises(ValueError, match="2-D.*pool"):
        weighted_knn(x.view(50, 2, 2, 2), y, x.view(50, 2, 2, 2), y, k=5)
    with pytest.raises(ValueError, match="num_classes=2"):
        weighted_knn(x, y, x, y, k=5, num_classes=2)
    with pytest.raises(ValueError, match="integer class indices"):
        weighted_knn(x, y.float(), x, y, k=5)


def test_knn_eval_pools_conv_features_and_reports_parameters():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8192, 4))
    targets = torch.arange(60) % 3
    images = 0.1 * torch.rand(60, 3, 32, 32) + F.one_hot(targets, 3).float()[:, :, None, None]
    batches = [(images[i : i + 16], targets[i : i + 16]) for i in range(0, 60, 16)]
    result = knn_eval(net, batches, batches, "1", k=10)
    assert result["feature"] == "1" and result["pool"] == "avg"
    assert result["feature_dim"] == 8  # global average pooled conv map
    assert result["top1"] == 100.0  # class-coloured images, test set == bank
    both = knn_eval(net, batches, batches, ["1", "3"], k=10)
    assert set(both) == {"1", "3"} and both["3"]["feature_dim"] == 4  # fc: unchanged


# --------------------------------------------------------------------- feature extraction


class _MustNotRun(nn.Module):
    def forward(self, x):
        raise AssertionError("layers after the probed one must not run")


def test_extract_features_via_hook_on_sequential_restores_training_flags():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), _MustNotRun()
    )
    net.train()
    net[1].eval()  # a mixed state (e.g. frozen BN) must come back exactly as it was
    seen_modes = []
    net[0].register_forward_hook(lambda m, i, o: seen_modes.append(m.training))
    images, targets = torch.rand(10, 3, 8, 8), torch.arange(10)
    batches = [
        (images[:6], targets[:6], torch.arange(6)),
        (images[6:], targets[6:], torch.arange(6, 10)),
    ]
    feats = extract_features(net, batches, ["2", "3"], "cpu")
    assert isinstance(feats, Features) and isinstance(feats, dict)
    assert feats["2"].shape == (10, 4, 8, 8)
    assert torch.equal(feats["2"], feats["3"])  # dropout is off in eval mode
    assert torch.equal(feats.targets, targets) and torch.equal(feats.indices, torch.arange(10))
    assert seen_modes == [False, False]  # the forward ran in eval mode
    assert [m.training for m in net] == [True, False, True, True, True]
    assert torch.is_grad_enabled()  # grad mode restored too
    with torch.no_grad():
        expected = net[2](net[1](net[0](images)))
    assert torch.allclose(feats["2"], expected, atol=1e-6)


def test_extract_features_restores_flags_after_an_error():
    net = nn.Sequential(nn.Linear(4, 4), _MustNotRun())
    net.train()
    with pytest.raises(AssertionError, match="must not run"):
        extract_features(net, [(torch.rand(2, 4), torch.zeros(2))], "1")
    assert net.training and net[0].training


class _TinyBackbone(nn.Module):
    """Stand-in for a recon-aux Backbone: forward_features + probe_points."""

    probe_points = ("conv", "fc")

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)
        self.calls = 0

    def forward_features(self, x, layers):
        self.calls += 1
        out = {"conv": F.relu(self.conv(x))}
        out["fc"] = self.fc(out["conv"].mean(dim=(2, 3)))
        return {name: out[name] for name in layers}

    def forward(self, x):
        return self.forward_features(x, ["fc"])["fc"]


def test_extract_features_uses_forward_features_and_pools_per_batch():
    model = _TinyBackbone()
    batches = [(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))] * 3
    feats = extract_features(model, batches, ["conv", "fc"], pool="avg")
    assert model.calls == 3  # one pass per batch for both layers
    assert feats["conv"].shape == (12, 6) and feats["fc"].shape == (12, 5)
    assert feats.indices is None and feats.targets.dtype == torch.int64
    # a submodule name that is not a probe point falls back to a hook
    assert extract_features(model, batches, "conv", pool="flatten")["conv"].shape == (12, 384)


def test_extract_features_with_a_recon_aux_backbone():
    models = pytest.importorskip("adapters.backbones")
    model = models.build_backbone("nin")
    batches = [(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))]
    feats = extract_features(model, batches, model.probe_points[1], pool="flatten")
    assert feats[model.probe_points[1]].shape == (2, 192 * 8 * 8)


def test_extract_features_errors_name_the_fix():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    good = [(torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match=r"unknown layer 'conv5'.*0, 1"):
        extract_features(net, good, "conv5")
    with pytest.raises(ValueError, match=r"probe_points: \['conv', 'fc'\]"):
        extract_features(_TinyBackbone(), good, "nope")
    with pytest.raises(TypeError, match=r"floating-point.*images.float\(\) / 255"):
        extract_features(net, [(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.zeros(2))], "1")
    with pytest.raises(TypeError, match="tuple"):
        extract_features(net, [torch.rand(2, 3, 8, 8)], "1")
    with pytest.raises(ValueError, match="empty"):
        extract_features(net, [], "1")


def test_extract_features_refuses_a_model_on_another_device_before_any_batch():
    def batches():
        raise AssertionError("no batch may be drawn")
        yield

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"weights are on \['cpu'\].*model.to\('cuda'\)"):
        extract_features(net, batches(), "1", "cuda")


def test_pool_features_modes():
    x = torch.randn(2, 256, 13, 13)
    assert pool_features(x, "avg").shape == (2, 256)
    assert pool_features(x, "max").shape == (2, 256)
    assert pool_features(x, "deepcluster").shape == (2, 256 * 6 * 6)  # 9216, as RegLog conv5
    assert pool_features(torch.randn(2, 384, 13, 13), "deepcluster").shape == (2, 384 * 25)
    assert pool_features(torch.randn(2, 256, 4, 4), "deepcluster").shape == (2, 4096)  # whole
    assert pool_features(torch.randn(2, 20000, 2, 2), "deepcluster").shape == (2, 20000)
    assert pool_features(x, "flatten").shape == (2, 256 * 169)
    assert pool_features(torch.randn(2, 7), "avg").shape == (2, 7)
    assert pool_features(x, None) is x
    with pytest.raises(ValueError, match="unknown pool mode"):
        pool_features(x, "mean")


# ----------------------------------------------------------------------------- probes


def test_deepcluster_learning_rate_schedule():
    # util.py learning_rate_decay: lr / sqrt(1 + lr * wd * t)
    assert inverse_sqrt_lr(0.01, 0, 1e-4) == 0.01
    assert inverse_sqrt_lr(0.01, 10**6, 1e-4) == pytest.approx(0.01 / math.sqrt(2.0))
    assert step_lr(0.1, 99, [100, 150], 0.1) == 0.1
    assert step_lr(0.1, 150, [100, 150], 0.1) == pytest.approx(0.001)


def test_linear_probe_reglog_recipe_learns_separable_features_and_reports_parameters():
    x, y = _separable(1200, 64, 10, seed=5)
    result = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], recipe="reglog", epochs=15,
                          lr=0.1)
    assert result["top1"] > 95.0
    expected = {
        "protocol": "linear", "recipe": "reglog", "standardize": False, "pool": "deepcluster",
        "feature_dim": 64, "num_classes": 10, "epochs": 15, "batch_size": 256, "momentum": 0.9,
        "weight_decay": 1e-4, "lr_schedule": "deepcluster", "seed": 31,
        "augmentation": "none (cached features)", "levelled_off": None, "epochs_run": 15,
    }  # fmt: skip
    assert {key: result[key] for key in expected} == expected
    again = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], recipe="reglog", epochs=15,
                         lr=0.1)
    assert again["top1"] == result["top1"]  # seeded
    assert linear_probe(x, y, x, y, recipe="reglog", epochs=1)["lr"] == 0.01  # RegLog's lr


def test_linear_probe_standardized_trains_until_the_loss_levels_off():
    x, y = _separable(1200, 64, 10, seed=5)
    result = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:])
    assert result["recipe"] == "standardized" and result["standardize"] is True
    assert result["lr_schedule"] == "plateau" and result["levelled_off"] is True
    assert result["lr_drops"] == 2 and result["epochs_run"] < result["epochs"]
    curve = result["loss_curve"]
    assert len(curve) == result["epochs_run"] and curve[-1] == pytest.approx(
        result["train_loss"], abs=1e-5)
    assert max(curve[-3:]) - min(curve[-3:]) < 5e-3  # levelled off
    assert result["top1"] > 95.0 and result["train_top1"] > 95.0
    capped = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=2)
    assert capped["epochs_run"] == 2 and capped["levelled_off"] is False
    with pytest.raises(ValueError, match="plateau= is used only"):
        linear_probe(x, y, x, y, lr_schedule="step", plateau=Plateau())
    with pytest.raises(ValueError, match="recipe must be one of"):
        linear_probe(x, y, x, y, recipe="mae")


def test_linear_probe_chooses_weight_decay_on_held_out_training_features_only():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(800, 200, generator=g)
    y = torch.randint(0, 4, (800,), generator=g)
    x[torch.arange(800), y] += 0.6  # few samples per dim: regularisation matters
    result = linear_probe(x[:500], y[:500], x[500:], y[500:])
    scores = result["val_top1"]
    assert list(scores) == list(WEIGHT_DECAYS) and result["val_fraction"] == 0.2
    assert result["weight_decay"] == max(WEIGHT_DECAYS, key=lambda wd: scores[wd])
    shuffled = y[500:][torch.randperm(300, generator=g)]  # the test labels choose nothing
    assert linear_probe(x[:500], y[:500], x[500:], shuffled)["val_top1"] == scores
    single = linear_probe(x[:500], y[:500], x[500:], y[500:], weight_decay=[1e-3])
    assert single["weight_decay"] == 1e-3 and "val_top1" not in single
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(x[:500], y[:500], x[500:], y[500:], val_fraction=1.0)


@pytest.mark.parametrize("kw", [{}, {"lr_schedule": "deepcluster", "epochs": 6, "momentum": 0.0},
                                {"lr_schedule": "step", "epochs": 8}])
def test_batched_weight_decay_search_trains_each_candidate_as_the_sequential_one(kw):
    g = torch.Generator().manual_seed(7)
    centres = torch.randn(10, 64, generator=g)
    y = torch.randint(0, 10, (1500,), generator=g)
    x = centres[y] * 0.35 + torch.randn(1500, 64, generator=g)
    seq = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], search="sequential", **kw)
    bat = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], search="batched", **kw)
    assert (seq["weight_decay_search"], bat["weight_decay_search"]) == ("sequential", "batched")
    # other floating-point operations, the same probes: every held-out score and every
    # candidate's plateau (epochs 100 down to 17 with the default rule) agree
    assert bat["val_top1"] == pytest.approx(seq["val_top1"], abs=0.5)
    assert bat["val_epochs"] == seq["val_epochs"]
    assert len(set(seq["val_top1"].values())) > 1  # the candidates differ: a real comparison
    assert bat["weight_decay"] == seq["weight_decay"] and bat["top1"] == seq["top1"]
    auto = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], **kw)
    assert auto["weight_decay_search"] == "sequential" and auto == seq  # auto on the CPU
    with pytest.raises(ValueError, match="search must be one of"):
        linear_probe(x, y, x, y, search="parallel")


@pytest.mark.parametrize("search", ["sequential", "batched"])
def test_a_diverging_probe_is_an_error_that_names_the_fix(search):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=g) * 1e30, torch.randint(0, 3, (300,), generator=g)
    with pytest.raises(FloatingPointError, match=r"linear probe.*training loss became nan in "
                                                 r"epoch \d+; lower lr or check the features"):
        linear_probe(x[:200], y[:200], x[200:], y[200:], standardize=False, lr=10.0,
                     search=search)


def test_probe_features_stay_where_they_are_for_a_cpu_probe():
    x = torch.randn(10, 3)
    assert resident(x, torch.device("cpu")) is x


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_probe_on_the_gpu_gathers_batches_there_with_the_same_result(monkeypatch):
    x, y = _separable(1200, 64, 10, seed=5)
    assert resident(x, torch.device("cuda")).device.type == "cuda"
    on_gpu = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], device="cuda")
    assert on_gpu["weight_decay_search"] == "batched"  # search="auto" on CUDA
    nonlinear = nonlinear_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=3, device="cuda")
    monkeypatch.setattr(_training, "resident", lambda features, device, share=0.5: features)
    streamed = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], device="cuda")
    assert on_gpu == streamed  # the same kernels on the same values: every number equal
    assert nonlinear == nonlinear_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=3,
                                        device="cuda")
    on_cpu = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], device="cpu")
    assert on_gpu["weight_decay"] == on_cpu["weight_decay"]
    assert abs(on_gpu["top1"] - on_cpu["top1"]) <= 1.0 and on_gpu["levelled_off"]


def test_linear_probe_reads_features_whatever_their_scale():
    """The fair-evaluation property: scaling every feature by 0.01 changes nothing."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1500, 48, generator=g) + 0.5
    y = torch.randint(0, 5, (1500,), generator=g)
    x[torch.arange(1500), y * 5] += 1.0  # learnable, not separable
    original = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:])
    scaled = linear_probe(0.01 * x[:1000], y[:1000], 0.01 * x[1000:], y[1000:])
    assert 40 < original["top1"] < 100
    assert scaled["top1"] == original["top1"]
    assert scaled["epochs_run"] == original["epochs_run"]
    raw = linear_probe(0.01 * x[:1000], y[:1000], 0.01 * x[1000:], y[1000:], recipe="reglog",
                       epochs=original["epochs_run"])
    assert raw["top1"] < original["top1"] - 5  # RegLog reads the scale


def test_linear_probe_pools_conv_maps_and_can_return_the_classifier():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(300, 512, 6, 6, generator=g)
    y = torch.randint(0, 3, (300,), generator=g)
    result = linear_probe(
        x[:200], y[:200], x[200:], y[200:], epochs=1, lr_schedule="step", return_classifier=True
    )
    assert result["feature_dim"] == 512 * 4 * 4  # largest grid with 512 * s * s <= 9600
    assert result["milestones"] == [1, 1]  # 50% / 75% of 1 epoch, at least epoch 1
    standardize, linear = result["classifier"]
    assert isinstance(standardize, Standardize) and isinstance(linear, nn.Linear)
    assert standardize.mean.shape == (512 * 4 * 4,)
    reglog = linear_probe(x[:200], y[:200], x[200:], y[200:], recipe="reglog", epochs=1,
                          return_classifier=True)["classifier"]
    assert isinstance(reglog, nn.Linear) and reglog.bias is not None  # RegLog: no BN
    with pytest.raises(ValueError, match="lr_schedule"):
        linear_probe(x, y, x, y, lr_schedule="cosine")


def test_nonlinear_head_matches_aet_multlayerfc2():
    head = NonLinearHead(192 * 8 * 8, 10)
    layers = list(head)
    assert [type(m) for m in layers] == [nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert layers[1].out_features == 200 and layers[1].bias is None
    assert layers[4].in_features == 200 and layers[4].out_features == 10
    assert NonLinearHead(100, 100).hidden == 2000 and NonLinearHead(100, 1000).hidden == 2048
    assert head(torch.randn(5, 192, 8, 8)).shape == (5, 10)


def test_nonlinear_probe_learns_separable_features():
    x, y = _separable(1100, 48, 10, seed=7)
    result = nonlinear_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=8)
    assert result["top1"] > 95.0
    assert result["protocol"] == "nonlinear" and result["hidden"] == 200
    assert result["milestones"] == [4, 6] and result["nesterov"] is True
    assert (result["lr"], result["weight_decay"], result["batch_size"]) == (0.1, 5e-4, 128)


def test_progress_bars_work_without_a_tty(capsys):
    pytest.importorskip("tqdm")  # a harness dependency; without it progress() shows nothing
    x, y = _separable(100, 8, 2, seed=9)
    result = linear_probe(x, y, x, y, epochs=2, progress=True)
    batches = [(torch.rand(4, 3, 8, 8), torch.arange(4))]
    extract_features(nn.Sequential(nn.Conv2d(3, 2, 3)), batches, "0", progress=True)
    assert result["epochs"] == 2
    err = capsys.readouterr().err  # tqdm writes its bars to stderr, a file here
    assert "linear probe" in err and "features" in err and "it/s" in err


def test_probe_evals_on_a_model_with_forward_features():
    model = _TinyBackbone()
    g = torch.Generator().manual_seed(8)
    batches = [(torch.rand(20, 3, 8, 8, generator=g), torch.arange(20) % 4) for _ in range(3)]
    linear = linear_probe_eval(model, batches, batches, "conv", epochs=2)
    assert linear["feature"] == "conv" and linear["feature_dim"] == 6 * 8 * 8
    nonlinear = nonlinear_probe_eval(model, batches, batches, ["conv", "fc"], epochs=2)
    assert nonlinear["conv"]["feature_dim"] == 384 and nonlinear["fc"]["feature_dim"] == 5


# ------------------------------------------------------------------------ real CIFAR-10

needs_data = pytest.mark.skipif(
    not os.environ.get("RECON_AUX_DATA"),
    reason="real CIFAR-10 needed: set RECON_AUX_DATA to the folder holding cifar10-jpg.tar.gz",
)


def _tiny_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, stride=2, padding=2), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip


@pytest.fixture
def one_thread():
    """Run torch on one thread: on this shared 2-core CPU, two OpenMP threads competing with
    other processes made this test ~7x slower (33 s vs 5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_data
def test_linear_probe_separates_trained_from_random_features_on_cifar10(one_thread):
    from adapters.data import BatchLoader, balanced_subset, load_dataset

    train = load_dataset("cifar10", train=True)
    test = load_dataset("cifar10", train=False)
    train_idx = balanced_subset(train.targets, 200, seed=0)  # 2,000 images
    test_idx = balanced_subset(test.targets, 100, seed=0)  # 1,000 images

    trained = _tiny_cnn()
    optimizer = torch.optim.Adam(trained.parameters(), lr=1e-2)
    loader = BatchLoader(train, 64, indices=train_idx, augment="none", seed=0)
    for epoch in range(10):  # the standardised probe reads random conv features well (35%)
        loader.set_epoch(epoch)
        trained.train()
        for images, targets, _ in loader:
            loss = F.cross_entropy(trained(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    train_batches = BatchLoader(train, 500, indices=train_idx, augment="none", shuffle=False)
    test_batches = BatchLoader(test, 500, indices=test_idx, augment="none", shuffle=False)
    results = {
        name: linear_probe_eval(model, train_batches, test_batches, "5", epochs=10)
        for name, model in (("trained", trained), ("random", _tiny_cnn()))
    }
    print({name: round(r["top1"], 1) for name, r in results.items()})
    assert results["trained"]["feature_dim"] == 32 * 8 * 8
    assert results["random"]["top1"] > 15.0  # random conv features are better than chance
    # Measured 42.6 vs 34.8. The margin was +8 when the probe read raw features, which
    # under-rated the random network (its BatchNorm defaults shrink its features).
    assert results["trained"]["top1"] > results["random"]["top1"] + 5.0


# -- BatchNorm recalibration ---------------------------------------------------------------------


def _bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
                         nn.Flatten(), nn.Linear(6 * 6 * 6, 5), nn.BatchNorm1d(5))


def test_recalibration_gives_an_untrained_network_the_batch_statistics_of_its_inputs():
    net = _bn_net().eval()
    x = torch.rand(96, 3, 8, 8) * 3 - 1
    info = recalibrate_batchnorm(net, [(x[:40], torch.zeros(40)), (x[40:],)], max_images=96)
    assert info == {"bn_layers": 2, "images": 96}
    conv_out = net[0](x)
    assert torch.allclose(net[1].running_mean, conv_out.mean((0, 2, 3)), atol=1e-5)
    # one batch holding every image: the running variance is that batch's (unbiased) variance
    recalibrate_batchnorm(net, [x], max_images=96)
    assert torch.allclose(net[1].running_var, conv_out.var((0, 2, 3), unbiased=True), rtol=1e-4)
    net[1].train().momentum = 0.0  # normalise with the batch statistics, as the pass did
    with torch.no_grad():
        hidden = net[:6](x)  # the dropout is off while recalibrating
    net[1].eval().momentum = 0.1
    assert torch.allclose(net[6].running_mean, hidden.mean(0), atol=1e-5)
    assert torch.allclose(net[6].running_var, hidden.var(0, unbiased=True), rtol=1e-4)
    assert all(p.grad is None for p in net.parameters())
    net[6].momentum = 0.3
    recalibrate_batchnorm(net, [x], max_images=96)
    assert not net.training and not net[1].training and net[6].momentum == 0.3  # restored


def test_recalibration_uses_exactly_max_images_and_restores_on_request():
    net = _bn_net()
    before = net[1].running_mean.clone()
    x = torch.rand(100, 3, 8, 8)
    with recalibrated_batchnorm(net, [x[:30], x[30:60], x[60:]], max_images=50) as info:
        assert info["images"] == 50
        assert torch.allclose(net[1].running_mean, net[0](x[:50]).mean((0, 2, 3)), atol=1e-5)
    assert torch.equal(net[1].running_mean, before) and net.training
    with pytest.raises(ValueError, match="max_images must be a positive int"):
        recalibrate_batchnorm(net, [x], max_images=0)
    untracked = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="do not track running statistics"):
        recalibrate_batchnorm(untracked, [x], max_images=10)
    assert recalibrate_batchnorm(nn.Conv2d(3, 2, 1), [x], max_images=10)["bn_layers"] == 0
