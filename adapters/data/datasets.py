"""Load image data sets into memory as uint8 arrays: :class:`ImageArrays` and :func:`load_dataset`.

Supported sources:

* ``"cifar10"``: the JPEG archive ``cifar10-jpg.tar.gz`` in the data root (sha256-checked, decoded
  once into a cached ``.npz``), else torchvision's ``cifar-10-batches-py``, else torchvision's
  download when ``download=True``.
* ``"cifar100"``, ``"svhn"``: torchvision's own dataset classes (files in the data root or the
  cache, or downloaded when ``download=True``).
* ``"fashion-mnist"``: the four IDX files (``.gz`` or not) from torchvision's ``FashionMNIST/raw``
  folder, a ``fashion-mnist`` folder in the data root, or Debian's ``dataset-fashion-mnist``
  package (``/usr/share/datasets/fashion-mnist``); grey-scale, zero-padded from 28x28 to 32x32 and
  replicated to 3 channels.
* a path to an ImageFolder tree, or to a ``.tar``/``.tar.gz``/``.tgz`` of one, decoded once into
  a cached ``.npz``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from recon_aux.weights import cache_dir, sha256_of

from .paths import (
    DATA_ENV,
    DOWNLOAD_OPTIONS,
    FIX_HINT,
    DatasetError,
    DatasetNotFoundError,
    resolve_data_root,
)

__all__ = [
    "CIFAR10_JPG_NAME",
    "CIFAR10_JPG_SHA256",
    "DATASET_NAMES",
    "ImageArrays",
    "load_dataset",
]

#: File name and sha256 of the JPEG copy of CIFAR-10 (see the data README).
CIFAR10_JPG_NAME = "cifar10-jpg.tar.gz"
CIFAR10_JPG_SHA256 = "b215d45e51121fd309686efffe2998e003a79756f22ad7671c80bc14564b4c2a"
_KNOWN_ARCHIVES = {
    # name: (sha256, {split: number of images}, number of classes)
    CIFAR10_JPG_NAME: (CIFAR10_JPG_SHA256, {"train": 50_000, "test": 10_000}, 10),
}

DATASET_NAMES = ("cifar10", "cifar100", "svhn", "fashion-mnist")
_ALIASES = {
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
    "svhn": "svhn",
    "fashion-mnist": "fashion-mnist",
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
}

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
_TRAIN_SPLITS = ("train",)
_TEST_SPLITS = ("test", "val", "valid", "validation")
_CACHE_FORMAT = 2  # bump when the cache layout, decoding or what is read changes (2: links)


@dataclass
class ImageArrays:
    """An in-memory image classification set: uint8 pixels, int64 labels, class names.

    Follows the torchvision convention for CIFAR (``dataset.data`` is ``(N, H, W, 3)`` uint8,
    label ``i`` is ``classes[i]``, classes of an ImageFolder tree are its sorted folder names).

    Attributes:
        images: ``np.uint8`` array of shape ``(N, H, W, 3)``, RGB, channels last.
        targets: ``np.int64`` array of shape ``(N,)``, values in ``[0, len(classes))``.
        classes: Class names; ``targets == i`` means ``classes[i]``.

    Example:
        >>> arrays = load_dataset("cifar10", data_root="path/to/data")  # doctest: +SKIP
        >>> arrays.images.shape, arrays.targets[:3], arrays.classes[0]  # doctest: +SKIP
        ((50000, 32, 32, 3), array([0, 0, 0]), 'airplane')
    """

    images: np.ndarray
    targets: np.ndarray
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                "ImageArrays.images must be uint8 of shape (N, H, W, 3), got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        targets = np.asarray(self.targets)
        if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
            shape = tuple(targets.shape)
            raise ValueError(f"targets must be a 1-d integer array, got {targets.dtype} {shape}")
        self.targets = targets.astype(np.int64, copy=False)
        self.classes = list(self.classes)
        if len(self.targets) != len(self.images):
            raise ValueError(
                f"{len(self.images)} images but {len(self.targets)} targets; they must match"
            )
        n_cls = len(self.classes)
        if len(self.targets) and (self.targets.min() < 0 or self.targets.max() >= n_cls):
            raise ValueError(
                f"targets span [{self.targets.min()}, {self.targets.max()}] but there are "
                f"{len(self.classes)} classes; targets must be class indices 0..{n_cls - 1}: "
                "list every class in classes, in the targets' order"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        """Number of classes, ``len(classes)``."""
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of every image."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageArrays:
        """Return a copy restricted to ``indices`` (shape ``(M,)``), same ``classes``."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageArrays(self.images[idx], self.targets[idx], list(self.classes))


