"""Evaluation protocols of the papers behind recon-aux, each implemented once.

Every protocol works on *frozen* features and returns a plain dict that names the protocol and
every parameter it used next to the accuracies (percent), e.g.
``{"protocol": "knn", "feature": "conv5", "pool": "avg", "k": 200, "temperature": 0.1, ...,
"top1": 77.9, "top5": 97.1}``.

==========================  =========================================================
Protocol                    Follows
==========================  =========================================================
:func:`knn_eval`            yukimasano/self-label ``cifar_utils.py`` kNN (InstDisc), voting by
                            ``lightly.utils.benchmarking.knn_predict``; k=200, T=0.1
:func:`recalibrate_batchnorm` facebookresearch/fvcore ``precise_bn.py`` (``update_bn_stats``):
                            BN statistics re-estimated on clean images before any protocol
:func:`linear_probe_eval`   standardised features + a linear layer trained until its loss levels
                            off (facebookresearch/mae ``main_linprobe.py``); or
                            facebookresearch/deepcluster ``eval_linear.py`` (``RegLog``)
:func:`nonlinear_probe_eval` maple-research-lab/AET ``cifar/affine/NonLinearClassifier.py``
                            (``MultLayerFC2``) + ``cifar/projective/classification.py``
==========================  =========================================================

Each ``*_eval`` function takes a model, train and test batch iterables and a layer name; it
extracts the features once (:func:`extract_features`) and runs the tensor-level protocol
(:func:`weighted_knn`, :func:`linear_probe`, :func:`nonlinear_probe`), which can also be called
directly on cached features.

Example:
    >>> from adapters.evaluation import knn_eval, linear_probe_eval  # doctest: +SKIP
    >>> knn = knn_eval(backbone, train_loader, test_loader, "fc7")  # doctest: +SKIP
    >>> lin = linear_probe_eval(backbone, train_loader, test_loader, "conv5", epochs=10)
    ... # doctest: +SKIP
"""

from ._training import Plateau
from .batchnorm import recalibrate_batchnorm, recalibrated_batchnorm
from .features import Features, extract_features, pool_features
from .knn import knn_eval, weighted_knn
from .linear import Standardize, linear_probe, linear_probe_eval
from .nonlinear import NonLinearHead, nonlinear_probe, nonlinear_probe_eval

__all__ = [
    "Features",
    "NonLinearHead",
    "extract_features",
    "knn_eval",
    "linear_probe",
    "linear_probe_eval",
    "nonlinear_probe",
    "nonlinear_probe_eval",
    "Plateau",
    "pool_features",
    "recalibrate_batchnorm",
    "recalibrated_batchnorm",
    "Standardize",
    "weighted_knn",
]
