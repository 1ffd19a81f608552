"""The CLI end to end: merge, inspect, eval; exit codes, stdout vs stderr, files."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from zipcli import load_merged
from zipcli.cli import app
from zipcli.inspection import count_macs
from zipcli.merged import read_metadata
from zipcli.specs.builders import build_model

from conftest import CIFAR, ZOO, handled, make_images, needs_shared, resnet20_pair, small_spec

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two random ResNet-20s on disjoint 'tasks', labelled images, calibration images."""
    root = tmp_path_factory.mktemp("tiny")
    data = make_images(root / "data", 40, 32, seed=4, classes=["a0", "a1", "b0", "b1", "b2", "zz"])
    calib = make_images(root / "calib", 16, 32, seed=5)
    a, b = resnet20_pair(root, calib)
    return {"root": root, "a": a, "b": b, "calib": calib, "data": data}


def _merge(tiny, out, *extra):
    return runner.invoke(app, ["merge", str(tiny["a"]), str(tiny["b"]), "--arch", "resnet20", "--calib",
                               str(tiny["calib"]), "-o", str(out), "--quiet", *extra])


def test_merge_writes_a_loadable_file_with_metadata(tiny, tmp_path):
    out = tmp_path / "m.safetensors"
    r = _merge(tiny, out, "--stop", "layer2", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["stop"] == "layer2" and [h["name"] for h in summary["heads"]] == ["A", "B"]
    meta = read_metadata(out)
    for key in ("format", "zipit_version", "spec", "spec_name", "stop", "method", "params", "calibration",
                "sources", "heads", "spaces"):
        assert key in meta, key
    sources = json.loads(meta["sources"])
    assert sources[0]["classes"] == ["a0", "a1"] and len(sources[0]["sha256"]) == 64
    tensors = load_file(str(out))
    assert any(k.startswith("trunk.") for k in tensors) and any(k.startswith("heads.1.") for k in tensors)
    model = load_merged(out)
    logits = model(torch.randn(3, 3, 32, 32))
    assert [t.shape for t in logits] == [(3, 2), (3, 3)]
    assert [h.classes for h in model.heads] == [["a0", "a1"], ["b0", "b1", "b2"]]
    assert not model.training


def test_merge_refuses_to_overwrite_and_leaves_no_temporary(tiny, tmp_path):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"previous")
    r = _merge(tiny, out)
    assert r.exit_code == 2 and "--force" in r.output
    assert out.read_bytes() == b"previous"
    assert _merge(tiny, out, "--force").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.config.json", "m.md", "m.safetensors"]


def test_merge_is_deterministic(tiny, tmp_path):
    first, second = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    assert _merge(tiny, first, "--seed", "3", "--num-calib", "10").exit_code == 0
    assert _merge(tiny, second, "--seed", "3", "--num-calib", "10").exit_code == 0
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("args, culprit", [
    (["--method", "nope"], "--method"),
    (["--stop", "layer9"], "layer9"),
    (["--alpha", "2"], "--alpha"),
    (["--classes", "x,y"], "classes (--classes) were given once for 2 checkpoints"),
])
def test_bad_options_give_one_line_and_exit_2(tiny, tmp_path, args, culprit):
    out = tmp_path / "m.safetensors"
    r = _merge(tiny, out, *args)
    assert r.exit_code == 2 and culprit in r.output and handled(r)
    assert not out.exists()