# --------------------------------------------------------------------------------------------
# public entry point


def load_dataset(
    name: str | os.PathLike[str],
    data_root: str | os.PathLike[str] | None = None,
    train: bool = True,
    download: bool = False,
    image_size: int | None = None,
) -> ImageArrays:
    """Load a data set split fully into memory.

    Args:
        name: ``"cifar10"``, ``"cifar100"``, ``"svhn"``, ``"fashion-mnist"``, or a path to an
            ImageFolder directory or a ``.tar``/``.tar.gz``/``.tgz`` of one. A tree with
            ``train/`` and ``test/`` (or ``val/``) folders has two splits; a tree of class
            folders alone has one split, returned for ``train=True`` only. A relative path is
            looked up in the working directory, then in the data root.
        data_root: Folder holding the data (see :func:`resolve_data_root`); ``None`` uses
            ``$RECON_AUX_DATA``. Named sets may also be found in, or downloaded to, the cache
            (``$RECON_AUX_CACHE/torchvision``) when no data root is set.
        train: Training split if ``True``, else the test split.
        download: Let torchvision download a named set into the cache when no local copy is
            found (needs internet). Never downloads otherwise.
        image_size: For ImageFolder sources only: resize every image to
            ``image_size x image_size`` (bicubic). Without it all images must share one size.

    Returns:
        :class:`ImageArrays` with ``images`` ``(N, H, W, 3)`` uint8 and ``targets`` ``(N,)``.

    Raises:
        DatasetNotFoundError: Nothing found; the message lists where it looked and the fix.
        DatasetError: The data is corrupt, fails its checksum, or has an unexpected layout.
    """
    key = _ALIASES.get(str(name).lower()) if isinstance(name, str) else None
    if key is None:
        if image_size is not None and image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        return _load_image_tree(_find_path(name, data_root), train, image_size)
    if image_size is not None:
        raise ValueError(
            f"image_size applies to ImageFolder sources only, not to {key!r}; resize with an "
            "augmentation instead"
        )
    root = _optional_root(data_root)
    if key == "cifar10":
        if root is not None and (root / CIFAR10_JPG_NAME).is_file():
            return _load_image_tree(root / CIFAR10_JPG_NAME, train, None)
        looked = [f"{CIFAR10_JPG_NAME} in the data root"]
        return _load_torchvision("cifar10", root, train, download, extra_looked_for=looked)
    if key in ("cifar100", "svhn"):
        return _load_torchvision(key, root, train, download)
    return _load_fashion_mnist(root, train, download)


# --------------------------------------------------------------------------------------------
# roots and paths


def _optional_root(data_root: str | os.PathLike[str] | None) -> Path | None:
    """The data root, or ``None`` when neither the argument nor the env var is set."""
    if (data_root is None or str(data_root) == "") and not os.environ.get(DATA_ENV):
        return None
    return resolve_data_root(data_root)


def _find_path(name: str | os.PathLike[str], data_root: str | os.PathLike[str] | None) -> Path:
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve()
    looked = [str(path.absolute())]
    if not path.is_absolute():
        root = _optional_root(data_root)
        if root is not None:
            if (root / path).exists():
                return (root / path).resolve()
            looked.append(str(root / path))
    raise DatasetNotFoundError(
        f"Data set {str(name)!r} is not one of {', '.join(DATASET_NAMES)} and no such path "
        f"exists (looked for: {'; '.join(looked)}). Give a known name, or the path of an "
        "ImageFolder directory or .tar.gz of one. " + FIX_HINT
    )


# --------------------------------------------------------------------------------------------
# ImageFolder trees (directories and tar archives), decoded once and cached as .npz


def _load_image_tree(source: Path, train: bool, image_size: int | None) -> ImageArrays:
    """Load one split of an ImageFolder directory or tar archive, through the ``.npz`` cache."""
    cache_file = _tree_cache_file(source, image_size)
    splits = _read_cache(cache_file)
    if splits is None:
        if source.is_dir():
            entries = _read_tree_dir(source, image_size)
        else:
            entries = _read_tree_tar(source, image_size)
        splits = _assemble_tree(entries, source)
        _check_known_counts(source, splits)
        try:
            _write_cache(cache_file, splits)
        except OSError as exc:
            warnings.warn(
                f"Could not write the decoded cache {cache_file} ({exc}); the next load will "
                "decode again. Set RECON_AUX_CACHE to a writable folder.",
                stacklevel=2,
            )
    return _pick_split(splits, train, source)


