"""Weighted k-nearest-neighbour evaluation (InstDisc / SeLa protocol).

Paper: Wu et al., "Unsupervised Feature Learning via Non-Parametric Instance Discrimination"
(CVPR 2018), Sec. 3.4, and Asano et al., "Self-labelling via simultaneous clustering and
representation learning" (ICLR 2020), Table 1 "Weighted kNN / FC" on CIFAR-10/100 and SVHN.
Code: yukimasano/self-label, ``cifar_utils.py`` (``kNN``): L2-normalised features, the
training set as the memory bank, cosine similarities, the k most similar bank entries vote
with weight ``exp(similarity / temperature)``; defaults k=200, temperature (sigma) 0.1.
The voting itself is lightly's ``knn_predict`` (lightly.utils.benchmarking), used as is.

Deviations from yukimasano/self-label:
    - no optional PCA-to-128 step (``use_pca``), which needs scikit-learn; pass PCA-reduced
      features to :func:`weighted_knn` yourself if you want it;
    - conv maps are reduced by global average pooling by default; SeLa's ``cifar.py`` runs the
      kNN on the 4096-d vector its feature switch returns (``knn_dim = 4096``; Table 1's "FC"
      rows), so probe an fc layer to match it, or pass ``pool="flatten"`` to flatten a conv
      map as SeLa's AlexNet does for pool5. fc features pass through unchanged;
    - the bank must come from un-augmented train batches; SeLa swaps the train transform for the
      test transform itself, here the caller passes an augmentation-free train loader.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..progress import progress as progress_bar  # the functions' `progress` flag shadows the name
from ._common import (
    check_features_targets,
    infer_num_classes,
    resolve_device,
    topk_correct,
)
from .features import PoolSpec, evaluate_layers

REFERENCE = "yukimasano/self-label cifar_utils.py kNN; lightly.utils.benchmarking.knn_predict"


def weighted_knn(
    train_features: Tensor,
    train_targets: Tensor,
    test_features: Tensor,
    test_targets: Tensor,
    *,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Weighted kNN accuracy of test features against a bank of train features.

    The InstDisc / SeLa protocol (Wu et al., CVPR 2018; Asano et al., ICLR 2020), as
    ``yukimasano/self-label`` ``cifar_utils.py`` ``kNN``, voting with lightly's ``knn_predict``
    (the module docstring gives the protocol and its deviations).

    Both feature sets are L2-normalised; the test set is processed in chunks of ``chunk_size``
    rows so that memory stays at O(chunk_size x N_train) however large the test set is.

    Args:
        train_features: Bank features, shape (N_train, D).
        train_targets: Bank labels, int64 shape (N_train,).
        test_features: Query features, shape (N_test, D).
        test_targets: Query labels, int64 shape (N_test,).
        k: Number of neighbours (200 in InstDisc/SeLa). Must be <= N_train.
        temperature: Similarity temperature (0.1 in InstDisc/SeLa).
        num_classes: Number of classes; inferred as max label + 1 when ``None``.
        chunk_size: Test rows per similarity chunk.
        device: Where the similarities are computed (default CPU).
        progress: Show a tqdm bar (``None``: only on a terminal).

    Returns:
        ``{"protocol": "knn", "k", "temperature", "normalize": True, "num_classes",
        "feature_dim", "num_train", "num_test", "chunk_size", "top1", "top5", "reference"}``
        with accuracies in percent.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> bank, labels = torch.randn(1000, 64), torch.randint(0, 10, (1000,))
        >>> result = weighted_knn(bank, labels, bank[:100], labels[:100])
        >>> result["top1"]  # queries identical to bank entries
        100.0
    """
    try:
        from lightly.utils.benchmarking import knn_predict
    except ImportError as error:  # pragma: no cover - lightly is a hard dependency
        raise ImportError("weighted_knn needs lightly: pip install 'lightly>=1.5'.") from error

    check_features_targets(train_features, train_targets, "train")
    check_features_targets(test_features, test_targets, "test")
    for name, feats in (("train", train_features), ("test", test_features)):
        if feats.ndim != 2:
            raise ValueError(
                f"{name} features must be 2-D (N, D), got {tuple(feats.shape)}; pool conv maps "
                "first, e.g. pool_features(x, 'avg') or knn_eval(..., pool='avg')."
            )
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train features have dimension {train_features.shape[1]} but test features "
            f"{test_features.shape[1]}; extract both from the same layer with the same pooling."
        )
    num_train = train_features.shape[0]
    if not 1 <= k <= num_train:
        raise ValueError(
            f"k={k} but the bank holds {num_train} train samples; pass 1 <= k <= {num_train} "
            "or use a larger train set as the bank."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    num_classes = infer_num_classes(num_classes, train_targets, test_targets)
    device = resolve_device(device)

    bank = F.normalize(train_features.float().to(device), dim=1).t().contiguous()  # (D, N)
    bank_labels = train_targets.long().to(device)
    hits1 = hits5 = 0
    starts = range(0, test_features.shape[0], chunk_size)
    with torch.no_grad():
        for start in progress_bar(starts, enabled=progress, total=len(starts), desc="knn"):
            query = test_features[start : start + chunk_size].float().to(device)
            query = F.normalize(query, dim=1)
            ranking = knn_predict(
                query, bank, bank_labels, num_classes=num_classes, knn_k=k, knn_t=temperature
            )
            labels = test_targets[start : start + chunk_size].long().to(device)
            c1, c5 = topk_correct(ranking, labels, ranked=True)
            hits1 += c1
            hits5 += c5
    num_test = test_features.shape[0]
    return {
        "protocol": "knn",
        "k": k,
        "temperature": temperature,
        "normalize": True,
        "num_classes": num_classes,
        "feature_dim": int(train_features.shape[1]),
        "num_train": num_train,
        "num_test": num_test,
        "chunk_size": chunk_size,
        "top1": 100.0 * hits1 / num_test,
        "top5": 100.0 * hits5 / num_test,
        "reference": REFERENCE,
    }


def knn_eval(
    model: nn.Module,
    train_batches: Iterable[Any],
    test_batches: Iterable[Any],
    layer: str | Sequence[str],
    device: str | torch.device | None = None,
    *,
    pool: PoolSpec = "avg",
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    chunk_size: int = 256,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Extract frozen features of ``layer`` and run :func:`weighted_knn` (train set = bank).

    Args:
        model: Encoder (a recon-aux backbone or any ``nn.Module``; see :func:`extract_features`).
        train_batches: Un-augmented ``(images, targets[, indices])`` batches of the train set.
        test_batches: ``(images, targets[, indices])`` batches of the test set.
        layer: Probe point / module name, or a list of them (features are extracted once).
        device: Device of the forward pass and the similarity search (default: the model's).
        pool: Reduction of conv maps, default global average pooling (fc features unchanged).
        k: Neighbours (as in :func:`weighted_knn`).
        temperature: Similarity temperature (as in :func:`weighted_knn`).
        num_classes: As in :func:`weighted_knn`.
        chunk_size: As in :func:`weighted_knn`.
        progress: As in :func:`weighted_knn`.

    Returns:
        The :func:`weighted_knn` result plus ``"feature"`` (the layer) and ``"pool"``; for a list
        of layers, ``{layer: result}``.

    Example:
        >>> result = knn_eval(backbone, train_loader, test_loader, "conv5")  # doctest: +SKIP
        >>> result["top1"], result["k"], result["feature"]  # doctest: +SKIP
    """
    def probe(train_x, train_y, test_x, test_y, dev):
        return weighted_knn(train_x, train_y, test_x, test_y, k=k, temperature=temperature,
                            num_classes=num_classes, chunk_size=chunk_size, device=dev,
                            progress=progress)

    return evaluate_layers("knn", probe, model, train_batches, test_batches, layer, device,
                           pool, progress)
