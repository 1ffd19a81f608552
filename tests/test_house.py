"""Bugs found by reading the code as a whole (issue 13), each pinned by a test that failed before its fix."""
from __future__ import annotations

import ast
import json
import os
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

from conftest import handled, make_images, resnet20_pair, save_checkpoint, small_spec

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("house")
    spec = small_spec("resnet20")
    calib = make_images(root / "calib", 12, 32, seed=2)
    (calib / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    data = make_images(root / "data", 6, 32, seed=4, classes=["a0", "a1", "b0", "b1", "b2"])
    a, b = resnet20_pair(root, calib)
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
    result = merge(pair["paths"], pair["spec"], pair["calib"],
                   MergeOptions(method="average", reset_bn=False, refit="none"))
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


# --- Issue 26: bugs found reading the code at 33dc36e, each pinned by a test that failed before its fix.

from zipcli.checkpoints import load_checkpoint  # noqa: E402
from zipcli.errors import CalibrationError, CheckpointError, OutputError  # noqa: E402
from zipcli.merged import MergedModel  # noqa: E402
from zipcli.assembly import match  # noqa: E402
from zipcli.choosing import decide  # noqa: E402
from zipcli.measured import Calibration  # noqa: E402
from zipcli.pipeline import merge_at  # noqa: E402
from zipcli.tuning import Setting  # noqa: E402


@pytest.mark.parametrize("refit", ["none", "lsq"])       # the reset's own pass, and the refit's pass
def test_a_value_error_inside_the_models_forward_is_not_called_unreadable_images(pair, monkeypatch, refit):
    forward = torch.nn.BatchNorm2d.forward

    def broken(self, x):          # fails in train mode: the BatchNorm statistics' passes
        if self.training:
            raise ValueError("shapes do not fit")
        return forward(self, x)

    monkeypatch.setattr(torch.nn.BatchNorm2d, "forward", broken)
    with pytest.raises(ValueError, match="shapes do not fit"):
        merge(pair["paths"], pair["spec"], pair["calib"], MergeOptions(method="permute", refit=refit))


def test_no_readable_image_for_the_batchnorm_reset_is_still_a_calibration_error(pair, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"not an image")
    with pytest.raises(CalibrationError, match="no calibration image could be read"):
        merge(pair["paths"], pair["spec"], bad, MergeOptions(method="average"))


def test_matching_a_space_that_was_never_calibrated_is_refused_not_guessed(pair):
    cal = Calibration(pair["paths"], pair["spec"], pair["calib"], MergeOptions(method="permute", stop="layer1"))
    cal.measure("layer1")
    with pytest.raises(RuntimeError, match="has no correlation"):
        match(cal, "layer3", "permute", Setting(0.3, 0.125))
    assert match(cal, "layer3", "average", Setting(0.3, 0.125))        # averaging needs no correlation


def test_each_result_keeps_its_own_timings_and_no_earlier_tuning(pair, tmp_path):
    calib = make_images(tmp_path / "calib", 80, 32, seed=5)                 # enough to hold some out and tune
    options = MergeOptions(method="zipit", stop="layer1", num_calib=60)
    cal = Calibration(pair["paths"], pair["spec"], calib, options)
    cal.measure("layer1")
    first = merge_at(cal, decide(cal, options))
    assert "tuning" in first.timings
    kept = dict(first.timings)
    fixed = MergeOptions(method="zipit", stop="layer1", num_calib=60, alpha=0.3, beta=0.125)  # nothing to tune
    second = merge_at(cal, decide(cal, fixed))
    assert "tuning" not in second.timings
    assert first.timings == kept and first.timings is not second.timings


@pytest.mark.parametrize("case", ["integers", "float8"])
def test_checkpoints_without_mergeable_weights_end_in_one_line_naming_the_file(pair, tmp_path, case):
    state = torch.load(pair["paths"][1], weights_only=True)
    if case == "integers":
        state = {k: v.to(torch.int32) for k, v in state.items()}
    else:
        state = {k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in state.items()}
    bad = save_checkpoint(tmp_path / "B8.pt", state, ["b0", "b1", "b2"])
    with pytest.raises(CheckpointError, match="B8.pt"):
        load_checkpoint(bad)
    r = runner.invoke(app, ["merge", str(pair["paths"][0]), str(bad), "--arch", "resnet20",
                            "--calib", str(pair["calib"]), "-o", str(tmp_path / "m.safetensors")])
    assert r.exit_code == 2 and handled(r), r.output
    assert "B8.pt" in r.output and "internal error" not in r.output and not (tmp_path / "m.safetensors").exists()


def test_a_source_keeps_its_model_not_a_second_copy_of_its_weights(pair):
    cal = Calibration(pair["paths"], pair["spec"], pair["calib"], MergeOptions(method="permute"))
    assert all(s.checkpoint.state_dict == {} and s.checkpoint.dtype == torch.float32 for s in cal.sources)


def _failing_replace(monkeypatch, target_suffix: str):
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(target_suffix):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def test_a_failed_model_rename_leaves_the_old_model_and_its_old_card(pair, tmp_path, monkeypatch):
    out = tmp_path / "m.safetensors"
    first = merge(pair["paths"], pair["spec"], pair["calib"], MergeOptions(method="permute", stop="layer1"))
    first.save(out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = merge(pair["paths"], pair["spec"], pair["calib"], MergeOptions(method="permute", stop="layer2"))
    _failing_replace(monkeypatch, "m.safetensors")
    with pytest.raises(OutputError, match="nothing was written"):
        second.save(out, force=True)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_failed_card_rename_leaves_no_card_that_describes_the_old_model(pair, tmp_path, monkeypatch):
    out = tmp_path / "m.safetensors"
    merge(pair["paths"], pair["spec"], pair["calib"], MergeOptions(method="permute", stop="layer1")).save(out)
    second = merge(pair["paths"], pair["spec"], pair["calib"], MergeOptions(method="permute", stop="layer2"))
    _failing_replace(monkeypatch, "m.md")
    with pytest.raises(OutputError, match="wrote .*m.safetensors.* but not .*m.md"):
        second.save(out, force=True)
    assert read_metadata(out)["stop"] == "layer2" and not (tmp_path / "m.md").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]       # no temporary left


def test_the_choice_reads_the_same_in_the_summary_inspect_and_the_card(pair, tmp_path):
    """One sentence (``wording.choice_evidence``), where three renderings each had their own."""
    from zipcli.wording import choice_evidence
    calib = make_images(tmp_path / "calib", 100, 32, seed=5)
    out = tmp_path / "m.safetensors"
    merged = runner.invoke(app, ["merge", *map(str, pair["paths"]), "--arch", "resnet20", "--calib", str(calib),
                                 "--num-calib", "60", "--stop", "layer1", "-o", str(out)])
    assert merged.exit_code == 0, merged.output
    choice = json.loads(read_metadata(out)["params"])["choice"]
    assert "interval" in choice
    sentence = " ".join(choice_evidence(choice).split())
    shown = runner.invoke(app, ["inspect", str(out)])
    card = (tmp_path / "m.md").read_text()
    for text in (merged.output, shown.output, card):
        assert sentence in " ".join(text.replace("│", " ").split()), text
