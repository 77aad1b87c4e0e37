"""Data loading for recon-aux: in-memory uint8 arrays, batched CPU augmentation, seeded loaders.

Typical use::

    from adapters.data import BatchLoader, load_dataset

    train = load_dataset("cifar10", data_root=None, train=True)  # $RECON_AUX_DATA
    loader = BatchLoader(train, 256, augment=["simclr", "simclr"], seed=0, drop_last=True)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for (view1, view2), targets, indices in loader:
            ...
"""

from .augment import PRESETS, BatchAugment, make_augment
from .datasets import (
    CIFAR10_JPG_NAME,
    CIFAR10_JPG_SHA256,
    DATASET_NAMES,
    ImageArrays,
    load_dataset,
)
from .loader import Batch, BatchLoader, IndexedDataset, balanced_subset
from .paths import (
    DATA_ENV,
    DatasetError,
    DatasetNotFoundError,
    resolve_data_root,
)

__all__ = [
    "Batch",
    "BatchAugment",
    "BatchLoader",
    "CIFAR10_JPG_NAME",
    "CIFAR10_JPG_SHA256",
    "DATASET_NAMES",
    "DATA_ENV",
    "DatasetError",
    "DatasetNotFoundError",
    "ImageArrays",
    "IndexedDataset",
    "PRESETS",
    "balanced_subset",
    "load_dataset",
    "make_augment",
    "resolve_data_root",
]
