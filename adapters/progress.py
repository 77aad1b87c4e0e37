"""The harness's one progress bar: tqdm when it is wanted and installed, else nothing.

Every loop that may show a bar (training epochs, feature extraction, probe training, kNN, the
bench matrix) wraps its iterable with :func:`progress`. tqdm is an optional dependency (the
``harness`` extra): without it the iterable comes back unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

__all__ = ["progress"]

T = TypeVar("T")


def progress(iterable: Iterable[T], *, enabled: bool | None = None, total: int | None = None,
             desc: str = "", unit: str = "it") -> Iterable[T]:
    """``iterable`` inside a tqdm bar, or unchanged.

    Args:
        iterable: What to iterate.
        enabled: ``None`` shows a bar only when stderr is a terminal; ``True`` always (without
            a terminal tqdm writes plain lines); ``False`` never.
        total: Length, when ``len(iterable)`` does not give it.
        desc: The bar's label.
        unit: What one step is (``"run"`` for the bench matrix).

    Returns:
        A ``tqdm`` object (iterable, with ``set_description``) or ``iterable`` itself, so
        ``bar is iterable`` tells that no bar is shown.

    Example:
        >>> for batch in progress([1, 2, 3], enabled=False):
        ...     pass
    """
    if enabled is None:
        enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # optional dependency
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
