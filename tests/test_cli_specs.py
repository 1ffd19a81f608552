"""``zipit specs trace | check | list``: exit codes, stdout vs stderr, files written or not."""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys

import pytest
import yaml
from typer.testing import CliRunner

from zipcli.cli import app
from zipcli.cli_specs import parse_kwargs
from zipcli.errors import ZipitError
from zipcli.specs.builders import build_model
from zipcli.specs import BUILTIN_DIR, builtin_spec_names, load_spec, parse_spec

from conftest import handled

runner = CliRunner()


def test_trace_writes_a_spec_that_passes_the_check(tmp_path):
    out = tmp_path / "r20.yaml"
    r = runner.invoke(app, ["specs", "trace", "zipcli.models:cifar_resnet20", "--input", "cifar", "--kw", "width=2",
                            "--kw", "num_classes=7", "--name", "mine", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "wrote" in r.stderr and "next: zipit specs check" in r.stderr and r.stdout == ""
    assert "for tracing only" in r.stderr  # --kw num_classes=7 is not stored
    spec = parse_spec(out.read_text())
    assert spec.name == "mine" and spec.kwargs == {"width": 2} and spec.input.size == 32
    assert spec.stops == ("layer1", "layer2", "layer3") and spec.classifiers == ("linear",)
    # the same spaces as the built-in resnet20x2
    builtin = yaml.safe_load((BUILTIN_DIR / "resnet20x2.yaml").read_text())
    assert yaml.safe_load(out.read_text())["spaces"] == builtin["spaces"]
    r = runner.invoke(app, ["specs", "check", str(out), "--json"])
    assert r.exit_code == 0, r.output
    facts = json.loads(r.stdout)
    assert facts["passed"] and facts["problems"] == [] and facts["tensors"] == facts["tensors_in_spaces"]


def test_trace_prints_to_stdout_without_output(tmp_path):
    r = runner.invoke(app, ["specs", "trace", "zipcli.models:cifar_vgg11", "--input", "cifar"])
    assert r.exit_code == 0, r.output
    assert parse_spec(r.stdout).classifiers == ("classifier",)
    assert "spec on stdout" in r.stderr


def test_trace_never_overwrites_without_force_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "spec.yaml"
    out.write_text("mine")
    args = ["specs", "trace", "zipcli.models:cifar_vgg11", "--input", "cifar", "-o", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "--force" in r.stderr and out.read_text() == "mine"
    assert runner.invoke(app, args + ["--force"]).exit_code == 0
    assert parse_spec(out.read_text()).name == "cifar_vgg11"
    assert [p.name for p in tmp_path.iterdir()] == ["spec.yaml"]


@pytest.mark.parametrize("args, words", [
    (["torchvision.models.resnext50_32x4d"], ["grouped convolution (groups=32)", "layer1.0.conv2"]),
    (["mobilenet_v3_small"], ["squeeze-and-excitation", "features.1.block.1"]),
    (["no_such_module:build"], ["cannot be imported"]),
    (["resnet18", "--kw", "depth=3"], ["unexpected keyword argument 'depth'"]),
    (["resnet18", "--kw", "depth"], ["is not NAME=VALUE"]),
    (["resnet18", "--input", "mnist"], ["unknown --input 'mnist'"]),
    (["resnet18", "--stop", "layer1.0"], ["cuts through", "valid stops of resnet18: layer1, layer2, layer3, layer4"]),
])
def test_trace_refusals_are_one_line_with_exit_code_2(args, words, tmp_path):
    out = tmp_path / "x.yaml"
    r = runner.invoke(app, ["specs", "trace", *args, "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert handled(r) and r.stderr.startswith("error:")
    for word in words:
        assert word in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


MY_MODELS = """
import torch.nn as nn


def small_cnn(n_out=10, width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, n_out))


def not_a_model(num_classes=10):
    return 3
"""


def test_own_builder_from_the_current_folder_must_take_the_class_count(tmp_path, monkeypatch):
    (tmp_path / "newuser_models.py").write_text(MY_MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    trace = ["specs", "trace", "newuser_models:small_cnn", "--input", "cifar", "-o", "s.yaml"]
    r = runner.invoke(app, trace)  # importable without PYTHONPATH; but it calls its class count n_out
    assert r.exit_code == 2 and "newuser_models:small_cnn" in r.stderr and "--num-classes-arg NAME" in r.stderr
    assert runner.invoke(app, trace + ["--num-classes-arg", "n_out"]).exit_code == 0
    untrusted = runner.invoke(app, ["specs", "check", "s.yaml"])   # a spec file names code: trust is explicit
    assert untrusted.exit_code == 2 and "--trust-builder newuser_models" in untrusted.stderr
    assert runner.invoke(app, ["specs", "check", "s.yaml", "--trust-builder", "newuser_models"]).exit_code == 0
    spec = tmp_path / "s.yaml"
    spec.write_text(spec.read_text().replace("num_classes_arg: n_out", "num_classes_arg: num_classes"))
    r = runner.invoke(app, ["specs", "check", "s.yaml", "--trust-builder", "newuser_models"])
    assert r.exit_code == 2 and "num_classes_arg" in r.stderr
    r = runner.invoke(app, ["specs", "trace", "newuser_models:not_a_model"])
    assert r.exit_code == 2 and "returned an int" in r.stderr


def test_merge_time_builder_failure_names_num_classes_arg():
    with pytest.raises(ZipitError) as info:
        build_model(dataclasses.replace(load_spec("resnet20"), num_classes_arg="n_out"), 3)
    assert "num_classes_arg" in info.value.hint


def test_load_spec_takes_a_spec_file_path(tmp_path, monkeypatch):
    shutil.copy(BUILTIN_DIR / "resnet20.yaml", tmp_path / "mine.yml")
    monkeypatch.chdir(tmp_path)
    assert load_spec("mine.yml") == load_spec("resnet20") == load_spec(path="mine.yml")
    with pytest.raises(ZipitError) as info:
        load_spec("mine")
    assert "load_spec(path=" in info.value.hint


def test_check_fails_with_exit_code_2_and_names_the_problem(tmp_path):
    doc = yaml.safe_load((BUILTIN_DIR / "resnet20.yaml").read_text())
    doc["spaces"] = [s for s in doc["spaces"] if s["name"] != "layer2.1.conv1"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = runner.invoke(app, ["specs", "check", str(bad)])
    assert r.exit_code == 2
    assert "failed" in r.stderr and "layer2.1.conv1 (writer) is in no space" in r.stderr


def test_check_takes_a_builtin_name_and_another_builder():
    r = runner.invoke(app, ["specs", "check", "resnet20", "--builder", "zipcli.models:cifar_resnet20",
                            "--kw", "width=2"])
    assert r.exit_code == 0, r.output
    assert "passed" in r.stderr
    r = runner.invoke(app, ["specs", "check", "nope"])
    assert r.exit_code == 2 and "neither a spec file nor a built-in" in r.stderr and "resnet20" in r.stderr


def test_list_shows_every_builtin_with_its_stops():
    r = runner.invoke(app, ["specs", "list", "--json"])
    assert r.exit_code == 0
    listed = json.loads(r.stdout)
    assert [x["name"] for x in listed] == builtin_spec_names()
    densenet = next(x for x in listed if x["name"] == "densenet121")
    assert densenet["stops"][0] == "features.transition1.norm" and densenet["default_stop"] == "features"
    r = runner.invoke(app, ["specs", "list"], terminal_width=200)
    assert r.exit_code == 0 and "mobilenet_v2" in r.stdout and "layer4" in r.stdout


@pytest.mark.parametrize("items, expected", [
    (["a=1", "b=2.5", "c=true", "d=None", "e=text", "f=1e-3"], {"a": 1, "b": 2.5, "c": True, "d": None, "e": "text",
                                                              "f": 0.001}),
    ([" width = 4"], {"width": 4}),
])
def test_kwargs_are_parsed(items, expected):
    assert parse_kwargs(items) == expected


@pytest.mark.parametrize("item", ["novalue", "=3", "1x=2"])
def test_bad_kwargs_are_refused(item):
    with pytest.raises(ZipitError, match="NAME=VALUE"):
        parse_kwargs([item])


def test_specs_help_teaches_with_examples():
    for command in ("trace", "check", "list"):
        r = runner.invoke(app, ["specs", command, "--help"], terminal_width=200)
        assert r.exit_code == 0 and "Example: zipit specs" in r.stdout
