"""zipit export: a program that runs without zipit and reproduces the merged model, or nothing is written."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from zipcli import MergeOptions, merge
from zipcli.cli import app
from zipcli.export import TOLERANCE

from conftest import handled, make_images, random_model, save_checkpoint, small_spec

runner = CliRunner()
# a residual, a plain and a concatenating built-in (merged on small images; files keep the spec's size)
CASES = {"resnet20": (32, "layer2"), "cifar_vgg11": (32, None), "densenet121": (32, "features.transition2.norm")}


class _MergedFiles(dict):
    """name -> a merged file of two random models of that built-in, made on first use."""

    def __init__(self, root):
        super().__init__()
        self.root = root
        self.calib = make_images(root / "calib", 8, 32, seed=3)

    def __missing__(self, name):
        size, stop = CASES[name]
        spec = small_spec(name, size)
        a = save_checkpoint(self.root / f"{name}_A.pt", random_model(spec, 3, 1, self.calib).state_dict(),
                            ["a0", "a1", "a2"])
        b = save_checkpoint(self.root / f"{name}_B.pt", random_model(spec, 2, 2, self.calib).state_dict(),
                            ["b0", "b1"])
        result = merge([a, b], spec, self.calib, MergeOptions(method="permute", stop=stop, batch_size=8))
        self[name] = self.root / f"{name}.safetensors"
        result.save(self[name])
        return self[name]


@pytest.fixture(scope="module")
def merged_files(tmp_path_factory):
    return _MergedFiles(tmp_path_factory.mktemp("export"))


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.heavy] if n == "densenet121" else [])
                                  for n in CASES])
def test_pt2_round_trip_runs_without_zipit(merged_files, name, tmp_path):
    out = tmp_path / "m.pt2"
    r = runner.invoke(app, ["export", str(merged_files[name]), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    facts = json.loads(r.stdout)
    assert facts["max_relative_gap"] <= TOLERANCE and facts["heads"] == [f"{name}_A", f"{name}_B"]
    script = (f"import sys; sys.modules['zipcli'] = None\n"          # zipit cannot be imported
              f"import torch\n"
              f"m = torch.export.load({str(out)!r}).module()\n"
              f"out = m(torch.load({str(tmp_path / 'x.pt')!r}))\n"
              f"torch.save(out, {str(tmp_path / 'y.pt')!r})\n")
    from zipcli import load_merged
    model = load_merged(merged_files[name])
    size = model.spec.input.size           # the stored spec's own size (224 for DenseNet)
    x = torch.randn(5, 3, size, size)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)
    got = torch.load(tmp_path / "y.pt")
    with torch.no_grad():
        want = model(x)
    assert len(got) == len(want) == 2 and facts["input_size"] == size
    for g, w in zip(got, want):
        assert g.shape == w.shape and float((g - w).detach().abs().max() / w.abs().max()) <= TOLERANCE


def test_onnx_round_trip(merged_files, tmp_path):
    import onnxruntime as ort          # the test extra installs it: a missing package fails, never skips
    out = tmp_path / "m.onnx"
    r = runner.invoke(app, ["export", str(merged_files["resnet20"]), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]           # one file, no temporary left
    from zipcli import load_merged
    model = load_merged(merged_files["resnet20"])
    x = torch.randn(4, 3, 32, 32)
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    with torch.no_grad():
        want = model(x)
    for g, w in zip(got, want):
        assert float((torch.as_tensor(g) - w).abs().max() / w.abs().max()) <= TOLERANCE


def test_an_export_that_does_not_reproduce_the_model_writes_nothing(merged_files, tmp_path, monkeypatch):
    import zipcli.export

    monkeypatch.setattr(zipcli.export, "check_outputs", lambda *a, **k: 0.5)
    out = tmp_path / "m.pt2"
    r = runner.invoke(app, ["export", str(merged_files["resnet20"]), "-o", str(out)])
    assert r.exit_code == 2 and handled(r) and "differs from the merged model" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_unknown_formats_and_existing_outputs(merged_files, tmp_path):
    r = runner.invoke(app, ["export", str(merged_files["resnet20"]), "-o", str(tmp_path / "m.bin")])
    assert r.exit_code == 2 and ".pt2 or .onnx" in r.stderr
    (tmp_path / "m.pt2").write_bytes(b"x")
    r = runner.invoke(app, ["export", str(merged_files["resnet20"]), "-o", str(tmp_path / "m.pt2")])
    assert r.exit_code == 2 and "--force" in r.stderr and (tmp_path / "m.pt2").read_bytes() == b"x"
