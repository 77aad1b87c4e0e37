"""Tests of adapters.ops.nmi: the NMI between two labelings that DeepCluster and SeLa log."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adapters.ops.nmi import nmi


def test_nmi_identical_and_permuted_labelings_are_one():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 10, size=1000)
    permutation = rng.permutation(10)
    assert nmi(a, a) == pytest.approx(1.0)
    assert nmi(a, permutation[a]) == pytest.approx(1.0)
    assert nmi(a, np.array(list("abcdefghij"))[a]) == pytest.approx(1.0)  # any label values
    assert nmi(torch.as_tensor(a), torch.as_tensor(permutation[a])) == pytest.approx(1.0)


def test_nmi_independent_labelings_are_near_zero():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 10, size=20000), rng.integers(0, 10, size=20000)
    assert 0.0 <= nmi(a, b) < 0.005
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)


def test_nmi_matches_a_hand_computed_value():
    a, b = [0, 0, 1, 1], [0, 0, 0, 1]
    # joint p(a, b): (0,0)=1/2, (1,0)=1/4, (1,1)=1/4; marginals p(a)=(1/2, 1/2), p(b)=(3/4, 1/4)
    mi = 0.5 * math.log(0.5 / (0.5 * 0.75)) + 0.25 * math.log(0.25 / (0.5 * 0.75))
    mi += 0.25 * math.log(0.25 / (0.5 * 0.25))
    h_a = math.log(2.0)
    h_b = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert nmi(a, b) == pytest.approx(mi / math.sqrt(h_a * h_b))  # ~0.4325
    assert nmi(a, b, average="arithmetic") == pytest.approx(mi / ((h_a + h_b) / 2))
    assert nmi(a, b, average="min") == pytest.approx(mi / h_b)
    assert nmi(b, a) == pytest.approx(nmi(a, b))


def test_nmi_edge_cases_and_errors():
    assert nmi([3, 3, 3], [5, 5, 5]) == 1.0
    assert nmi([3, 3, 3], [0, 1, 2]) == 0.0
    with pytest.raises(ValueError, match="label count mismatch: a has 3 labels, b has 2"):
        nmi([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        nmi(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="average"):
        nmi([0, 1], [0, 1], average="mean")
