"""BatchNorm reset: pooled statistics are the population statistics of the layer's inputs."""
import pytest
import torch
import torch.nn as nn

from zipcli.bn import reset_batchnorm
from zipcli.errors import CalibrationError


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))


def test_first_layer_stats_equal_population_stats_for_any_chunking():
    torch.manual_seed(1)
    images = torch.randn(37, 3, 10, 10) * 3 + 2
    model = _model()
    feats = model[0](images).transpose(0, 1).reshape(8, -1).double()
    for batches, chunk in (([images], 16), ([images[:5], images[5:]], 3), ([images], 64)):
        assert reset_batchnorm(model, batches, chunk=chunk) == 2
        bn = model[1]
        torch.testing.assert_close(bn.running_mean.double(), feats.mean(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), feats.var(1), rtol=1e-5, atol=1e-5)
        assert not model.training and bn.momentum == 0.1


def test_reset_leaves_no_hooks_and_fails_on_no_batches():
    model = _model()
    with pytest.raises(CalibrationError, match="no calibration image could be read"):
        reset_batchnorm(model, [])
    assert not model[1]._forward_pre_hooks and model[1].momentum == 0.1
