"""Iterating over :class:`ImageArrays`: :class:`IndexedDataset`, :func:`balanced_subset`,
:class:`BatchLoader`."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..devices import torch_threads
from .augment import BatchAugment, make_augment
from .datasets import ImageArrays

__all__ = ["IndexedDataset", "balanced_subset", "BatchLoader", "Batch"]

#: ``(images, targets, indices)``: images ``(B, 3, H, W)`` (or a list of such views),
#: targets ``(B,)`` int64, indices ``(B,)`` int64 positions in the full :class:`ImageArrays`.
Batch = tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, torch.Tensor]


class IndexedDataset(Dataset):
    """A map-style torch ``Dataset`` over :class:`ImageArrays` that also returns the index.

    Follows lightly's ``LightlyDataset`` idea of returning an identifier with each sample;
    here the identifier is the integer index, so that per-sample state (e.g. DeepCluster
    pseudo-labels, reassigned every epoch) can be looked up. Works with ``torch.utils.data``'s
    ``DataLoader``, ``Subset`` and ``DistributedSampler``.

    Attributes:
        arrays: The underlying images ``(N, H, W, 3)`` uint8 and targets ``(N,)``.
        transform: Called on each ``(3, H, W)`` uint8 image tensor (e.g. a torchvision v2
            transform), or ``None`` to return that tensor unchanged.
        as_pil: Hand the transform a ``PIL.Image`` instead (torchvision v1 and lightly
            transforms such as ``lightly.transforms.SimCLRTransform``, which end in
            ``ToTensor``).

    Example:
        >>> ds = IndexedDataset(arrays)  # doctest: +SKIP
        >>> image, target, index = ds[7]  # uint8 (3, 32, 32), int, 7  # doctest: +SKIP
        >>> ds = IndexedDataset(arrays, SimCLRTransform(32), as_pil=True)  # doctest: +SKIP
        >>> (view0, view1), target, index = ds[7]  # doctest: +SKIP
    """

    def __init__(
        self, arrays: ImageArrays, transform: Callable[[object], object] | None = None,
        as_pil: bool = False,
    ) -> None:
        self.arrays = arrays
        self.transform = transform
        self.as_pil = bool(as_pil)

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int) -> tuple[object, int, int]:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        if self.as_pil:
            image = Image.fromarray(self.arrays.images[index])
        else:
            image = torch.from_numpy(self.arrays.images[index]).permute(2, 0, 1).contiguous()
        out = self.transform(image) if self.transform is not None else image
        return out, int(self.arrays.targets[index]), index


def balanced_subset(
    targets: Sequence[int] | np.ndarray,
    n_per_class: int,
    seed: int,
    num_classes: int | None = None,
) -> np.ndarray:
    """Pick ``n_per_class`` random indices of every class, reproducibly.

    Args:
        targets: ``(N,)`` integer labels.
        n_per_class: Samples per class (> 0).
        seed: Seed of the ``numpy.random.default_rng`` that picks them.
        num_classes: If given, classes ``0 .. num_classes - 1`` must all be present;
            otherwise the classes are the distinct values of ``targets``.

    Returns:
        ``(C * n_per_class,)`` int64 indices into ``targets``, sorted ascending.

    Raises:
        ValueError: A class has fewer than ``n_per_class`` samples.
    """
    targets = np.asarray(targets)
    if targets.ndim != 1:
        raise ValueError(f"targets must be 1-d, got shape {targets.shape}")
    if n_per_class <= 0:
        raise ValueError(f"n_per_class must be positive, got {n_per_class}")
    classes = np.arange(num_classes) if num_classes is not None else np.unique(targets)
    rng = np.random.default_rng(seed)
    picked = []
    short = []
    for c in classes:
        idx = np.flatnonzero(targets == c)
        if len(idx) < n_per_class:
            short.append(f"class {int(c)}: {len(idx)}")
            continue
        picked.append(rng.choice(idx, size=n_per_class, replace=False))
    if short:
        raise ValueError(
            f"balanced_subset needs {n_per_class} samples per class, but too few in "
            f"{', '.join(short)}; lower n_per_class"
        )
    if not picked:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(picked)).astype(np.int64)


AugmentArg = BatchAugment | str | Callable[..., torch.Tensor] | None


class BatchLoader:
    """In-memory, seeded batch iterator with batched augmentation and rank sharding.

    Follows the contract of ``torch.utils.data.DataLoader`` + ``DistributedSampler``
    (``set_epoch``, same permutation on every rank, ``rank::world_size`` sharding, padding by
    repetition to equal shards unless ``drop_last``), without worker processes: gathering a
    batch from the uint8 array and augmenting it as one tensor op is faster on a small CPU.

    Reproducibility: the order of epoch ``e`` depends only on ``(seed, e)``; the augmentation
    of batch ``b`` only on ``(seed, e, rank, b)``. So ``epoch_batches(e, start_batch=b)``
    resumes mid-epoch exactly, with no RNG state to checkpoint beyond ``(epoch, batch)``.

    Attributes:
        arrays: Source images ``(N, H, W, 3)`` uint8 and targets ``(N,)``.
        indices: ``(M,)`` int64 positions in ``arrays`` iterated over (all by default).
        batch_size: Samples per batch on this rank.
        augments: One callable per returned view, each ``f(uint8 (B, 3, H, W), generator)``
            (e.g. :class:`BatchAugment`); empty for raw uint8 batches.
        shuffle, drop_last, seed, rank, world_size, num_threads: As in the arguments.
        device, pin_memory, prefetch: As in the arguments (where and how batches are built).
        epoch: Epoch used by ``iter(loader)``; set with :meth:`set_epoch`.

    Example:
        >>> loader = BatchLoader(arrays, 256, augment="crop_flip", seed=0)  # doctest: +SKIP
        >>> for epoch in range(2):  # doctest: +SKIP
        ...     loader.set_epoch(epoch)
        ...     for images, targets, indices in loader:
        ...         ...  # images: float32 (256, 3, 32, 32) in [0, 1]
    """

    def __init__(
        self,
        arrays: ImageArrays,
        batch_size: int,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        augment: AugmentArg | Sequence[AugmentArg] = None,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_threads: int | None = 1,
        device: torch.device | str | None = None,
        pin_memory: bool = False,
        prefetch: int = 0,
    ) -> None:
        """
        Args:
            arrays: The data.
            batch_size: Samples per batch (per rank).
            indices: Optional subset of ``arrays`` (e.g. from :func:`balanced_subset`).
            augment: ``None`` for uint8 ``(B, 3, H, W)`` batches; a :class:`BatchAugment`, a
                preset name (``"none"``, ``"crop_flip"``, ``"simclr"``) or a callable for one
                float view; a list/tuple of those for several views (``images`` is then a list,
                e.g. ``["simclr", "simclr"]`` for two SimCLR views).
            shuffle: Shuffle every epoch (seeded); else keep ``indices`` order.
            drop_last: Drop the last incomplete batch, and truncate (rather than pad by
                repetition) the index list to a multiple of ``world_size``.
            seed: Base seed.
            rank: This process's shard (as ``DistributedSampler``).
            world_size: Number of shards.
            num_threads: torch intra-op threads while a batch is built (restored after; see
                :func:`~adapters.devices.torch_threads`). ``None`` keeps torch's setting.
                Not applied while ``prefetch`` builds batches on a thread (the setting is
                process-wide and would slow the training step beside it).
            device: Where the augmentations run: the uint8 batch moves there first (a GPU:
                the images travel as uint8, 4x fewer bytes than float, and the ops run there).
                None: on the CPU. The random draws stay on the CPU generator, so a batch's
                crops, flips and jitter factors do not depend on the device.
            pin_memory: Pin each CPU batch's memory (CUDA only: it lets ``.to(device,
                non_blocking=True)`` overlap the copy with compute).
            prefetch: Batches built ahead on a background thread while the caller computes
                (0: built on demand). Batches and their order are the same for every value.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world={world_size}")
        self.arrays = arrays
        n = len(arrays)
        if indices is None:
            self.indices = np.arange(n, dtype=np.int64)
        else:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= n):
                lo, hi = self.indices.min(), self.indices.max()
                raise IndexError(f"indices must lie in [0, {n}), got [{lo}, {hi}]")
        if len(self.indices) == 0:
            raise ValueError("BatchLoader needs at least one sample")
        self.batch_size = batch_size
        self._multi_view = isinstance(augment, (list, tuple))
        views = list(augment) if self._multi_view else ([] if augment is None else [augment])  # type: ignore[arg-type]
        size = arrays.image_size[0]
        self.augments: list[Callable[..., torch.Tensor]] = [
            make_augment(a, size=size) if isinstance(a, str) else a  # type: ignore[misc]
            for a in views
            if a is not None
        ]
        if len(self.augments) != len(views):
            raise ValueError("None is not allowed inside a list of augmentations")
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        self.num_threads = num_threads
        self.device = None if device is None else torch.device(device)
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory needs CUDA (pinned memory speeds up copies to a GPU); "
                             "use pin_memory=False on a machine without one")
        self.pin_memory = bool(pin_memory)
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 batches, got {prefetch}")
        self.prefetch = int(prefetch)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch that ``iter(loader)`` runs (like ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def _shard_size(self) -> int:
        m, ws = len(self.indices), self.world_size
        return m // ws if self.drop_last else -(-m // ws)

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        s = self._shard_size()
        return s // self.batch_size if self.drop_last else -(-s // self.batch_size)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's sample order for ``epoch``: ``(shard size,)`` int64 positions in arrays."""
        order = self.indices
        if self.shuffle:
            rng = np.random.default_rng([self.seed, int(epoch)])
            order = order[rng.permutation(len(order))]
        total = self._shard_size() * self.world_size
        order = order[:total] if total <= len(order) else np.resize(order, total)
        return order[self.rank :: self.world_size]

    def batch_generator(self, epoch: int, batch: int) -> torch.Generator:
        """The ``torch.Generator`` that augments batch ``batch`` of ``epoch`` on this rank."""
        state = np.random.SeedSequence([self.seed, int(epoch), self.rank, int(batch)])
        return torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """Yield the batches of ``epoch`` from batch number ``start_batch`` on (for resume)."""
        order = self.epoch_indices(epoch)
        n_batches = len(self)
        if not 0 <= start_batch <= n_batches:
            raise ValueError(f"start_batch must be in [0, {n_batches}], got {start_batch}")
        make = [lambda b=b: self.make_batch(order[b * self.batch_size:(b + 1) * self.batch_size],
                                            self.batch_generator(epoch, b), self.prefetch == 0)
                for b in range(start_batch, n_batches)]
        if self.prefetch == 0:
            for build in make:
                yield build()
        else:
            yield from _ahead(make, self.prefetch)

    def make_batch(self, idx: np.ndarray, generator: torch.Generator | None = None,
                   set_threads: bool = True) -> Batch:
        """Gather samples ``idx`` (``(B,)`` positions in arrays) and augment them (with
        ``num_threads`` torch threads when ``set_threads``)."""
        with torch_threads(self.num_threads if set_threads else None):
            return self._make_batch(idx, generator)

    def _make_batch(self, idx: np.ndarray, generator: torch.Generator | None) -> Batch:
        raw = torch.from_numpy(self.arrays.images[idx]).permute(0, 3, 1, 2)  # (B, 3, H, W)
        targets = torch.from_numpy(self.arrays.targets[idx])
        indices = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
        on_cpu = self.device is None or self.device.type == "cpu"
        if not on_cpu:  # augment on the device: copy the uint8 batch there first
            raw = raw.contiguous()
            raw = (raw.pin_memory() if self.pin_memory else raw).to(
                self.device, non_blocking=self.pin_memory)
        views = [aug(raw, generator) for aug in self.augments] or [raw.contiguous()]
        if self.pin_memory and on_cpu:
            views = [v.pin_memory() for v in views]
        if not self.augments:
            return views[0], targets, indices
        return (views if self._multi_view else views[0]), targets, indices

    def __iter__(self) -> Iterator[Batch]:
        return self.epoch_batches(self.epoch)


def _ahead(builders: list[Callable[[], Batch]], depth: int) -> Iterator[Batch]:
    """Yield ``builder()`` for each builder in order, running up to ``depth`` of them ahead on
    a background thread; an exception in a builder is raised here, at its batch."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        for build in builders:
            if stop.is_set():
                return
            try:
                item: tuple[bool, object] = (True, build())
            except BaseException as exc:  # handed to the consumer, raised at its batch
                item = (False, exc)
            while not stop.is_set():
                try:
                    slots.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if not item[0]:
                return

    thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
    thread.start()
    try:
        for _ in builders:
            ok, value = slots.get()
            if not ok:
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