def test_merge_warns_when_classes_fall_back_to_generic_names(tiny, tmp_path):
    nameless = shutil.copy(tiny["a"], tmp_path / "C.pt")  # no C.json sidecar, no --classes
    r = runner.invoke(app, ["merge", str(nameless), str(tiny["b"]), "--arch", "resnet20", "--calib",
                            str(tiny["calib"]), "-o", str(tmp_path / "m.safetensors"), "--quiet"])
    assert r.exit_code == 0, r.output
    warning = [line for line in r.stderr.splitlines() if "class_0" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: C.pt:") and "B.pt" not in warning[0]
    assert "class_0" in warning[0] and "--classes" in warning[0] and "sidecar" in warning[0]


def test_a_pickled_model_object_is_refused_in_one_plain_line(tmp_path):
    full = tmp_path / "full.pt"
    torch.save(build_model(small_spec("resnet20"), 2), full)
    r = runner.invoke(app, ["merge", str(full), str(full), "--arch", "resnet20", "--calib", str(tmp_path),
                            "-o", str(tmp_path / "m.safetensors")])
    assert r.exit_code == 2 and "holds a pickled model object, not a state_dict" in r.stderr
    assert "model.state_dict()" in r.stderr and "\x1b" not in r.output and "two options" not in r.output


def test_inspect_counts_parameters_and_macs(tiny, tmp_path):
    out = tmp_path / "m.safetensors"
    assert _merge(tiny, out, "--stop", "layer1").exit_code == 0
    r = runner.invoke(app, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    facts = json.loads(r.stdout)
    model = load_merged(out)
    trunk = sum(p.numel() for p in model.trunk.parameters())
    assert facts["parameters"]["trunk"] == trunk
    assert facts["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    spec = small_spec("resnet20")
    sources = [build_model(spec, 2), build_model(spec, 3)]
    assert facts["parameters"]["sources_total"] == sum(p.numel() for m in sources for p in m.parameters())
    assert facts["macs"]["sources_total"] == sum(count_macs(m, (3, 32, 32)) for m in sources)
    assert facts["macs"]["merged"] < facts["macs"]["sources_total"]
    assert [s["space"] for s in facts["spaces"]][:1] == ["layer1.stream"]
    human = runner.invoke(app, ["inspect", str(out)])
    assert human.exit_code == 0 and "layer1.stream" in human.stdout


def test_count_macs_by_hand():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 5))
    # conv: 4*8*8 outputs x 3*3*3 taps; linear: 5 outputs x 256 inputs
    assert count_macs(net, (3, 8, 8)) == 4 * 64 * 27 + 5 * 256
    # the probe input follows the model's device (a CUDA merge counts MACs of models on the GPU)
    assert count_macs(net.to("meta"), (3, 8, 8)) == 4 * 64 * 27 + 5 * 256


def test_inspect_plain_checkpoint_names_its_spec(tiny):
    r = runner.invoke(app, ["inspect", str(tiny["a"]), "--json"])
    assert r.exit_code == 0
    facts = json.loads(r.stdout)
    assert facts["matching_specs"] == ["resnet20"] and facts["kind"] == "checkpoint"


def test_eval_matches_an_independent_computation(tiny, tmp_path):
    out = tmp_path / "m.safetensors"
    assert _merge(tiny, out, "--stop", "layer2").exit_code == 0
    r = runner.invoke(app, ["eval", str(out), "--data", str(tiny["data"]), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)["results"][0]
    from zipcli.calibration import decode
    model = load_merged(out)
    heads = [(["a0", "a1"]), (["b0", "b1", "b2"])]
    correct, seen, joint_ok, joint_n = [0, 0], [0, 0], 0, 0
    for folder in sorted(tiny["data"].iterdir()):
        for f in sorted(folder.iterdir()):
            with torch.no_grad():
                logits = model(decode(f, model.spec.input)[None])
            label = folder.name
            for h, classes in enumerate(heads):
                if label in classes:
                    seen[h] += 1
                    correct[h] += int(logits[h][0].argmax()) == classes.index(label)
            if label != "zz":
                joint_n += 1
                probs = torch.cat([l.softmax(1) for l in logits], 1)[0]
                joint_ok += (heads[0] + heads[1])[int(probs.argmax())] == label
    assert [h["accuracy"] for h in res["heads"]] == [c / s for c, s in zip(correct, seen)]
    assert res["joint"] == joint_ok / joint_n and res["unknown_class_images"] == 40 // 6 + (40 % 6 > 5)


def test_eval_exit_codes(tiny, tmp_path):
    out = tmp_path / "m.safetensors"
    assert _merge(tiny, out).exit_code == 0
    ok = runner.invoke(app, ["eval", str(out), "--data", str(tiny["data"]), "--min-avg", "0"])
    assert ok.exit_code == 0
    low = runner.invoke(app, ["eval", str(out), "--data", str(tiny["data"]), "--min-joint", "1.0", "--json"])
    assert low.exit_code == 1 and json.loads(low.stdout)["passed"] is False
    bad = runner.invoke(app, ["eval", str(out), "--data", str(tmp_path / "nowhere")])
    assert bad.exit_code == 2 and "nowhere" in bad.output
    other = make_images(tmp_path / "other", 3, 32, classes=["cats"])
    none = runner.invoke(app, ["eval", str(out), "--data", str(other)])
    assert none.exit_code == 2 and "no class folder" in none.output


@needs_shared
def test_zoo_pair_end_to_end(tmp_path):
    out = tmp_path / "zoo.safetensors"
    r = runner.invoke(app, ["merge", str(ZOO / "r20x1_c10a_s1.pt"), str(ZOO / "r20x1_c10b_s2.pt"), "--arch",
                            "resnet20", "--calib", str(CIFAR / "train"), "--num-calib", "256", "--stop", "layer2",
                            "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    e = runner.invoke(app, ["eval", str(out), "--data", str(CIFAR / "test"), "--limit", "40", "--json"])
    res = json.loads(e.stdout)["results"][0]
    assert res["heads"][0]["name"] == "r20x1_c10a_s1" and res["avg_task"] > 0.7 and res["joint"] > 0.5


def test_eval_compares_merged_files_side_by_side_with_the_sources(tiny, tmp_path):
    one, two = tmp_path / "l1.safetensors", tmp_path / "l3.safetensors"
    assert _merge(tiny, one, "--method", "permute", "--stop", "layer1").exit_code == 0
    assert _merge(tiny, two, "--method", "permute", "--stop", "layer3").exit_code == 0
    r = runner.invoke(app, ["eval", str(one), str(two), str(tiny["a"]), str(tiny["b"]), "--arch", "resnet20",
                            "--data", str(tiny["data"]), "--json"])
    assert r.exit_code == 0, r.output
    results = json.loads(r.stdout)["results"]
    assert [(x["model"], x["kind"]) for x in results] == [("l1.safetensors", "merged"), ("l3.safetensors", "merged"),
                                                          ("A", "source"), ("B", "source"), ("ensemble", "ensemble")]
    gate = runner.invoke(app, ["eval", str(one), str(two), "--data", str(tiny["data"]), "--min-avg", "1.01"])
    assert gate.exit_code == 2   # a bar above 1 is not a fraction
    gate = runner.invoke(app, ["eval", str(one), str(two), "--data", str(tiny["data"]), "--min-avg", "0.999"])
    assert gate.exit_code == 1 and "l1.safetensors: avg task" in gate.stderr and "l3.safetensors" in gate.stderr
