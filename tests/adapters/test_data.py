"""Tests of adapters.data: loading (real CIFAR-10 archive and fake ones), subsets,
augmentations and loaders.

Real-data tests need ``cifar10-jpg.tar.gz`` in ``$RECON_AUX_DATA`` (``make test`` sets it to
``../shared/data`` when that exists) and skip otherwise, saying why. They decode it once into
the normal cache (``$RECON_AUX_CACHE`` or ``~/.cache/recon_aux``), so later sessions reuse it.
Nothing here downloads: the ``download=True`` tests replace only the network fetch
(``urllib.request.urlopen``, what torchvision's ``download_url`` calls) by small files written in
torchvision's own formats, so torchvision's real download, extraction, md5 checks and loading
run on them.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as tvf

from adapters.data import (
    CIFAR10_JPG_NAME,
    CIFAR10_JPG_SHA256,
    BatchAugment,
    BatchLoader,
    DatasetError,
    DatasetNotFoundError,
    ImageArrays,
    IndexedDataset,
    balanced_subset,
    load_dataset,
    make_augment,
    resolve_data_root,
)
from adapters.data import augment as aug_mod
from adapters.data import datasets as ds_mod
from recon_aux.weights import cache_dir

TORCHVISION_CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """``$RECON_AUX_DATA`` when it holds the real cifar10-jpg.tar.gz, else skip."""
    env = os.environ.get("RECON_AUX_DATA")
    if not env:
        pytest.skip(f"real data: RECON_AUX_DATA is unset (point it at the folder with "
                    f"{CIFAR10_JPG_NAME}, e.g. ../shared/data)")  # fmt: skip
    if not (Path(env) / CIFAR10_JPG_NAME).is_file():
        pytest.skip(f"real data: RECON_AUX_DATA={env} has no {CIFAR10_JPG_NAME}")
    return Path(env)


@pytest.fixture(scope="session")
def cifar_train(cifar_root: Path) -> ImageArrays:
    return load_dataset("cifar10", data_root=cifar_root, train=True)


@pytest.fixture(scope="session")
def cifar_test(cifar_root: Path) -> ImageArrays:
    return load_dataset("cifar10", data_root=cifar_root, train=False)


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache dir for this test (so fake data never touches the real cache)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("RECON_AUX_CACHE", str(cache))
    return cache


def _random_image(rng: np.random.Generator, size: tuple[int, int] = (8, 8)) -> np.ndarray:
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _make_tree(
    files: dict[str, np.ndarray], root: Path | None = None, tar: Path | None = None
) -> None:
    """Write ``{relative path: image}`` as PNGs into a folder and/or a tar.gz."""
    if root is not None:
        for rel, img in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(_png_bytes(img))
    if tar is not None:
        with tarfile.open(tar, "w:gz") as tf:
            for rel, img in files.items():
                data = _png_bytes(img)
                info = tarfile.TarInfo(rel)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def _split_files(seed: int = 0, top: str = "toy") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    files = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("zebra", "ant", "mole"):
            for i in range(n):
                files[f"{top}/{split}/{cls}/{i:04d}.png"] = _random_image(rng)
    return files


# --------------------------------------------------------------------------------------------
# data root and cache dir


def test_resolve_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECON_AUX_DATA", raising=False)
    assert resolve_data_root(tmp_path) == tmp_path.resolve()
    with pytest.raises(DatasetNotFoundError, match="--data-root.*RECON_AUX_DATA"):
        resolve_data_root()
    monkeypatch.setenv("RECON_AUX_DATA", str(tmp_path))
    assert resolve_data_root() == tmp_path.resolve()
    monkeypatch.setenv("RECON_AUX_DATA", str(tmp_path / "nope"))
    with pytest.raises(DatasetNotFoundError, match="nope.*RECON_AUX_DATA environment variable"):
        resolve_data_root()


def test_cache_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoded arrays go under recon-aux's one cache folder (recon_aux.weights.cache_dir),
    which the loader creates when it first writes there."""
    monkeypatch.setenv("RECON_AUX_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    _make_tree(_split_files(), root=tmp_path / "tree")
    load_dataset(tmp_path / "tree", train=True)
    assert (tmp_path / "c" / "arrays").is_dir()
    monkeypatch.delenv("RECON_AUX_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "recon_aux"


# --------------------------------------------------------------------------------------------
# the real CIFAR-10 archive


def test_cifar10_train_split(cifar_train: ImageArrays) -> None:
    a = cifar_train
    assert a.images.shape == (50_000, 32, 32, 3) and a.images.dtype == np.uint8
    assert a.targets.dtype == np.int64
    assert np.bincount(a.targets, minlength=10).tolist() == [5000] * 10
    assert a.classes == TORCHVISION_CIFAR10_CLASSES
    # RGB order and decoding: channel means are CIFAR-10's (JPEG moves them by < 0.005)
    means = a.images.reshape(-1, 3).mean(axis=0) / 255.0
    np.testing.assert_allclose(means, (0.4914, 0.4822, 0.4465), atol=5e-3)


def test_cifar10_test_split(cifar_test: ImageArrays) -> None:
    a = cifar_test
    assert a.images.shape == (10_000, 32, 32, 3) and a.images.dtype == np.uint8
    assert np.bincount(a.targets, minlength=10).tolist() == [1000] * 10
    assert a.classes == TORCHVISION_CIFAR10_CLASSES


def test_cifar10_second_load_uses_cache(
    cifar_root: Path, cifar_test: ImageArrays, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache_file = ds_mod._tree_cache_file(cifar_root / CIFAR10_JPG_NAME, None)
    assert cache_file.is_file() and cache_file.suffix == ".npz"
    # (no temporary file left behind: checked in a private cache, test_imagefolder_tar_and_dir;
    # this cache is shared with other test processes, which may be writing theirs right now)

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("the archive was decoded again instead of using the cache")

    monkeypatch.setattr(ds_mod, "_read_tree_tar", no_decode)
    again = load_dataset("cifar10", data_root=cifar_root, train=False)
    np.testing.assert_array_equal(again.images, cifar_test.images)
    np.testing.assert_array_equal(again.targets, cifar_test.targets)


def test_cifar10_balanced_subset_and_loader(cifar_train: ImageArrays) -> None:
    idx = balanced_subset(cifar_train.targets, 100, seed=0, num_classes=10)
    assert len(idx) == 1000
    assert np.bincount(cifar_train.targets[idx], minlength=10).tolist() == [100] * 10
    loader = BatchLoader(cifar_train, 256, indices=idx, augment="simclr", seed=1)
    seen = []
    for images, targets, indices in loader:
        assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.float32
        assert torch.equal(targets, torch.from_numpy(cifar_train.targets[indices.numpy()]))
        seen.append(indices)
    assert sorted(torch.cat(seen).tolist()) == idx.tolist()


# --------------------------------------------------------------------------------------------
# fake ImageFolder trees and archives


def test_imagefolder_tar_and_dir(tmp_path: Path, tmp_cache: Path) -> None:
    files = _split_files()
    _make_tree(files, root=tmp_path / "tree", tar=tmp_path / "toy.tar.gz")
    for source in (tmp_path / "toy.tar.gz", tmp_path / "tree"):
        train = load_dataset(source, train=True)
        test = load_dataset(str(source), train=False)
        assert train.classes == ["ant", "mole", "zebra"]  # sorted folder names
        assert len(train) == 9 and len(test) == 6
        assert train.targets.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        # lossless PNGs: pixels come back exactly, ordered by (class, file name)
        np.testing.assert_array_equal(train.images[0], files["toy/train/ant/0000.png"])
        np.testing.assert_array_equal(test.images[-1], files["toy/test/zebra/0001.png"])
    assert len(list((tmp_cache / "arrays").glob("*.npz"))) == 2
    assert not list((tmp_cache / "arrays").glob("*.tmp"))


def test_linked_class_folders_are_read_and_linked_tar_members_refused(
        tmp_path: Path, tmp_cache: Path) -> None:
    """A class folder that is a link is read (as torchvision's ImageFolder does; it vanished
    before), a link loop ends, and an archive whose image is a link says how to pack it."""
    files = _split_files()
    _make_tree(files, root=tmp_path / "store")
    tree = tmp_path / "tree" / "toy"
    for split in ("train", "test"):
        (tree / split).mkdir(parents=True)
        for cls in ("ant", "mole", "zebra"):
            (tree / split / cls).symlink_to(tmp_path / "store" / "toy" / split / cls)
    (tree / "train" / "ant" / "loop").symlink_to(tree / "train")  # a cycle through the links
    train = load_dataset(tmp_path / "tree", train=True)
    assert train.classes == ["ant", "mole", "zebra"] and len(train) == 9
    archive = tmp_path / "linked.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("toy/train/ant/0000.png")
        info.type, info.linkname = tarfile.SYMTYPE, "elsewhere.png"
        tf.addfile(info)
    with pytest.raises(DatasetError, match=r"0000.png is a link, not an image file; .*tar "
                                           r"--dereference"):
        load_dataset(archive, train=True)


def test_imagefolder_relative_to_data_root(tmp_path: Path, tmp_cache: Path) -> None:
    _make_tree(_split_files(), tar=tmp_path / "toy.tar.gz")
    assert len(load_dataset("toy.tar.gz", data_root=tmp_path)) == 9


def test_tar_cache_reused(tmp_path: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_tree(_split_files(), tar=tmp_path / "toy.tar.gz")
    first = load_dataset(tmp_path / "toy.tar.gz")
    monkeypatch.setattr(ds_mod, "_read_tree_tar", lambda *a: pytest.fail("decoded twice"))
    second = load_dataset(tmp_path / "toy.tar.gz")
    np.testing.assert_array_equal(first.images, second.images)


def test_unwritable_cache_warns(
    tmp_path: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _make_tree(_split_files(), tar=tmp_path / "toy.tar.gz")

    def read_only(*args: object) -> None:
        raise PermissionError("read-only file system (faked by the test)")

    monkeypatch.setattr(ds_mod, "_write_cache", read_only)
    with pytest.warns(UserWarning, match="Could not write the decoded cache.*RECON_AUX_CACHE"):
        assert len(load_dataset(tmp_path / "toy.tar.gz")) == 9


def test_class_folders_only(tmp_path: Path, tmp_cache: Path) -> None:
    rng = np.random.default_rng(1)
    _make_tree({f"{c}/{i}.png": _random_image(rng) for c in "ba" for i in range(2)}, tmp_path)
    a = load_dataset(tmp_path, train=True)
    assert a.classes == ["a", "b"] and len(a) == 4
    with pytest.raises(DatasetError, match="no train/test split"):
        load_dataset(tmp_path, train=False)


def test_mixed_sizes_need_image_size(tmp_path: Path, tmp_cache: Path) -> None:
    rng = np.random.default_rng(2)
    files = {"a/0.png": _random_image(rng, (8, 8)), "a/1.png": _random_image(rng, (6, 10))}
    _make_tree(files, tmp_path)
    with pytest.raises(DatasetError, match="different sizes.*image_size"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path, image_size=12).images.shape == (2, 12, 12, 3)


def test_truncated_tar_gives_clear_error(tmp_path: Path, tmp_cache: Path) -> None:
    tar = tmp_path / "toy.tar.gz"
    _make_tree(_split_files(), tar=tar)
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="corrupt, truncated") as info:
        load_dataset(tar)
    assert str(tar) in str(info.value) and "RECON_AUX_DATA" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_not_a_tar_gives_clear_error(tmp_path: Path, tmp_cache: Path) -> None:
    bad = tmp_path / "junk.tar.gz"
    bad.write_bytes(gzip.compress(b"this is not a tar archive" * 50))
    with pytest.raises(DatasetError, match="junk.tar.gz"):
        load_dataset(bad)


def test_corrupt_image_member(tmp_path: Path, tmp_cache: Path) -> None:
    tar = tmp_path / "toy.tar"
    with tarfile.open(tar, "w") as tf:
        data = b"\xff\xd8\xff\xe0 definitely not a jpeg"
        info = tarfile.TarInfo("cls/0001.jpg")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DatasetError, match=r"toy\.tar:cls/0001\.jpg: cannot decode image"):
        load_dataset(tar)


def test_empty_tree(tmp_path: Path, tmp_cache: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match="no image files"):
        load_dataset(tmp_path)


def test_known_archive_checksum(tmp_path: Path, tmp_cache: Path) -> None:
    _make_tree(_split_files(top="cifar10"), tar=tmp_path / CIFAR10_JPG_NAME)
    with pytest.raises(DatasetError, match=f"expected {CIFAR10_JPG_SHA256}"):
        load_dataset("cifar10", data_root=tmp_path)
    assert not (tmp_cache / "arrays").exists()


def test_cifar10_missing(tmp_path: Path, tmp_cache: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", data_root=tmp_path)
    msg = str(info.value)
    for needle in (CIFAR10_JPG_NAME, "cifar-10-batches-py", "--data-root", "RECON_AUX_DATA",
                   "download=True"):  # fmt: skip
        assert needle in msg


def test_no_data_root(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RECON_AUX_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match="No data root.*--data-root"):
        load_dataset("cifar100")


def test_torchvision_files_corrupt(tmp_path: Path, tmp_cache: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="torchvision rejected"):
        load_dataset("cifar10", data_root=tmp_path)


def test_torchvision_cifar10_layout(
    tmp_path: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fake cifar-10-batches-py (md5 check patched out): channels-last uint8, labels, classes."""
    import pickle

    import torchvision.datasets.cifar as tv_cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(4)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = (rng.integers(0, 256, (2, 3072), dtype=np.uint8), [1, 7])
        with open(folder / name, "wb") as f:
            pickle.dump({"data": batches[name][0], "labels": batches[name][1]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": TORCHVISION_CIFAR10_CLASSES}, f)
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    a = load_dataset("cifar10", data_root=tmp_path, train=False)
    assert a.images.shape == (2, 32, 32, 3) and a.images.flags.c_contiguous
    np.testing.assert_array_equal(a.images[1, 0, 0], batches["test_batch"][0][1, [0, 1024, 2048]])
    assert a.targets.tolist() == [1, 7] and a.classes == TORCHVISION_CIFAR10_CLASSES
    assert len(load_dataset("cifar10", data_root=tmp_path, train=True)) == 10


def test_torchvision_svhn_layout(
    tmp_path: Path, tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fake SVHN .mat under <root>/svhn (md5 check patched out): NHWC, label 10 -> 0."""
    import scipy.io
    import torchvision.datasets as tvd

    (tmp_path / "svhn").mkdir()
    x = np.random.default_rng(5).integers(0, 256, (32, 32, 3, 3), dtype=np.uint8)
    scipy.io.savemat(
        tmp_path / "svhn" / "test_32x32.mat", {"X": x, "y": np.array([[10], [3], [1]])}
    )
    monkeypatch.setattr(tvd.SVHN, "_check_integrity", lambda self: True)
    a = load_dataset("svhn", data_root=tmp_path, train=False)
    assert a.images.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(a.images[2], x[..., 2])
    assert a.targets.tolist() == [0, 3, 1] and a.classes[0] == "0"


# --------------------------------------------------------------------------------------------
# data.download: torchvision's real download path, the network replaced by local bytes


class _Response:
    """What ``urllib.request.urlopen`` returns, enough for torchvision's ``download_url``."""

    def __init__(self, url: str, data: bytes) -> None:
        self.url, self.length, self._buffer = url, len(data), io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._buffer.read(n)

    def __enter__(self) -> _Response:
        return self

    def __exit__(self, *exc: object) -> None:
        self._buffer.close()


def _serve(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes]) -> list[str]:
    """The network, replaced by ``{url: bytes}``; returns the URLs fetched."""
    import urllib.error
    import urllib.request

    fetched: list[str] = []

    def urlopen(request, *args, **kwargs):
        url = getattr(request, "full_url", request)
        if url not in files:
            raise urllib.error.URLError(f"not served by the test: {url}")
        fetched.append(url)
        return _Response(url, files[url])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return fetched


def _md5(data: bytes) -> str:
    import hashlib

    return hashlib.md5(data).hexdigest()


def _pickled(obj: object) -> bytes:
    import pickle

    return pickle.dumps(obj, protocol=2)


def _tgz(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _cifar_archive(tvd_class, monkeypatch: pytest.MonkeyPatch, label_key: str,
                   names: list[str], per_file: int, seed: int) -> tuple[bytes, dict]:
    """A ``cifar-*-python.tar.gz`` in torchvision's layout (pickled dicts of ``data`` (N, 3072)
    uint8 and labels, plus the meta file), with the class's md5s set to these files'."""
    rng = np.random.default_rng(seed)
    folder = tvd_class.base_folder
    members, md5s, content = {}, {}, {}
    for name, _ in tvd_class.train_list + tvd_class.test_list:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, len(names), per_file)]
        members[f"{folder}/{name}"] = _pickled({"data": data, label_key: labels})
        md5s[name], content[name] = _md5(members[f"{folder}/{name}"]), (data, labels)
    meta = tvd_class.meta
    members[f"{folder}/{meta['filename']}"] = _pickled({meta["key"]: names})
    archive = _tgz(members)
    monkeypatch.setattr(tvd_class, "tgz_md5", _md5(archive))
    monkeypatch.setattr(tvd_class, "train_list", [[n, md5s[n]] for n, _ in tvd_class.train_list])
    monkeypatch.setattr(tvd_class, "test_list", [[n, md5s[n]] for n, _ in tvd_class.test_list])
    monkeypatch.setattr(tvd_class, "meta", {
        **meta, "md5": _md5(members[f"{folder}/{meta['filename']}"])})
    return archive, content


def test_download_cifar10_and_cifar100_through_torchvision(
    tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets as tvd

    monkeypatch.delenv("RECON_AUX_DATA", raising=False)
    c10, content10 = _cifar_archive(tvd.CIFAR10, monkeypatch, "labels",
                                    TORCHVISION_CIFAR10_CLASSES, 3, seed=1)
    c100_names = [f"class{i}" for i in range(100)]
    c100, content100 = _cifar_archive(tvd.CIFAR100, monkeypatch, "fine_labels", c100_names, 4,
                                      seed=2)
    fetched = _serve(monkeypatch, {tvd.CIFAR10.url: c10, tvd.CIFAR100.url: c100})
    with pytest.raises(DatasetNotFoundError, match=r"set data.download=true \(recon-aux train\)"):
        load_dataset("cifar10")  # without download=True nothing is fetched
    assert fetched == []

    train = load_dataset("cifar10", download=True)
    assert tvd.CIFAR10.url in fetched
    assert len(train) == 15 and train.classes == TORCHVISION_CIFAR10_CLASSES
    data, labels = content10["data_batch_1"]
    np.testing.assert_array_equal(train.images[0], data[0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert train.targets[:3].tolist() == labels
    fetched.clear()
    test = load_dataset("cifar10", download=True, train=False)  # found: nothing fetched
    assert fetched == [] and len(test) == 3
    assert (tmp_cache / "torchvision" / "cifar-10-batches-py" / "test_batch").is_file()

    c = load_dataset("cifar100", download=True, train=False)
    assert len(c) == 4 and c.classes == c100_names
    assert c.targets.tolist() == content100["test"][1]


def test_download_svhn_through_torchvision(tmp_cache: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import scipy.io
    import torchvision.datasets as tvd

    monkeypatch.delenv("RECON_AUX_DATA", raising=False)
    rng = np.random.default_rng(3)
    served, split_list = {}, dict(tvd.SVHN.split_list)
    for split, n in (("train", 5), ("test", 3)):
        url, filename, _ = split_list[split]
        mat = io.BytesIO()
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [3], [4]][:n])
        scipy.io.savemat(mat, {"X": x, "y": y})
        served[url] = mat.getvalue()
        split_list[split] = [url, filename, _md5(served[url])]
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)
    fetched = _serve(monkeypatch, served)
    train = load_dataset("svhn", download=True)
    assert len(train) == 5 and train.targets.tolist() == [0, 1, 2, 3, 4]  # label 10 is digit 0
    assert load_dataset("svhn", download=True, train=False).images.shape == (3, 32, 32, 3)
    assert (tmp_cache / "torchvision" / "svhn" / "train_32x32.mat").is_file()
    assert sorted(set(fetched)) == sorted(served)


def test_run_config_data_download_reaches_torchvision(
    tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``data.download: true`` in a run config fetches the data set before training."""
    import torchvision.datasets as tvd

    from adapters.config import load_run_config
    from adapters.engine import prepare_run

    monkeypatch.delenv("RECON_AUX_DATA", raising=False)
    archive, _ = _cifar_archive(tvd.CIFAR100, monkeypatch, "fine_labels",
                                [f"c{i}" for i in range(100)], 4, seed=4)
    fetched = _serve(monkeypatch, {tvd.CIFAR100.url: archive})
    cfg = load_run_config({"method": {"name": "sela"},
                           "data": {"dataset": "cifar100", "download": True},
                           "train": {"device": "cpu"}})
    setup = prepare_run(cfg)
    assert len(setup.train_set) == 4 and len(setup.test_set) == 4 and fetched
    assert cfg.to_dict()["data"]["download"] is True


def test_download_failure_is_explained(tmp_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    import torchvision.datasets as tvd

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network (faked by the test)")

    monkeypatch.setattr(tvd, "CIFAR100", offline)
    monkeypatch.delenv("RECON_AUX_DATA", raising=False)
    with pytest.raises(DatasetNotFoundError, match="download into .* failed.*--data-root"):
        load_dataset("cifar100", download=True)


def test_unknown_name(tmp_path: Path, tmp_cache: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="not one of cifar10"):
        load_dataset("imagenet-9000", data_root=tmp_path)


def _idx_bytes(arr: np.ndarray) -> bytes:
    head = (0x0800 + arr.ndim).to_bytes(4, "big")
    head += b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def test_fashion_mnist_from_idx_files(tmp_path: Path, tmp_cache: Path) -> None:
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(3)
    imgs = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(imgs)))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    a = load_dataset("fashion-mnist", data_root=tmp_path, train=False)
    assert a.images.shape == (5, 32, 32, 3) and a.images.dtype == np.uint8
    np.testing.assert_array_equal(a.images[:, 2:30, 2:30, 1], imgs)
    assert a.images[:, :2].max() == 0 and a.images[:, :, 30:].max() == 0
    assert (a.images[..., 0] == a.images[..., 2]).all()
    assert a.targets.tolist() == [0, 9, 3, 3, 1] and a.classes[9] == "Ankle boot"
    (folder / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels)[:-2])
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("fashion-mnist", data_root=tmp_path, train=False)


def test_image_arrays_validation() -> None:
    img = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        ImageArrays(img.astype(np.float32), np.zeros(2, np.int64), ["a"])
    with pytest.raises(ValueError, match="must match"):
        ImageArrays(img, np.zeros(3, np.int64), ["a"])
    with pytest.raises(ValueError, match=r"span \[0, 1\] but there are 1 classes; targets must "
                                         r"be class indices 0\.\.0: list every class"):
        ImageArrays(img, np.array([0, 1]), ["a"])
    sub = ImageArrays(img, np.array([0, 1]), ["a", "b"]).subset([1])
    assert len(sub) == 1 and sub.targets.tolist() == [1] and sub.num_classes == 2


# --------------------------------------------------------------------------------------------
# balanced subsets


def test_balanced_subset() -> None:
    targets = np.repeat(np.arange(4), [10, 7, 12, 5])
    a = balanced_subset(targets, 5, seed=0)
    assert a.dtype == np.int64 and len(a) == 20 and len(np.unique(a)) == 20
    assert (np.diff(a) > 0).all()
    assert np.bincount(targets[a]).tolist() == [5, 5, 5, 5]
    np.testing.assert_array_equal(a, balanced_subset(targets, 5, seed=0))
    assert not np.array_equal(a, balanced_subset(targets, 5, seed=1))
    with pytest.raises(ValueError, match="class 3: 5"):
        balanced_subset(targets, 6, seed=0)
    with pytest.raises(ValueError, match="class 4: 0"):
        balanced_subset(targets, 2, seed=0, num_classes=5)


# --------------------------------------------------------------------------------------------
# augmentations


def _batch(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=_gen(seed))


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("preset", ["none", "crop_flip", "simclr"])
def test_presets_shape_range_determinism(preset: str) -> None:
    x = _batch()
    aug = make_augment(preset, size=32)
    threads = torch.get_num_threads()
    y = aug(x, _gen(5))
    assert torch.get_num_threads() == threads  # num_threads=1 only inside the call
    assert y.shape == (16, 3, 32, 32) and y.dtype == torch.float32
    assert y.min() >= 0 and y.max() <= 1
    assert torch.equal(y, aug(x, _gen(5)))
    assert torch.equal(y, aug(x.float() / 255, _gen(5)))  # uint8 or float input
    if preset != "none":
        assert not torch.equal(y, aug(x, _gen(6)))
    else:
        assert torch.equal(y, x.float() / 255)


def test_normalisation() -> None:
    x = _batch()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    y = make_augment("none", mean=mean, std=std)(x)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    torch.testing.assert_close(y, ref)


def test_crop_flip_matches_torchvision() -> None:
    x = _batch(8)
    y = BatchAugment(crop="pad", padding=4, hflip=1.0)(x, _gen(0))
    g = _gen(0)
    torch.rand(8, generator=g)  # the flip draws
    top = torch.randint(0, 9, (8,), generator=g)
    left = torch.randint(0, 9, (8,), generator=g)
    for i in range(8):
        ref = tvf.crop(tvf.pad(x[i], [4]), int(top[i]), int(left[i]), 32, 32).flip(-1)
        assert torch.equal((y[i] * 255).round().to(torch.uint8), ref)


def test_resized_crop_matches_torchvision() -> None:
    x = _batch(8).float() / 255
    aug = BatchAugment(crop="resized", scale=(0.08, 1.0))
    y = aug(x, _gen(3))
    top, left, h, w = aug_mod._resized_crop_boxes(8, 32, 32, aug.scale, aug.ratio, _gen(3))
    assert (h <= 32).all() and (w <= 32).all() and (top + h <= 32).all() and (left + w <= 32).all()
    for i in range(8):
        box = [int(top[i]), int(left[i]), int(h[i]), int(w[i])]
        ref = tvf.resized_crop(x[i], *box, [32, 32], antialias=True)
        torch.testing.assert_close(y[i], ref.clamp(0, 1), atol=1e-5, rtol=0)
    # whole-image box is the identity; downscaling is antialiased like torchvision
    full = BatchAugment(crop="resized", scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(full(x), x)
    big = torch.rand(2, 3, 64, 64, generator=_gen(1))
    small = BatchAugment(crop="resized", size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0))(big)
    torch.testing.assert_close(small, tvf.resize(big, [32, 32], antialias=True), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale, ratio", [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.2, 0.5), (1.0, 2.0))])
def test_resized_crop_boxes_are_distributed_as_torchvision_draws_them(scale, ratio) -> None:
    """The batched boxes follow ``RandomResizedCrop.get_params``: the same distribution of
    area fraction and aspect ratio over many draws (a box ignoring ``scale`` or swapping the
    ratio would move these)."""
    from torchvision.transforms import v2

    n = 4000
    top, left, h, w = aug_mod._resized_crop_boxes(n, 32, 32, scale, ratio, _gen(0))
    torch.manual_seed(0)
    image = torch.zeros(3, 32, 32)
    ref = torch.tensor([v2.RandomResizedCrop.get_params(image, list(scale), list(ratio))
                        for _ in range(n)], dtype=torch.float32)
    ours = {"area": h * w / 1024, "log_aspect": torch.log(w / h)}
    theirs = {"area": ref[:, 2] * ref[:, 3] / 1024, "log_aspect": torch.log(ref[:, 3] / ref[:, 2])}
    for key in ours:  # 4000 draws: the means' standard errors are below 0.01
        assert abs(ours[key].mean() - theirs[key].mean()) < 0.03, key
        assert abs(ours[key].std() - theirs[key].std()) < 0.03, key
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()


def test_color_ops_match_torchvision() -> None:
    x = torch.rand(6, 3, 10, 10, generator=_gen(0))
    for shift in (-0.1, 0.03, 0.5):
        got = aug_mod._adjust_hue(x, torch.full((6, 1, 1, 1), shift))
        torch.testing.assert_close(got, tvf.adjust_hue(x, shift), atol=1e-5, rtol=0)
    ops = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation)
    for op, fn in enumerate(ops):
        strength = [0.0, 0.0, 0.0, 0.0]
        strength[op] = 0.4
        y = aug_mod._color_jitter(x, tuple(strength), 1.0, _gen(op))  # type: ignore[arg-type]
        g = _gen(op)
        torch.rand(6, generator=g)  # the apply-or-not draws
        factors = 1 + 0.4 * (2 * torch.rand(6, 4, generator=g)[:, op] - 1)
        for k in range(6):
            ref = fn(x[k], float(factors[k]))
            torch.testing.assert_close(y[k], ref, atol=1e-5, rtol=0)


def test_grayscale_and_jitter_probability() -> None:
    x = _batch(64)
    y = BatchAugment(grayscale_p=1.0)(x)
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    y0 = BatchAugment(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.0)(x, _gen(0))
    torch.testing.assert_close(y0, x.float() / 255)


def test_augment_bad_args() -> None:
    with pytest.raises(ValueError, match="unknown augmentation preset"):
        make_augment("autoaugment")
    with pytest.raises(ValueError, match="probability"):
        BatchAugment(hflip=1.5)
    with pytest.raises(ValueError, match="both mean and std"):
        BatchAugment(mean=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match=r"batch, got shape \(3, 32, 32\); stack RGB images"):
        BatchAugment()(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"got torch.int64; convert with x.to\(torch.uint8\)"):
        BatchAugment()(torch.zeros(1, 3, 32, 32, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# IndexedDataset and BatchLoader


def _toy_arrays(n: int = 50, size: int = 8) -> ImageArrays:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ImageArrays(images, np.arange(n) % 5, [f"c{i}" for i in range(5)])


def test_indexed_dataset() -> None:
    arrays = _toy_arrays()
    ds = IndexedDataset(arrays)
    image, target, index = ds[7]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8
    assert torch.equal(image.permute(1, 2, 0), torch.from_numpy(arrays.images[7]))
    assert (target, index) == (2, 7) and ds[-1][2] == 49
    ds = IndexedDataset(arrays, transform=lambda t: t.float() / 255)
    batch = next(iter(DataLoader(ds, batch_size=10, shuffle=False)))
    assert batch[0].dtype == torch.float32 and batch[2].tolist() == list(range(10))
    with pytest.raises(IndexError):
        ds[50]


def test_batch_loader_epoch_covers_all_and_is_deterministic() -> None:
    arrays = _toy_arrays()
    loader = BatchLoader(arrays, 16, augment="crop_flip", seed=3)
    assert len(loader) == 4
    batches = list(loader)
    assert [len(b[2]) for b in batches] == [16, 16, 16, 2]
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(50))
    for images, targets, indices in batches:
        assert images.shape[1:] == (3, 8, 8)
        assert torch.equal(targets, torch.from_numpy(arrays.targets[indices.numpy()]))
    again = list(BatchLoader(arrays, 16, augment="crop_flip", seed=3))
    for a, b in zip(batches, again):
        assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[2], batches[0][2])
    other_seed = BatchLoader(arrays, 16, augment="crop_flip", seed=4)
    assert not torch.equal(next(iter(other_seed))[2], batches[0][2])


def test_batch_loader_resume_mid_epoch() -> None:
    loader = BatchLoader(_toy_arrays(), 8, augment=["simclr", "simclr"], seed=0, drop_last=True)
    full = list(loader.epoch_batches(2))
    tail = list(loader.epoch_batches(2, start_batch=3))
    assert len(full) == 6 and len(tail) == 3
    for a, b in zip(full[3:], tail):
        assert isinstance(a[0], list) and len(a[0]) == 2
        assert torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1])
        assert not torch.equal(a[0][0], a[0][1])  # two different views
        assert torch.equal(a[2], b[2])


def test_batch_loader_shards() -> None:
    arrays = _toy_arrays(n=50)
    shards = [BatchLoader(arrays, 4, seed=1, rank=r, world_size=3) for r in range(3)]
    seen = [torch.cat([b[2] for b in s]).tolist() for s in shards]
    assert [len(s) for s in seen] == [17, 17, 17]  # padded by repetition to 51
    assert set(sum(seen, [])) == set(range(50))
    dropped = [
        BatchLoader(arrays, 4, seed=1, rank=r, world_size=3, drop_last=True) for r in range(3)
    ]
    seen = [torch.cat([b[2] for b in s]).tolist() for s in dropped]
    assert [len(s) for s in seen] == [16, 16, 16]  # 16 per shard, then whole batches of 4
    flat = sum(seen, [])
    assert len(set(flat)) == len(flat)


def test_batch_loader_subset_raw_and_threads() -> None:
    arrays = _toy_arrays()
    threads = torch.get_num_threads()
    loader = BatchLoader(arrays, 5, indices=[3, 9, 27, 44], shuffle=False)
    images, targets, indices = next(iter(loader))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 8, 8)
    assert indices.tolist() == [3, 9, 27, 44]
    assert torch.equal(images[1].permute(1, 2, 0), torch.from_numpy(arrays.images[9]))
    assert torch.get_num_threads() == threads
    with pytest.raises(IndexError):
        BatchLoader(arrays, 5, indices=[50])
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(arrays, 5, rank=2, world_size=2)
