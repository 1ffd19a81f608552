"""Specs: every built-in passes the permutation self-check and is what the tracer makes today."""
from __future__ import annotations

import pytest
import torch

from zipcli.builtin_specs import RECIPES, generate
from zipcli.errors import SpecError
from zipcli.graph import ModelGraph
from zipcli.merged import build_model
from zipcli.specs import SPECS_DIR, builtin_spec_names, load_spec, parse_spec

from conftest import small_spec


@pytest.mark.parametrize("name", builtin_spec_names())
def test_self_check(name):
    from zipcli.selfcheck import self_check
    spec = small_spec(name, 64 if name.startswith("resnet") and "20" not in name else None)
    torch.manual_seed(0)
    model = build_model(spec, 6)
    for m in model.modules():       # non-trivial BN so a wrong permutation shows
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    graph = ModelGraph(spec, model)
    assert self_check(graph, torch.randn(2, 3, spec.input.size, spec.input.size)) < 1e-5


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_builtin_files_are_what_the_tracer_makes(name):
    assert (SPECS_DIR / f"{name}.yaml").read_text() == generate(name)


def test_a_wrong_spec_fails_the_self_check():
    from zipcli.selfcheck import self_check
    text = (SPECS_DIR / "resnet20.yaml").read_text().replace("readers: [layer1.0.conv1, ", "readers: [")
    text = text.replace("readers: [layer1.0.conv2]", "readers: [layer1.0.conv2, layer1.0.conv1]")
    spec = parse_spec(text)
    model = build_model(spec, 3)
    assert self_check(ModelGraph(spec, model), torch.randn(2, 3, 32, 32)) > 1e-2


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("format: 1", "format: 7"), "format"),
    (lambda t: t.replace("classifiers:", "classifierz:"), "classifierz"),
    (lambda t: t.replace("size: 32", "size: -3"), "input.size"),
    (lambda t: t.replace("observe: avgpool", "observe: nowhere"), "nowhere"),
    (lambda t: t + "\nspaces: [", "YAML"),
    (lambda t: t.replace("stops: [layer1, layer2, layer3]", "stops: [layer1, layer1.0, layer3]"), "cuts through"),
])
def test_invalid_specs_name_the_culprit(edit, message):
    text = edit((SPECS_DIR / "resnet20.yaml").read_text())
    with pytest.raises(SpecError, match=message):
        spec = parse_spec(text)
        graph = ModelGraph(spec, build_model(spec, 3))
        for stop in spec.stops:
            graph.plan(stop)


def test_unknown_arch_lists_builtins():
    with pytest.raises(SpecError, match="resnet20"):
        load_spec("vgg99")
