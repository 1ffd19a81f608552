"""The architectures the built-in specs cover: each merges a permuted copy of itself back exactly,
and two differently initialised models end to end (merge, BN reset, write, load, run).

The largest models are marked ``heavy`` and left out of the default run (``pytest -m heavy`` runs
them); every built-in still passes ``zipit specs check`` in ``test_specs.py``.
"""
from __future__ import annotations

import gc

import pytest
import torch

from zipcli import MergeOptions, load_merged, merge
from zipcli.calibration import calibration_stream
from zipcli.specs.graph import ModelGraph
from zipcli.specs.selfcheck import permute_state_dict, random_permutations
from zipcli.specs import builtin_spec_names

from conftest import make_images, random_model, save_checkpoint, small_spec

# The list: CIFAR ResNet-20 (widths), torchvision ResNets, VGGs with and without BatchNorm,
# MobileNetV2, DenseNet-121 and the paper's CIFAR VGG11.
REQUIRED = ["resnet20", "resnet20x2", "resnet20x4", "resnet20x8", "resnet18", "resnet34", "resnet50", "resnet101",
            "resnet152", "wide_resnet50_2", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19",
            "vgg19_bn", "mobilenet_v2", "densenet121", "cifar_vgg11"]
HEAVY = {"resnet101", "resnet152", "wide_resnet50_2", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn",
         "vgg19", "vgg19_bn",
         # the same graphs as resnet20 and resnet18 at other widths and depths: CI runs them, the default run need not
         "resnet20x4", "resnet20x8", "resnet34"}
# 32 px inputs, except where the last stages would be 1x1 with too few samples to tell features apart.
SIZE = {"mobilenet_v2": 64}
# torchvision VGGs: the conv stack. Their classifier MLP (4096 features observed once per image) cannot
# be matched exactly on a few images; it merges fine, just not back to the identity.
STOP = {f"vgg{d}{bn}": "features" for d in (11, 13, 16, 19) for bn in ("", "_bn")}


def _params(names):
    return [pytest.param(n, marks=pytest.mark.heavy) if n in HEAVY else n for n in names]


@pytest.fixture(autouse=True)
def _release_memory():
    """Merged models hold reference cycles; collect them so big models do not pile up across tests."""
    yield
    gc.collect()


def test_every_architecture_of_the_list_is_built_in():
    assert sorted(set(REQUIRED) - set(builtin_spec_names())) == []


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calib_cov")
    return {32: make_images(folder / "32", 16, 32, seed=7), 64: make_images(folder / "64", 16, 64, seed=8)}


@pytest.fixture(scope="module", params=_params(REQUIRED))
def arch(request, calib):
    """Per architecture, once for both tests: its spec at a small size, images, a random model, inputs."""
    name = request.param
    spec = small_spec(name, SIZE.get(name, 32))
    images = calib[spec.input.size]
    model = random_model(spec, 7, seed=1, calib=images)
    x = next(calibration_stream(images, spec.input, 6, seed=1, batch_size=6).batches())
    return name, spec, images, model, x


def test_merge_with_a_permuted_copy_gives_the_model_back(arch, tmp_path):
    name, spec, images, model, x = arch
    graph = ModelGraph(spec, model)
    state = model.state_dict()
    a = save_checkpoint(tmp_path / "a.pt", state)
    b = save_checkpoint(tmp_path / "b.pt", permute_state_dict(graph, state, random_permutations(graph, seed=5)))
    options = MergeOptions(method="zipit", stop=STOP.get(name), reset_bn=False, batch_size=8)
    result = merge([a, b], spec, images, options)
    with torch.no_grad():
        expected, heads = model(x), result.model(x)
    for out in heads:
        assert float((out - expected).abs().max() / expected.abs().max()) < 1e-4


def test_two_different_models_merge_end_to_end(arch, tmp_path):
    name, spec, images, model, x = arch
    other = random_model(spec, 4, seed=2, calib=images)
    a = save_checkpoint(tmp_path / "a.pt", model.state_dict(), [f"a{i}" for i in range(7)])
    b = save_checkpoint(tmp_path / "b.pt", other.state_dict(), [f"b{i}" for i in range(4)])
    result = merge([a, b], spec, images, MergeOptions(method="zipit", stop=STOP.get(name), batch_size=8))
    result.save(tmp_path / "merged.safetensors")
    merged = load_merged(tmp_path / "merged.safetensors")
    with torch.no_grad():
        heads = merged(x)
    assert [h.shape for h in heads] == [(6, 7), (6, 4)]
    assert all(torch.isfinite(h).all() for h in heads)
    assert [h.classes[0] for h in merged.heads] == ["a0", "b0"]
    assert merged.metadata["stop"] == STOP.get(name, spec.default_stop)
