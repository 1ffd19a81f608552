"""Specs: every built-in passes `zipit specs check` and is what the tracer makes today; bad specs are named."""
from __future__ import annotations

import pytest
import torch

from zipcli.specs.recipes import RECIPES, generate
from zipcli.errors import SpecError
from zipcli.specs.graph import ModelGraph
from zipcli.specs.builders import build_model
from zipcli.specs.check import check_spec
from zipcli.specs import BUILTIN_DIR, builtin_spec_names, load_spec, parse_spec


# torchvision's ViT asserts its image size, so it is built for the check's
CHECK_KWARGS = {"vit_b_16": {"image_size": 32}}


@pytest.mark.parametrize("name", builtin_spec_names())
def test_every_builtin_passes_specs_check(name):
    """Self-check, coverage against tracing and observe points, at 32 px (the torchvision models too)."""
    result = check_spec(load_spec(name), kwargs=CHECK_KWARGS.get(name), size=32)
    assert result.passed, result.problems
    assert result.self_check < 1e-5
    assert result.in_spaces > 0 and not result.outside


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_builtin_files_are_what_the_tracer_makes(name):
    assert (BUILTIN_DIR / f"{name}.yaml").read_text() == generate(name)


def test_a_wrong_spec_fails_the_self_check():
    from zipcli.specs.selfcheck import self_check
    text = (BUILTIN_DIR / "resnet20.yaml").read_text().replace("readers: [layer1.0.conv1, ", "readers: [")
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
    text = edit((BUILTIN_DIR / "resnet20.yaml").read_text())
    with pytest.raises(SpecError, match=message):
        spec = parse_spec(text)
        graph = ModelGraph(spec, build_model(spec, 3))
        for stop in spec.stops:
            graph.plan(stop)


def test_unknown_arch_lists_builtins():
    with pytest.raises(SpecError, match="resnet20"):
        load_spec("vgg99")


def _edited(edit) -> str:
    import yaml
    doc = yaml.safe_load((BUILTIN_DIR / "resnet20.yaml").read_text())
    edit(doc)
    return yaml.safe_dump(doc, sort_keys=False)


def _space(doc, name):
    return next(s for s in doc["spaces"] if s["name"] == name)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["spaces"].remove(_space(d, "layer1.0.conv1")), "layer1.0.bn1 (writer) is in no space"),
    (lambda d: (_space(d, "layer1.stream")["writers"].remove("layer1.1.bn2"),
                d["spaces"].append({"name": "extra", "observe": "layer1.1.conv1", "writers": ["layer1.1.bn2"]})),
     "splits one feature space"),
    (lambda d: _space(d, "layer1.1.conv1").update(observe="layer1.2.conv2"), "observed at layer1.2.conv2"),
])
def test_specs_check_names_what_is_wrong(edit, message):
    result = check_spec(parse_spec(_edited(edit)))
    assert not result.passed
    assert any(message in p for p in result.problems), result.problems


@pytest.mark.parametrize("member, message", [
    ("layer1.0.conv1@x", "is not a module name"),
    ("layer1.0.conv1@0*0", "is not a module name"),
    ("layer1.0.conv1@8", "does not fit"),
])
def test_member_syntax_and_slices_are_checked(member, message):
    text = _edited(lambda d: _space(d, "layer1.stream")["readers"].__setitem__(0, member))
    with pytest.raises(SpecError, match=message):
        spec = parse_spec(text)
        ModelGraph(spec, build_model(spec, 3))


def test_a_member_of_another_width_is_refused():
    text = _edited(lambda d: _space(d, "layer3.stream")["writers"].append("linear"))
    with pytest.raises(SpecError, match=r"different widths: .*linear \(writer\)=3"):
        spec = parse_spec(text)
        ModelGraph(spec, build_model(spec, 3))


def test_a_module_whole_in_two_spaces_is_refused():
    text = _edited(lambda d: _space(d, "layer1.0.conv1")["writers"].append("layer1.1.bn1"))
    with pytest.raises(SpecError, match="layer1.1.bn1"):
        parse_spec(text)


def test_every_file_a_hint_points_at_ships_in_the_wheel():
    """Hints say where an installed copy of a file is ("installed as zipcli/..."): each such file is
    put in the wheel by pyproject's force-include, from a file that exists in the repository."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    wheel = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
    shipped = wheel.get("force-include", {})
    named = set()
    for source in (root / "zipcli").rglob("*.py"):
        named |= set(re.findall(r"installed as (zipcli/[\w/.]*\w)", source.read_text()))
    assert "zipcli/specs/README.md" in named
    for installed in named:
        assert installed in shipped.values(), f"{installed} is named in a hint but not put in the wheel"
        assert all((root / src).is_file() for src, dest in shipped.items() if dest == installed)
