"""Normalised mutual information between two labelings (DeepCluster's clustering diagnostics).

Paper: Caron et al., "Deep Clustering for Unsupervised Learning of Visual Features" (ECCV 2018),
Sec. 5.1 / Fig. 2: NMI between the cluster assignments and the ImageNet labels, and between the
assignments of consecutive epochs ("NMI t-1 / t").
Code: facebookresearch/deepcluster, ``main.py``, which calls scikit-learn's
``normalized_mutual_info_score`` on ``arrange_clustering(images_lists)`` of the current and the
previous epoch. scikit-learn is not a dependency here, so this is a numpy implementation of the
same quantity; the default normaliser ``sqrt(H(a) H(b))`` ("geometric") is the scikit-learn
default of the version DeepCluster was written against (scikit-learn >= 0.22 defaults to the
arithmetic mean; pass ``average="arithmetic"`` to match that).
"""

from __future__ import annotations

from typing import Any

import numpy as np

AVERAGES = ("geometric", "arithmetic", "min", "max")


def _as_labels(labels: Any, name: str) -> np.ndarray:
    if hasattr(labels, "detach"):  # torch.Tensor, possibly on an accelerator
        labels = labels.detach().cpu().numpy()
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D sequence of labels, got shape {array.shape}; pass one label "
            "per sample (e.g. logits.argmax(1))."
        )
    return array


def _entropy(probabilities: np.ndarray) -> float:
    p = probabilities[probabilities > 0]
    return float(-(p * np.log(p)).sum())


def nmi(a: Any, b: Any, average: str = "geometric") -> float:
    """Normalised mutual information NMI(a, b) = I(a; b) / mean(H(a), H(b)), in [0, 1].

    Label values are arbitrary (any hashable numpy dtype: ints, strings); only the partition
    matters, so permuting label names leaves the score unchanged.

    Args:
        a: Labels of shape (N,): list, numpy array or torch tensor (e.g. pseudo-labels).
        b: Labels of shape (N,) (e.g. true labels, or the previous epoch's pseudo-labels).
        average: Normaliser of the mutual information: ``"geometric"`` sqrt(H(a) H(b))
            (default, DeepCluster-era scikit-learn), ``"arithmetic"`` (H(a) + H(b)) / 2
            (scikit-learn >= 0.22), ``"min"`` or ``"max"``.

    Returns:
        NMI as a Python float. 1.0 for identical partitions (including both constant); 0.0 when
        exactly one labeling is constant; close to 0 for independent labelings (slightly
        positive at finite N).

    Example:
        >>> nmi([0, 0, 1, 1], [1, 1, 0, 0])
        1.0
        >>> round(nmi([0, 0, 1, 1], [0, 1, 0, 1]), 6)
        0.0
    """
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}.")
    a_arr, b_arr = _as_labels(a, "a"), _as_labels(b, "b")
    if a_arr.shape[0] != b_arr.shape[0]:
        raise ValueError(
            f"label count mismatch: a has {a_arr.shape[0]} labels, b has {b_arr.shape[0]}; both "
            "must label the same samples in the same order."
        )
    n = a_arr.shape[0]
    if n == 0:
        raise ValueError("nmi needs at least one sample.")
    _, a_idx = np.unique(a_arr, return_inverse=True)
    _, b_idx = np.unique(b_arr, return_inverse=True)
    a_idx, b_idx = a_idx.ravel(), b_idx.ravel()
    ka, kb = int(a_idx.max()) + 1, int(b_idx.max()) + 1
    if ka == 1 and kb == 1:
        return 1.0  # both labelings put everything in one cluster: identical partitions
    if ka == 1 or kb == 1:
        return 0.0  # one side carries no information
    joint = np.bincount(a_idx * kb + b_idx, minlength=ka * kb).reshape(ka, kb) / n
    pa, pb = joint.sum(axis=1), joint.sum(axis=0)
    nz = joint > 0
    outer = np.outer(pa, pb)
    mutual_information = float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())
    ha, hb = _entropy(pa), _entropy(pb)
    normaliser = {
        "geometric": np.sqrt(ha * hb),
        "arithmetic": (ha + hb) / 2.0,
        "min": min(ha, hb),
        "max": max(ha, hb),
    }[average]
    return float(np.clip(mutual_information / normaliser, 0.0, 1.0))