def _tree_cache_file(source: Path, image_size: int | None) -> Path:
    """Cache file for ``source``; verifies the sha256 of known archives on every call."""
    known = _KNOWN_ARCHIVES.get(source.name) if source.is_file() else None
    if known is not None:
        got = sha256_of(source)
        if got != known[0]:
            raise DatasetError(
                f"{source}: sha256 is {got}, expected {known[0]} (the value in the data "
                "README). The file is corrupt, truncated or a different version: copy it "
                f"again, or point data.root (--data-root, {DATA_ENV}) at a folder with a good copy."
            )
        ident = f"sha256:{got}"
    elif source.is_file():
        st = source.stat()
        ident = f"file:{source}:{st.st_size}:{st.st_mtime_ns}"
    else:
        parts = [f"dir:{source}"]
        for path in sorted(_iter_image_files(source)):
            st = path.stat()
            parts.append(f"{path.relative_to(source)}:{st.st_size}:{st.st_mtime_ns}")
        ident = "\n".join(parts)
    ident += f"|size={image_size}|v{_CACHE_FORMAT}"
    key = hashlib.sha256(ident.encode()).hexdigest()[:16]
    stem = source.name
    for ext in (".tar.gz", ".tgz", ".tar"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    return cache_dir() / "arrays" / f"{stem}-{key}.npz"


def _read_cache(path: Path) -> dict[str, ImageArrays] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            classes = [str(c) for c in npz["classes"]]
            splits = {
                str(s): ImageArrays(npz[f"{s}_images"], npz[f"{s}_targets"], classes)
                for s in npz["splits"]
            }
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        warnings.warn(f"Cache file {path} is unreadable ({exc}); decoding again.", stacklevel=3)
        return None
    return splits


def _write_cache(path: Path, splits: dict[str, ImageArrays]) -> None:
    """Write ``splits`` to ``path`` atomically (temporary file in the same folder + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "splits": np.array(sorted(splits)),
        "classes": np.array(next(iter(splits.values())).classes),
    }
    for split, data in splits.items():
        arrays[f"{split}_images"] = data.images
        arrays[f"{split}_targets"] = data.targets
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _is_image_name(parts: Sequence[str]) -> bool:
    return parts[-1].lower().endswith(_IMAGE_EXTENSIONS) and not any(
        p.startswith(".") for p in parts
    )


def _iter_image_files(root: Path) -> Iterator[Path]:
    # Folder links are followed, as torchvision's ImageFolder does (a linked class folder would
    # otherwise vanish from the data); each real folder is read once, so a link loop ends.
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fname in filenames:
            if _is_image_name((fname,)):
                yield Path(dirpath) / fname


def _decode_image(data: bytes, where: str, image_size: int | None) -> np.ndarray:
    """Decode one image file to ``(H, W, 3)`` uint8 RGB with PIL."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
        if image_size is not None and rgb.size != (image_size, image_size):
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(
            f"{where}: cannot decode image ({type(exc).__name__}: {exc}). Expected a readable "
            "image file. Replace the file, or point data.root (--data-root, "
            f"{DATA_ENV}) at a good copy."
        ) from None


_Entries = list[tuple[tuple[str, ...], np.ndarray]]  # (path parts, (H, W, 3) uint8 image)


def _read_tree_dir(root: Path, image_size: int | None) -> _Entries:
    entries = []
    for path in _iter_image_files(root):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read ({exc})") from None
        entries.append((path.relative_to(root).parts, _decode_image(data, str(path), image_size)))
    return entries


def _read_tree_tar(archive: Path, image_size: int | None) -> _Entries:
    """Decode every image of a tar(.gz) in one streaming pass, without extracting to disk."""
    entries = []
    try:
        with tarfile.open(archive, mode="r|*") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if not member.isfile():
                    if (member.issym() or member.islnk()) and parts and _is_image_name(parts):
                        raise DatasetError(
                            f"{archive}:{member.name} is a link, not an image file; the "
                            "archive must hold the images themselves: pack it again following "
                            "links (tar --dereference, -h).")
                    continue
                if not parts or not _is_image_name(parts):
                    continue
                fobj = tar.extractfile(member)
                assert fobj is not None  # regular file
                where = f"{archive}:{member.name}"
                entries.append((parts, _decode_image(fobj.read(), where, image_size)))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise DatasetError(
            f"{archive}: the archive is corrupt, truncated or not a tar file "
            f"({type(exc).__name__}: {exc}). Expected a complete .tar/.tar.gz of an ImageFolder "
            "tree. Copy it again, or point data.root (--data-root, "
            f"{DATA_ENV}) at a folder with a good copy."
        ) from None
    return entries


def _assemble_tree(entries: _Entries, source: Path) -> dict[str, ImageArrays]:
    """Turn ``(path parts, HxWx3 image)`` entries into splits, labels = sorted class folders."""
    layout_help = (
        "Expected an ImageFolder tree: <class>/<image> or <split>/<class>/<image> with split in "
        f"{_TRAIN_SPLITS + _TEST_SPLITS}, optionally under one top folder."
    )
    if not entries:
        exts = ", ".join(_IMAGE_EXTENSIONS)
        raise DatasetError(f"{source}: no image files ({exts}) found. " + layout_help)
    paths = [p for p, _ in entries]
    splits_all = _TRAIN_SPLITS + _TEST_SPLITS
    while (
        all(len(p) > 2 for p in paths)
        and len({p[0] for p in paths}) == 1
        and paths[0][0].lower() not in splits_all
    ):
        paths = [p[1:] for p in paths]
    depths = {len(p) for p in paths}
    if depths == {2}:
        keyed = [("all", p[0], p[1]) for p in paths]
    elif depths == {3} and all(p[0].lower() in splits_all for p in paths):
        keyed = [(p[0].lower(), p[1], p[2]) for p in paths]
    else:
        odd = sorted({"/".join(p) for p in paths if len(p) not in (2, 3)})[:3] or [
            "/".join(paths[0])
        ]
        raise DatasetError(f"{source}: unexpected layout (e.g. {odd}). " + layout_help)
    classes = sorted({c for _, c, _ in keyed})
    class_index = {c: i for i, c in enumerate(classes)}
    order = sorted(range(len(keyed)), key=lambda i: keyed[i])
    grouped: dict[str, list[int]] = {}
    for i in order:
        grouped.setdefault(keyed[i][0], []).append(i)
    splits = {}
    for split, idx in grouped.items():
        shapes = {entries[i][1].shape for i in idx}
        if len(shapes) > 1:
            raise DatasetError(
                f"{source}: images of split {split!r} have different sizes "
                f"({sorted(shapes)[:4]}); pass image_size=S to resize them all to SxS."
            )
        images = np.stack([entries[i][1] for i in idx])
        targets = np.array([class_index[keyed[i][1]] for i in idx], dtype=np.int64)
        splits[split] = ImageArrays(images, targets, classes)
    return splits


def _check_known_counts(source: Path, splits: dict[str, ImageArrays]) -> None:
    known = _KNOWN_ARCHIVES.get(source.name) if source.is_file() else None
    if known is None:
        return
    _, counts, n_classes = known
    got = {s: len(a) for s, a in splits.items()}
    classes = next(iter(splits.values())).num_classes
    if got != counts or classes != n_classes:
        raise DatasetError(
            f"{source}: decoded {got} images in {classes} classes, expected {counts} in "
            f"{n_classes}. Copy the archive again."
        )


def _pick_split(splits: dict[str, ImageArrays], train: bool, source: Path) -> ImageArrays:
    if "all" in splits:
        if train:
            return splits["all"]
        raise DatasetError(
            f"{source} has no train/test split (class folders only), so train=False has no "
            "data. Use a tree with train/ and test/ (or val/) folders, or load this one with "
            "train=True."
        )
    wanted = _TRAIN_SPLITS if train else _TEST_SPLITS
    for split in wanted:
        if split in splits:
            return splits[split]
    raise DatasetError(
        f"{source} has splits {sorted(splits)} but none of {list(wanted)} "
        f"(asked for train={train})."
    )


# --------------------------------------------------------------------------------------------
# torchvision data sets


_TV_MARKERS = {
    # name: (class name, marker paths relative to a root, sub-folder tried under the data root)
    "cifar10": ("CIFAR10", ("cifar-10-batches-py",), None),
    "cifar100": ("CIFAR100", ("cifar-100-python",), None),
    "svhn": ("SVHN", ("train_32x32.mat", "test_32x32.mat"), "svhn"),
}


def _torchvision_cache() -> Path:
    return cache_dir() / "torchvision"


def _load_torchvision(
    key: str,
    root: Path | None,
    train: bool,
    download: bool,
    extra_looked_for: Sequence[str] = (),
) -> ImageArrays:
    import torchvision.datasets as tvd

    cls_name, markers, sub = _TV_MARKERS[key]
    marker = markers[0] if key != "svhn" else markers[0 if train else 1]
    candidates = []
    if root is not None:
        candidates.append(root)
        if sub is not None:
            candidates.append(root / sub)
    download_root = _torchvision_cache() / (sub or "")
    candidates.append(download_root)
    found = next((c for c in candidates if (c / marker).exists()), None)
    if found is None and not download:
        looked = list(extra_looked_for) + [str(c / marker) for c in candidates]
        no_root = "" if root is not None else f" No data root was given and {DATA_ENV} is unset."
        raise DatasetNotFoundError(
            f"{key}: no local copy found (looked for: {'; '.join(looked)}).{no_root} "
            + FIX_HINT
            + f" With internet access, set {DOWNLOAD_OPTIONS} to let torchvision download it "
            f"into {download_root}."
        )
    cls = getattr(tvd, cls_name)
    split_kw = {"split": "train" if train else "test"} if key == "svhn" else {"train": train}
    target = found if found is not None else download_root
    try:
        ds = cls(str(target), download=found is None, **split_kw)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DatasetError(
            f"{key}: torchvision rejected the files under {target} ({exc}); they are incomplete "
            "or corrupt (md5 mismatch). Delete them and copy or download again, or point "
            f"data.root (--data-root, {DATA_ENV}) at a good copy."
        ) from None
    except OSError as exc:  # network errors (URLError is an OSError)
        raise DatasetNotFoundError(
            f"{key}: download into {target} failed ({type(exc).__name__}: {exc}). Without "
            f"internet, copy the data to a local folder and use it: {FIX_HINT}"
        ) from None
    if key == "svhn":
        images = np.ascontiguousarray(np.transpose(ds.data, (0, 2, 3, 1)))
        targets = np.asarray(ds.labels, dtype=np.int64)
        classes = [str(i) for i in range(10)]
    else:
        images = np.ascontiguousarray(ds.data)
        targets = np.asarray(ds.targets, dtype=np.int64)
        classes = list(ds.classes)
    return ImageArrays(images, targets, classes)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST from IDX files


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) of unsigned bytes with ``ndim`` dimensions."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        msg = f"{path}: cannot read ({type(exc).__name__}: {exc}); copy it again."
        raise DatasetError(msg) from None
    magic = 0x0800 + ndim
    head = 4 + 4 * ndim
    if len(data) < head or int.from_bytes(data[:4], "big") != magic:
        raise DatasetError(f"{path}: not an IDX file of {ndim}-d unsigned bytes (magic {magic:#x})")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - head != int(np.prod(shape)):
        raise DatasetError(
            f"{path}: header says shape {shape} but holds {len(data) - head} bytes (truncated?)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=head).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _load_fashion_mnist(root: Path | None, train: bool, download: bool) -> ImageArrays:
    prefix = "train" if train else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    tv_raw = _torchvision_cache() / "FashionMNIST" / "raw"
    folders = []
    if root is not None:
        folders += [root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    folders += [DEBIAN_FASHION_MNIST, tv_raw]
    found = next((f for f in folders if all(_find_idx(f, s) for s in stems)), None)
    if found is None and download:
        import torchvision.datasets as tvd

        try:
            tvd.FashionMNIST(str(_torchvision_cache()), train=train, download=True)
        except (OSError, RuntimeError) as exc:
            raise DatasetNotFoundError(
                f"fashion-mnist: download into {tv_raw} failed ({type(exc).__name__}: {exc}). "
                f"Without internet, copy the IDX files to a local folder: {FIX_HINT}"
            ) from None
        found = tv_raw
    if found is None:
        no_root = "" if root is not None else f" No data root was given and {DATA_ENV} is unset."
        raise DatasetNotFoundError(
            f"fashion-mnist: {stems[0]}[.gz] and {stems[1]}[.gz] not found in any of "
            f"{[str(f) for f in folders]}.{no_root} Install Debian's dataset-fashion-mnist "
            f"package, or with internet access set {DOWNLOAD_OPTIONS}, or {FIX_HINT}"
        )
    images = _read_idx(_find_idx(found, stems[0]), 3)  # type: ignore[arg-type]
    labels = _read_idx(_find_idx(found, stems[1]), 1)  # type: ignore[arg-type]
    if len(images) != len(labels) or images.shape[1:] != (28, 28):
        raise DatasetError(
            f"fashion-mnist in {found}: {images.shape} images vs {labels.shape} labels; "
            "expected (N, 28, 28) and (N,)"
        )
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    rgb = np.ascontiguousarray(np.repeat(padded[..., None], 3, axis=-1))
    return ImageArrays(rgb, labels.astype(np.int64), list(FASHION_MNIST_CLASSES))
