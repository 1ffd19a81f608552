"""Streaming correlation equals one-shot correlation; dead features give no NaNs."""
from __future__ import annotations

import numpy as np
import torch

from zipcli.correlation import CorrelationAccumulator, symmetric_gram


def test_streaming_equals_one_shot():
    torch.manual_seed(0)
    a = torch.relu(torch.randn(20, 6, 5, 5) + 0.5) * 3 + 10   # large mean: cancellation would show
    b = torch.randn(20, 6, 5, 5) + a * 0.5
    acc = CorrelationAccumulator([6, 6])
    for k in range(0, 20, 3):                                   # uneven batches
        acc.update([a[k:k + 3], b[k:k + 3]])
    samples = torch.cat([a, b], 1).movedim(1, -1).reshape(-1, 12).double().numpy()
    expected = np.corrcoef(samples.T)
    np.testing.assert_allclose(acc.correlation().numpy(), expected, atol=1e-6)
    assert acc.n == 20 * 25


def test_dead_and_constant_features_have_no_nans():
    x = torch.randn(8, 4, 3, 3)
    x[:, 1] = 0.0          # dead ReLU
    x[:, 2] = 7.25         # constant
    acc = CorrelationAccumulator([4, 4])
    acc.update([x, x.clone()])
    corr = acc.correlation()
    assert torch.isfinite(corr).all()
    assert corr[1, 0] == 0 and corr[2, 6] == 0 and corr[1, 1] == 1
    assert corr[0, 4] > 0.999   # the same live feature in both models


def test_linear_features_are_samples():
    acc = CorrelationAccumulator([2, 2])
    x = torch.randn(50, 2)
    acc.update([x, -x])
    corr = acc.correlation()
    assert corr[0, 2] < -0.999


def test_symmetric_gram_equals_full_product():
    x = torch.randn(1300, 77, dtype=torch.float64)
    torch.testing.assert_close(symmetric_gram(x, block=256), x @ x.T)


def test_non_finite_chunks_are_reported():
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 0] = float("inf")
    assert CorrelationAccumulator([3, 3]).update([x, x]) is False
