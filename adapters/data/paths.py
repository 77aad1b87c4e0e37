"""Where data lives (``resolve_data_root``) and the data errors.

The cache folder is recon-aux's own (:func:`recon_aux.weights.cache_dir`, ``$RECON_AUX_CACHE``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "DATA_ENV",
    "DOWNLOAD_OPTIONS",
    "FIX_HINT",
    "ROOT_OPTIONS",
    "DatasetError",
    "DatasetNotFoundError",
    "resolve_data_root",
]

DATA_ENV = "RECON_AUX_DATA"

#: Every way to name the data folder: the run config's key, the examples' flag, the Python
#: argument, the environment variable.
ROOT_OPTIONS = (f"data.root=DIR (recon-aux train; common.data.root=DIR for bench and ablate), "
                f"--data-root DIR (the examples), data_root=DIR (Python) or {DATA_ENV}=DIR")
#: Every way to let torchvision download a named data set.
DOWNLOAD_OPTIONS = ("data.download=true (recon-aux train), --download (the examples) or "
                    "download=True (Python)")

FIX_HINT = (
    f"Point {ROOT_OPTIONS} at a local folder that holds the data (e.g. cifar10-jpg.tar.gz, or "
    "torchvision's cifar-10-batches-py)."
)


class DatasetError(RuntimeError):
    """A data set is present but unusable (corrupt archive, bad checksum, odd layout)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A data set, or the folder that should hold it, could not be found."""


def resolve_data_root(data_root: str | os.PathLike[str] | None = None) -> Path:
    """Return the data root folder.

    Order: the explicit ``data_root`` argument, else the environment variable
    ``RECON_AUX_DATA``, else a :class:`DatasetNotFoundError` that names every way to give one
    (:data:`ROOT_OPTIONS`).

    Args:
        data_root: Folder holding the data sets, or ``None`` to use the environment.

    Returns:
        The absolute path of an existing directory.

    Raises:
        DatasetNotFoundError: Neither is given, or the folder does not exist.
    """
    source = "as given by data.root, --data-root or data_root"
    if data_root is None or str(data_root) == "":
        env = os.environ.get(DATA_ENV, "")
        if not env:
            raise DatasetNotFoundError(f"No data root given and {DATA_ENV} is not set. {FIX_HINT}")
        data_root, source = env, f"from the {DATA_ENV} environment variable"
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Data root {str(root)!r} ({source}) is not an existing directory. {FIX_HINT}"
        )
    return root.resolve()
