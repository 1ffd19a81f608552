"""Exact properties of merging: a model merged with permuted copies of itself comes back unchanged."""
from __future__ import annotations

import pytest
import torch

from zipcli import MergeOptions, merge
from zipcli.calibration import calibration_stream
from zipcli.specs.graph import ModelGraph
from zipcli.specs.selfcheck import permute_state_dict, random_permutations

from conftest import random_model, save_checkpoint, small_spec

# torchvision models run at 64 px to keep the suite fast; the CIFAR ones at their own 32 px.
SIZES = {"resnet18": 64, "resnet50": 64}
# Every stop, both methods: one model per kind of graph (residual, plain, torchvision, transformer). Every other
# built-in merges exactly at its default stop in test_coverage.py.
SWEEP = ["resnet20", "resnet18", "cifar_vgg11", "cifar_vit"]
# cifar_vit at full size has 7 stops, and at a block stop the refit solves every layer of each head that
# reads the stream (about 50 layers): minutes. tests/test_vit.py covers every stop on a small ViT by default.
HEAVY_CASES = {("zipit", "resnet18"), ("zipit", "cifar_vgg11"), ("zipit", "cifar_vit"), ("permute", "cifar_vit")}


def _images(spec, folder, n=8):
    """Test inputs from the calibration distribution (a channel dead on it may match any other dead one)."""
    return next(calibration_stream(folder, spec.input, n, seed=1, batch_size=n).batches())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _permuted_copies(spec, tmp_path, calib, n_models: int, num_classes: int = 7):
    model = random_model(spec, num_classes, seed=1, calib=calib)
    graph = ModelGraph(spec, model)
    state = model.state_dict()
    paths = [save_checkpoint(tmp_path / "m0.pt", state)]
    for i in range(1, n_models):
        permuted = permute_state_dict(graph, state, random_permutations(graph, seed=10 + i))
        paths.append(save_checkpoint(tmp_path / f"m{i}.pt", permuted))
    return model, paths


# zipit on the larger two runs under -m heavy (CI): resnet20 already sweeps both methods by default
SWEEP_CASES = [pytest.param(method, name, marks=[pytest.mark.heavy] if (method, name) in HEAVY_CASES else [])
               for method in ("permute", "zipit") for name in SWEEP]


@pytest.mark.parametrize("method, name", SWEEP_CASES)
def test_merge_with_permuted_copy_is_exact(name, method, tmp_path, calib32, calib64):
    spec = small_spec(name, SIZES.get(name))
    calib = calib64 if name in SIZES else calib32
    model, paths = _permuted_copies(spec, tmp_path, calib, 2)
    x = _images(spec, calib)
    with torch.no_grad():
        expected = model(x)
    for stop in spec.stops:
        result = merge(paths, spec, calib, MergeOptions(method=method, stop=stop, reset_bn=False, batch_size=8))
        with torch.no_grad():
            heads = result.model(x)
        assert len(heads) == 2
        for out in heads:
            assert _rel(out, expected) < 1e-4, (name, method, stop)


@pytest.mark.parametrize("n_models", [3, 4])
@pytest.mark.parametrize("method", ["permute", "zipit"])
def test_more_permuted_copies_merge_exactly(method, n_models, tmp_path, calib32):
    """One trunk and one head per model, each head the original model."""
    spec = small_spec("resnet20")
    model, paths = _permuted_copies(spec, tmp_path, calib32, n_models)
    x = _images(spec, calib32)
    # alpha 1: completing a triple of identical features scores 1, so no within-model pair can come first.
    result = merge(paths, spec, calib32, MergeOptions(method=method, alpha=1.0, reset_bn=False, stop="layer2"))
    with torch.no_grad():
        expected, heads = model(x), result.model(x)
    assert len(heads) == n_models and all(_rel(h, expected) < 1e-4 for h in heads)


def test_stop_output_merges_classifier_of_same_task(tmp_path, calib32):
    spec = small_spec("resnet20")
    model, paths = _permuted_copies(spec, tmp_path, calib32, 2)
    result = merge(paths, spec, calib32, MergeOptions(method="zipit", stop="output", reset_bn=False))
    x = _images(spec, calib32)
    with torch.no_grad():
        heads = result.model(x)
        assert len(heads) == 1 and _rel(heads[0], model(x)) < 1e-4
    assert len(result.model.heads) == 1


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_average_of_a_model_with_itself_is_itself(name, tmp_path, calib32, calib64):
    spec = small_spec(name, SIZES.get(name))
    model = random_model(spec, 5, seed=3)
    a = save_checkpoint(tmp_path / "a.pt", model.state_dict())
    b = save_checkpoint(tmp_path / "b.pt", model.state_dict())
    result = merge([a, b], spec, calib64 if name in SIZES else calib32,
                   MergeOptions(method="average", reset_bn=False, stop=spec.stops[-1]))
    merged = {**result.model.trunk.state_dict(), **result.model.head_modules[0].state_dict()}
    for key, value in merged.items():
        assert torch.equal(value, model.state_dict()[key]), key
