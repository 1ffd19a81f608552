"""The closed-form refit: exact on permuted copies, closer to the sources on different models, label-free."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

import zipcli.evaluate
import zipcli.pipeline
import zipcli.refit
import zipcli.specs.graph
import zipcli.streaming
from zipcli import MergeOptions, merge
from zipcli.cli import app
from zipcli.refit import _Layer, solve_layer
from zipcli.specs.layers import CONV_ROWS
from zipcli.wording import refit_summary

from conftest import make_images, random_model, save_checkpoint, small_spec
from test_exactness import _images, _permuted_copies, _rel


@pytest.fixture(scope="module")
def different(tmp_path_factory):
    """Two different random ResNet-20s and calibration images they were 'trained' on."""
    root = tmp_path_factory.mktemp("refit")
    spec = small_spec("resnet20")
    calib = make_images(root / "calib", 48, 32, seed=3)
    models = [random_model(spec, k, seed, calib) for k, seed in ((2, 1), (3, 2))]
    paths = [save_checkpoint(root / f"{n}.pt", m.state_dict(), [f"{n}{i}" for i in range(k)])
             for n, m, k in (("a", models[0], 2), ("b", models[1], 3))]
    return {"spec": spec, "calib": calib, "models": models, "paths": paths, "root": root}


@pytest.mark.parametrize("stop", ["layer1", "layer2", "layer3"])
def test_permuted_copies_come_back_exactly_with_every_layer_solved(stop, tmp_path, calib32, monkeypatch):
    # Without "keep the zipped weights" among the choices, and without the guard against too few
    # samples (24 images here), every layer is solved.
    monkeypatch.setattr(zipcli.refit, "RIDGE_GRID", (1e-3,))
    monkeypatch.setattr(zipcli.refit, "MIN_SAMPLES", 0)
    spec = small_spec("resnet20")
    model, paths = _permuted_copies(spec, tmp_path, calib32, 2)
    x = _images(spec, calib32)
    result = merge(paths, spec, calib32, MergeOptions(method="permute", stop=stop, reset_bn=False, refit="lsq"))
    refit = result.metadata["params"]["refit"]
    assert refit["layers"] > 0 and refit["kept_zipped"] == 0
    with torch.no_grad():
        expected, heads = model(x), result.model(x)
    assert all(_rel(h, expected) < 1e-4 for h in heads)


def test_a_layer_with_too_few_samples_keeps_its_zipped_weights():
    torch.manual_seed(0)
    layer = _Layer("l", nn.Linear(6, 3), (0,), None)
    for fold in (0, 1):
        layer.add(fold, torch.randn(10, 7, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64))
    w, share, before, after = solve_layer(layer)               # 20 samples < 4 per unknown (7)
    assert torch.equal(w, layer.zipped()) and share == float("inf") and before is None


def test_the_solve_returns_the_zipped_weights_when_they_already_reproduce_the_target():
    torch.manual_seed(0)
    layer = _Layer("l", nn.Linear(6, 3), (0,), None)
    w0 = layer.zipped()
    for fold in (0, 1):
        x = torch.randn(40, 7, dtype=torch.float64)
        x[:, -1] = 1
        layer.add(fold, x, x @ w0.T)
    w, share, before, after = solve_layer(layer)
    torch.testing.assert_close(w, w0, rtol=1e-9, atol=1e-9)
    assert before == pytest.approx(0, abs=1e-9) and after == pytest.approx(0, abs=1e-9)


def test_patches_at_sampled_positions_equal_the_unfolded_input():
    torch.manual_seed(0)
    for k, stride, pad, dil in ((3, 1, 1, 1), (3, 2, 1, 1), (1, 2, 0, 1), (3, 1, 2, 2), (7, 2, 3, 1)):
        conv = nn.Conv2d(5, 4, k, stride=stride, padding=pad, dilation=dil)
        x = torch.randn(2, 5, 13, 11)
        y = conv(x)
        where = torch.randperm(y.shape[2] * y.shape[3])[:7]
        full = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)[:, :, where]
        torch.testing.assert_close(CONV_ROWS.patches(conv, x, where, y.shape), full.transpose(1, 2))


def test_positions_sampled_per_image_follow_the_layers_shape():
    # A narrowing layer (O <= D) samples O / D of its positions; a widening one (a 1x1 expansion)
    # samples D / O, not every one; never fewer than MIN_POSITIONS, never more than all.
    count = zipcli.refit._position_count
    narrow, widen = nn.Conv2d(64, 64, 3), nn.Conv2d(64, 256, 1, bias=False)
    assert count(3136, narrow, 4096) == -(-3136 * 64 // 576)
    assert count(3136, widen, 4096) == 3136 * 64 // 256
    assert count(49, widen, 4096) == 49
    assert count(3136, nn.Conv2d(256, 4, 1, bias=False), 4096) == zipcli.refit.MIN_POSITIONS
    assert count(3136, nn.Conv2d(512, 64, 3), 2) == 3136       # two images: every position, for the guard


def test_the_statistics_sum_the_same_products_as_a_plain_matrix_product():
    torch.manual_seed(0)
    layer = _Layer("l", nn.Linear(599, 3), (0,), None)
    x, y = torch.randn(50, 600), torch.randn(50, 3)
    layer.add(0, x, y)
    torch.testing.assert_close(layer.gram[0], (x.T @ x).double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.cross[0], (y.T @ x).double())


def _distance_to_sources(result, models, x) -> float:
    with torch.no_grad():
        return sum(float((h - m(x)).square().sum()) for h, m in zip(result.model(x), models))


@pytest.mark.parametrize("stop", ["layer1", "layer3"])
def test_the_refit_brings_the_heads_closer_to_their_sources(different, stop):
    d = different
    x = torch.cat(list(zipcli.calibration.calibration_stream(d["calib"], d["spec"].input, 48, 0, 48).batches()))
    plain, refit = (merge(d["paths"], d["spec"], d["calib"], MergeOptions(method="permute", stop=stop, refit=r))
                    for r in ("none", "lsq"))
    assert refit.metadata["params"]["refit"]["layers"] > 0
    assert _distance_to_sources(refit, d["models"], x) < 0.9 * _distance_to_sources(plain, d["models"], x)


def test_the_refit_reads_no_labels_and_is_deterministic(different, monkeypatch):
    def forbidden(*_a, **_k):
        raise AssertionError("the refit touched labelled data")

    monkeypatch.setattr(zipcli.evaluate, "labelled_images", forbidden)
    monkeypatch.setattr(zipcli.evaluate, "labelled_batches", forbidden)
    d = different
    first, second = (merge(d["paths"], d["spec"], d["calib"], MergeOptions(method="zipit", alpha=0.3, beta=0.125,
                                                                         stop="layer2", refit="lsq"))
                     for _ in range(2))
    assert first.metadata["params"]["refit"]["images"] == 48
    for (k, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_activations_kept_in_files_give_the_same_merge_bit_for_bit(different, monkeypatch, tmp_path):
    """The refit's memory budget decides only where activations live, never the result: with no
    memory at all every activation goes through a file, and the merge is the same."""
    d = different
    options = MergeOptions(method="zipit", alpha=0.3, beta=0.125, stop="layer3", refit="lsq")
    in_memory = merge(d["paths"], d["spec"], d["calib"], options)
    written = []
    keep = zipcli.streaming.SpillStore._write
    monkeypatch.setattr(zipcli.streaming.SpillStore, "_write",
                        lambda self, value, size: written.append(size) or keep(self, value, size))
    monkeypatch.setattr(zipcli.refit, "MEMORY", 0)
    monkeypatch.setattr(zipcli.streaming.tempfile, "tempdir", str(tmp_path))
    in_files = merge(d["paths"], d["spec"], d["calib"], options)
    assert sum(written) > 10 * 2**20                   # the activations really went through files
    assert list(tmp_path.iterdir()) == []              # and the files are gone
    assert in_files.metadata["params"]["refit"] == in_memory.metadata["params"]["refit"]
    for (k, a), (_, b) in zip(in_memory.model.state_dict().items(), in_files.model.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("batch_size", [64, 24])
def test_the_batchnorm_reset_measured_in_the_refits_pass_equals_its_own_pass(different, monkeypatch, batch_size):
    """The refit computes every BatchNorm input once, with the final weights before it, so the reset
    rides on its pass; the statistics are those of a separate reset pass, bit for bit."""
    d = different
    options = MergeOptions(method="permute", stop="layer2", batch_size=batch_size)
    folded = merge(d["paths"], d["spec"], d["calib"], options)
    monkeypatch.setattr(zipcli.pipeline, "BatchStatistics", lambda model: None)
    separate = merge(d["paths"], d["spec"], d["calib"], options)
    assert folded.metadata["params"]["refit"]["layers"] > 0
    names = [k for k in folded.model.state_dict() if "running_" in k or "num_batches" in k]
    assert names
    for (k, a), (_, b) in zip(folded.model.state_dict().items(), separate.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_segment_runner_gives_the_models_output_whatever_its_segments():
    spec = small_spec("resnet20")
    model = random_model(spec, 3, 5).eval()
    gm = zipcli.specs.graph.trace(model)
    x = torch.randn(20, 3, 32, 32)
    chunks = x.split(7)
    with zipcli.streaming.SpillStore(0) as store:
        run = zipcli.streaming.SegmentRunner(gm, lambda c: (chunks[c],), store, "m")
        for name in ("layer1.0.conv1", "layer2.1.conv2", "linear"):
            end = run.call_of(name)
            for c in range(len(chunks)):
                run.input_of(c, end)
            run.advance(end)
        out = torch.cat([run.finish(c) for c in range(len(chunks))])
        assert store._values == {} or all(k[0] != "m" for k in store._values)
    assert torch.equal(out, torch.cat([model(c) for c in chunks]))


def test_cli_refit_option(different, tmp_path):
    runner, d = CliRunner(), different
    base = ["merge", *map(str, d["paths"]), "--arch", "resnet20", "--calib", str(d["calib"]), "--method", "permute",
            "--stop", "layer2", "--quiet"]
    bad = runner.invoke(app, [*base, "--refit", "cca", "-o", str(tmp_path / "bad.safetensors")])
    assert bad.exit_code == 2 and "--refit" in bad.output and "lsq" in bad.output
    assert not (tmp_path / "bad.safetensors").exists()
    out = tmp_path / "m.safetensors"
    ok = runner.invoke(app, [*base, "--refit", "lsq", "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    shown = runner.invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "refit" in shown.output and "lsq on 48 images" in shown.output
    card = (tmp_path / "m.md").read_text()
    assert "--refit lsq" in card and "- Refit: lsq on 48 images" in card


@pytest.mark.parametrize("facts", [None, {"per_layer": "x"}, {"per_layer": [{"ridge": 1}]}, {"images": "many"}])
def test_damaged_refit_figures_in_a_file_give_a_plain_line(facts):
    assert refit_summary(facts) == "lsq (its figures in the file are unreadable)"
