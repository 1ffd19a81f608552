"""Bugs found by reading the code as a whole (issue 13), each pinned by a test that failed before its fix."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import zipcli
from zipcli import MergeOptions, ZipitError, merge
from zipcli.cli import app
from zipcli.merged import read_metadata

from conftest import handled, make_images, random_model, save_checkpoint, small_spec

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("house")
    spec = small_spec("resnet20")
    calib = make_images(root / "calib", 12, 32, seed=2)
    (calib / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    data = make_images(root / "data", 6, 32, seed=4, classes=["a0", "a1", "b0", "b1", "b2"])
    a = save_checkpoint(root / "A.pt", random_model(spec, 2, 1, calib).state_dict(), ["a0", "a1"])
    b = save_checkpoint(root / "B.pt", random_model(spec, 3, 2, calib).state_dict(), ["b0", "b1", "b2"])
    return {"spec": spec, "calib": calib, "data": data, "paths": [a, b], "root": root}


def test_average_counts_and_reports_the_images_its_batchnorm_reset_reads(pair, tmp_path):
    out = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["merge", *map(str, pair["paths"]), "--arch", "resnet20", "--calib", str(pair["calib"]),
                            "--method", "average", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "skipped 1 unreadable image(s)" in r.output and "broken.png" in r.output
    cal = json.loads(read_metadata(out)["calibration"])
    assert (cal["num_images"], cal["skipped"]) == (12, 1)


def test_average_without_batchnorm_reset_reads_no_image_and_says_so(pair):
    result = merge(pair["paths"], pair["spec"], pair["calib"], MergeOptions(method="average", reset_bn=False))
    assert result.metadata["calibration"]["num_images"] == 0


def test_save_leaves_the_callers_model_alone(pair, tmp_path):
    result = merge(pair["paths"], pair["spec"], pair["calib"],
                   MergeOptions(method="permute", dtype="float16", stop="layer1"))
    before = {k: v.clone() for k, v in result.model.state_dict().items()}
    result.save(tmp_path / "m.safetensors")
    after = result.model.state_dict()
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    assert next(result.model.parameters()).dtype == torch.float32
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(str(tmp_path / "m.safetensors")).values() if t.is_floating_point()} == \
        {torch.float16}


def test_eval_skips_a_decompression_bomb_as_merge_does(pair, tmp_path, monkeypatch):
    out = tmp_path / "m.safetensors"
    assert runner.invoke(app, ["merge", *map(str, pair["paths"]), "--arch", "resnet20", "--calib",
                               str(pair["calib"]), "--method", "permute", "-o", str(out), "--quiet"]).exit_code == 0
    data = tmp_path / "data"
    data.mkdir()
    for cls in ("a0", "b0"):
        (data / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(data / cls / f"{i}.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(data / "a0" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)   # 64 x 64 > 2 x 1500: PIL raises DecompressionBombError
    r = runner.invoke(app, ["eval", str(out), "--data", str(data)])
    assert r.exit_code == 0 and handled(r), r.output
    assert "1 unreadable images skipped" in r.output


def test_library_errors_name_the_python_argument_and_the_flag(pair, tmp_path):
    with pytest.raises(ZipitError) as bad_alpha:
        merge(pair["paths"], pair["spec"], pair["calib"], MergeOptions(alpha=2.0))
    assert bad_alpha.value.message == "alpha 2 is out of range" and "(--alpha)" in bad_alpha.value.hint
    result = merge(pair["paths"], pair["spec"], pair["calib"], MergeOptions(method="permute", stop="layer1"))
    (tmp_path / "m.safetensors").write_bytes(b"x")
    with pytest.raises(ZipitError) as exists:
        result.save(tmp_path / "m.safetensors")
    assert "force=True" in exists.value.hint


def test_the_public_api_exports_what_a_caller_catches_and_passes():
    for name in ("ZipitError", "Reporter", "SilentReporter", "MergeOptions", "MergeResult", "merge", "load_merged",
                 "load_spec"):
        assert hasattr(zipcli, name) and name in zipcli.__all__


def test_scripts_and_benchmarks_use_no_private_names_of_the_package():
    private = []
    for path in list((ROOT / "scripts").glob("*.py")) + list((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zipcli"):
                private += [f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert not private, private


def test_evaluate_does_not_import_the_merge_pipeline():
    tree = ast.parse((ROOT / "zipcli" / "evaluate.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "pipeline" not in modules
