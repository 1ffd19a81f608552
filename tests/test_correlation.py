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


def test_between_models_only_keeps_every_block_permute_reads():
    torch.manual_seed(0)
    xs = [torch.relu(torch.randn(30, 5, 3, 3)) + k for k in range(3)]
    full, between = CorrelationAccumulator([5] * 3), CorrelationAccumulator([5] * 3, within=False)
    for k in range(0, 30, 7):
        assert full.update([x[k:k + 7] for x in xs]) and between.update([x[k:k + 7] for x in xs])
    a, b = full.correlation(), between.correlation()
    for i in range(3):
        for j in range(3):
            block = (slice(5 * i, 5 * i + 5), slice(5 * j, 5 * j + 5))
            expected = a[block] if i != j else torch.eye(5, dtype=a.dtype)     # within one model: not measured
            torch.testing.assert_close(b[block], expected, rtol=1e-6, atol=1e-6)


def test_between_models_only_still_reports_non_finite_chunks():
    x = torch.randn(4, 3, 2, 2)
    x[1, 2, 0, 0] = float("nan")
    assert CorrelationAccumulator([3, 3], within=False).update([x, x]) is False


def test_a_permute_merge_measures_only_between_models_and_merges_as_with_every_correlation(tmp_path):
    from dataclasses import replace

    from zipcli import MergeOptions, merge
    from zipcli.measured import Calibration
    from zipcli.pipeline import merge_at
    from zipcli.choosing import decide
    from conftest import make_images, resnet20_pair, small_spec

    spec = small_spec("resnet20")
    calib = make_images(tmp_path / "calib", 16, 32, seed=2)
    paths = resnet20_pair(tmp_path, calib)
    options = MergeOptions(method="permute", stop="layer2")
    quick = merge(paths, spec, calib, options)
    cal = Calibration(paths, spec, calib, options)
    cal.measure("layer2", "zipit")                     # every correlation, within each model too
    full = merge_at(cal, decide(cal, options))
    quick_state, full_state = quick.model.state_dict(), full.model.state_dict()
    assert quick_state.keys() == full_state.keys()
    for k in quick_state:
        torch.testing.assert_close(quick_state[k], full_state[k], rtol=1e-4, atol=1e-5)
    # A calibration measured for permute measures again for a method that reads within models.
    cal = Calibration(paths, spec, calib, replace(options, method="permute"))
    cal.measure("layer2", "permute")
    space = next(iter(cal.correlations))
    o = cal.correlations[space].shape[0] // 2
    assert np.array_equal(cal.correlations[space][:o, :o], np.eye(o))
    cal.measure("layer2", "zipit")
    assert not np.array_equal(cal.correlations[space][:o, :o], np.eye(o))
