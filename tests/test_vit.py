"""Vision transformers: the tracer finds the residual stream (class token and position embeddings
included), each MLP's hidden space, and per attention a query/key and a value space of whole heads;
the self-check proves it and fails when heads, their tie or the parameters are left out."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

from zipcli import MergeOptions, merge
from zipcli.cli import app
from zipcli.heads import match_heads
from zipcli.merged import load_merged
from zipcli.methods.permute import match_permute
from zipcli.errors import SpecError, ZipitError
from zipcli.specs import parse_spec
from zipcli.specs.authoring import dump_spec, spec_document
from zipcli.specs.check import check_spec
from zipcli.specs.graph import ModelGraph
from zipcli.specs.builders import build_model
from zipcli.specs.recipes import CIFAR
from zipcli.specs.selfcheck import headed_permutation, permute_state_dict, random_permutations, randomize_spec_tensors
from zipcli.specs.tracing import trace_spaces

from conftest import save_checkpoint

SMALL = {"depth": 2, "dim": 32, "heads": 2}
TRUSTED = ["zipcli.models"]


@pytest.fixture(scope="module")
def small_spec():
    return parse_spec(dump_spec(spec_document("vit", "zipcli.models:cifar_vit", SMALL, CIFAR)), "vit", TRUSTED)


def test_the_small_vit_traces_to_a_stream_and_per_block_heads_and_mlp(small_spec):
    spaces = {s.name: s for s in small_spec.spaces}
    assert list(spaces) == ["blocks.stream"] + [f"blocks.{b}.{n}" for b in (0, 1)
                                                for n in ("attn.qk", "attn.v", "mlp.fc1")]
    stream = spaces["blocks.stream"]
    assert stream.parameters == ("cls_token", "pos_embed") and stream.heads is None
    assert [str(m) for m in stream.writers] == ["patch_embed"] + [
        f"blocks.{b}.{m}" for b in (0, 1) for m in ("norm1", "attn.proj", "norm2", "mlp.fc2")] + ["norm"]
    assert [str(m) for m in stream.readers] == [
        f"blocks.{b}.{m}" for b in (0, 1) for m in ("attn.q", "attn.k", "attn.v", "mlp.fc1")] + ["head"]
    assert (str(stream.observe), stream.observe_axis) == ("norm", -1)   # every token, not the class token alone
    qk, v = spaces["blocks.0.attn.qk"], spaces["blocks.0.attn.v"]
    assert [str(m) for m in qk.writers] == ["blocks.0.attn.q", "blocks.0.attn.k"] and qk.readers == ()
    assert (qk.heads, qk.heads_with, str(qk.observe)) == (2, None, "blocks.0.attn.q>")
    assert (v.heads, v.heads_with, [str(m) for m in v.readers]) == (2, "blocks.0.attn.qk", ["blocks.0.attn.proj"])
    assert small_spec.stops == ("blocks.0", "blocks.1", "norm") and small_spec.classifiers == ("head",)
    assert "format: 2" in small_spec.text


def test_the_small_vit_spec_passes_the_check(small_spec):
    result = check_spec(small_spec)
    assert result.passed, result.problems
    assert result.self_check < 1e-5 and result.tensors == result.in_spaces and not result.outside


@pytest.mark.parametrize("edit, words", [
    (lambda t: re.sub(r"  heads(_with)?: .*\n", "", t), "has heads None; tracing finds 2"),
    (lambda t: re.sub(r"  heads_with: .*\n", "", t), "tracing ties its heads to blocks.0.attn.qk"),
    (lambda t: re.sub(r"  parameters: .*\n", "", t), "cls_token (parameter) is in no space"),
])
def test_a_spec_without_heads_their_tie_or_the_embeddings_fails_the_self_check(small_spec, edit, words):
    """Each mistake moves the outputs well past the tolerance (q/k/v/proj are drawn at a trained
    model's scale for the check), and coverage names it."""
    result = check_spec(parse_spec(edit(small_spec.text), "edited", TRUSTED))
    assert not result.passed and result.self_check > 1e-3
    assert any(words in p for p in result.problems), result.problems


def test_random_permutations_move_whole_heads_in_the_same_order_for_queries_keys_and_values(small_spec):
    graph = ModelGraph(small_spec, build_model(small_spec, 10))
    for seed in range(5):
        perms = random_permutations(graph, seed)
        for b in (0, 1):
            orders = []
            for name in (f"blocks.{b}.attn.qk", f"blocks.{b}.attn.v"):
                heads = perms[name].view(2, 16) // 16          # the old head of each new feature
                assert (heads == heads[:, :1]).all()             # a head stays whole
                orders.append(heads[:, 0].tolist())
                assert sorted(perms[name].tolist()) == list(range(32))
            assert orders[0] == orders[1]
    assert any(random_permutations(graph, s)["blocks.0.attn.qk"].view(2, 16)[0, 0] >= 16 for s in range(5))


def test_the_full_size_vit_passes_the_check():
    spec = parse_spec(dump_spec(spec_document("vit", "zipcli.models:cifar_vit", {}, CIFAR)), "vit", TRUSTED)
    result = check_spec(spec)
    assert result.passed and result.self_check < 1e-5, result.problems
    assert len(spec.spaces) == 1 + 6 * 3 and all(s.heads == 3 for s in spec.spaces if "attn" in s.name)


def test_specs_trace_and_check_on_the_command_line(tmp_path):
    runner = CliRunner()
    out = tmp_path / "vit.yaml"
    r = runner.invoke(app, ["specs", "trace", "zipcli.models:cifar_vit", "--input", "cifar", "--kw", "depth=1",
                            "--kw", "dim=16", "--kw", "heads=4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["specs", "check", str(out), "--json"])
    assert r.exit_code == 0, r.output
    facts = json.loads(r.stdout)
    assert facts["passed"] and facts["spaces"] == 4


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("format: 2", "format: 1"), "spaces[0].parameters needs format 2"),
    (lambda t: t.replace("heads_with: blocks.0.attn.qk", "heads_with: blocks.0.mlp.fc1"), "has heads_with"),
    (lambda t: t.replace("parameters: [cls_token, pos_embed]", "parameters: [cls_token, blocks.0.mlp.fc2.weight]"),
     "does not have the space's 32 channels on its last axis"),
    (lambda t: t.replace("\n  heads: 2\n", "\n  heads: 5\n"), "which do not split into 5 heads"),
])
def test_bad_head_and_parameter_entries_are_named(small_spec, edit, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        spec = parse_spec(edit(small_spec.text), "edited", TRUSTED)
        ModelGraph(spec, build_model(spec, 10))


class MatmulAttention(nn.Module):
    """Attention written out by hand: its products of two feature maps are not followed."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.q, self.k = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.fc = nn.Linear(dim, 2)

    def forward(self, x):
        t = self.embed(x.flatten(2).transpose(1, 2))
        weights = torch.softmax(self.q(t) @ self.k(t).transpose(1, 2), -1)
        return self.fc((weights @ t).mean(1))


class MaskedAttention(nn.Module):
    def __init__(self, dim: int = 8):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.register_buffer("mask", torch.zeros(1, 1, 16, 16))
        self.fc = nn.Linear(dim, 2)

    def forward(self, x):
        t = self.embed(x.flatten(2).transpose(1, 2))
        heads = [f(t).reshape(t.shape[0], 16, 2, 4).transpose(1, 2) for f in (self.q, self.k, self.v)]
        return self.fc(F.scaled_dot_product_attention(*heads, self.mask).mean(2).flatten(1))


class LinearOverWidth(nn.Module):
    """A linear layer over the last (spatial) axis of a map: not its channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x)).mean((1, 2))


class TokenMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(self.embed(x.flatten(2).transpose(1, 2)).mean(-1))


@pytest.mark.parametrize("cls, words", [
    (MatmulAttention, ["'matmul'", "mixes channels"]),
    (MaskedAttention, ["attention with a mask tensor", "scaled_dot_product_attention"]),
    (LinearOverWidth, ["a Linear working on axis 3 of a tensor whose channels are on axis 1", "'fc'"]),
    (TokenMean, ["over the batch or channel axis", "mean"]),
])
def test_what_transformers_may_not_do_is_refused_by_name(cls, words):
    with pytest.raises(SpecError) as info:
        trace_spaces(cls(), torch.zeros(1, 3, 4, 4))
    for word in words:
        assert word in info.value.message, info.value.message


# --- merging: whole heads, exact on permuted copies ------------------------------------------------------------


def _permuted_vits(spec, tmp_path, n_models: int):
    """A small ViT with attention at a trained model's scale, and permuted copies of it."""
    torch.manual_seed(1)
    model = build_model(spec, 7).eval()
    graph = ModelGraph(spec, model)
    randomize_spec_tensors(graph, None, seed=1)
    state = model.state_dict()
    paths = [save_checkpoint(tmp_path / "m0.pt", state)]
    for i in range(1, n_models):
        paths.append(save_checkpoint(tmp_path / f"m{i}.pt",
                                     permute_state_dict(graph, state, random_permutations(graph, seed=10 + i))))
    return model, paths


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("method", ["permute", "zipit"])
@pytest.mark.parametrize("refit", ["none", pytest.param("lsq", marks=pytest.mark.heavy)])   # lsq: see the next tests
def test_permuted_copies_of_a_vit_merge_back_exactly_at_every_stop(small_spec, method, refit, tmp_path, calib32):
    model, paths = _permuted_vits(small_spec, tmp_path, 2)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    for stop in small_spec.stops + ("output",):
        result = merge(paths, small_spec, calib32, MergeOptions(method=method, stop=stop, refit=refit, batch_size=8))
        with torch.no_grad():
            heads = result.model(x)
        assert len(heads) == (1 if stop == "output" else 2)
        assert all(_rel(h, expected) < 1e-4 for h in heads), (method, stop)


@pytest.mark.parametrize("method", ["permute", "zipit"])
def test_three_permuted_vits_merge_back_at_every_stop_and_survive_a_save(small_spec, method, tmp_path, calib32):
    model, paths = _permuted_vits(small_spec, tmp_path, 3)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    for stop in small_spec.stops:
        result = merge(paths, small_spec, calib32,
                       MergeOptions(method=method, alpha=1.0, stop=stop, refit="none", batch_size=8))
        result.save(tmp_path / f"{stop}.safetensors")
        with torch.no_grad():
            heads = load_merged(tmp_path / f"{stop}.safetensors")(x)
        assert len(heads) == 3 and all(_rel(h, expected) < 1e-4 for h in heads), (method, stop)


def test_a_block_stop_merges_the_stream_in_the_trunk_and_unmerges_it_in_each_head(small_spec, tmp_path, calib32):
    """At ``blocks.0`` the stream is merged (patch embedding, block 0) and cut: each head takes it
    back to its own model's channels with a 0/1 matrix, then runs its model's own block 1 and
    classifier, unchanged (no U folded into them)."""
    graph = ModelGraph(small_spec, build_model(small_spec, 7))
    plan = graph.plan("blocks.0")
    assert plan.cut_spaces == ("blocks.stream",)
    assert [(space, axis) for _, space, axis in plan.unmerges] == [("blocks.stream", 2)]
    assert set(plan.merged_spaces) == {"blocks.stream", "blocks.0.attn.qk", "blocks.0.attn.v", "blocks.0.mlp.fc1"}
    assert graph.plan("norm").cut_spaces == () and graph.plan("norm").unmerges == ()
    model, paths = _permuted_vits(small_spec, tmp_path, 2)
    result = merge(paths, small_spec, calib32, MergeOptions(method="permute", stop="blocks.0", refit="none",
                                                            batch_size=8))
    state = result.model.state_dict()
    sources = [torch.load(p) for p in paths]
    for i, source in enumerate(sources):
        u = state[f"head_modules.{i}.unmerge.0.matrix"]
        assert u.shape == (32, 32) and set(u.unique().tolist()) == {0.0, 1.0}
        assert (u.sum(0) == 1).all() and (u.sum(1) == 1).all()           # a permutation
        for key in ("blocks.1.attn.q.weight", "blocks.1.mlp.fc1.weight", "blocks.1.norm1.weight", "head.weight"):
            assert torch.equal(state[f"head_modules.{i}.{key}"], source[key]), (i, key)
    u = state["head_modules.1.unmerge.0.matrix"]
    order = torch.argmax(u, 1)                     # the merged channel of each of model 1's stream channels
    assert torch.equal(state["trunk.patch_embed.weight"][order], sources[1]["patch_embed.weight"])


def test_a_merge_at_a_block_stop_loads_and_exports(small_spec, tmp_path, calib32):
    """With the refit, the merge is exact; the file holds each head's unmerge
    (``heads.<i>.unmerge.0.matrix``); ``load_merged`` and the export reproduce the model."""
    from safetensors import safe_open

    from zipcli.export import export_merged

    model, paths = _permuted_vits(small_spec, tmp_path, 2)
    result = merge(paths, small_spec, calib32, MergeOptions(method="zipit", stop="blocks.1", batch_size=8))
    out = tmp_path / "merged.safetensors"
    result.save(out)
    with safe_open(str(out), framework="pt") as f:
        assert {k for k in f.keys() if "unmerge" in k} == {"heads.0.unmerge.0.matrix", "heads.1.unmerge.0.matrix"}
    loaded = load_merged(out)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want, got, expected = result.model(x), loaded(x), model(x)
    assert all(_rel(h, expected) < 1e-4 for h in want)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    facts = export_merged(out, tmp_path / "merged.pt2")
    program = torch.export.load(str(tmp_path / "merged.pt2")).module()
    with torch.no_grad():
        exported = program(x)
    assert facts["heads"] == [h.name for h in loaded.heads]
    assert all(_rel(a, b) < 1e-5 for a, b in zip(exported, want))


def test_a_cut_stream_keeps_one_model_s_width(small_spec, tmp_path, calib32):
    """The size dial never widens a space the stop cuts, and a width asked for it is refused."""
    from zipcli.measured import Calibration
    from zipcli.options import MergePoint
    from zipcli.pipeline import merge_at
    from zipcli.sizing import resizable
    from zipcli.tuning import Setting

    _, paths = _permuted_vits(small_spec, tmp_path, 2)
    cal = Calibration(paths, small_spec, calib32, MergeOptions(method="permute", stop="blocks.0", batch_size=8))
    assert "blocks.stream" not in resizable(cal, "blocks.0")
    assert "blocks.stream" not in resizable(cal, "norm")        # the class token and position embeddings write it
    cal.measure("blocks.0", "permute")
    with pytest.raises(ZipitError, match="lies inside space 'blocks.stream': merging it at a size is not supported"):
        merge_at(cal, MergePoint("blocks.0", "permute", Setting(0.3, 0.125), widths=(("blocks.stream", 40),)))


@pytest.mark.parametrize("method", ["permute", "zipit"])
def test_a_vit_at_a_size_widens_only_its_mlps_and_comes_back_exactly(small_spec, method, tmp_path, calib32):
    """Heads are matched whole and the stream carries the class token and position embeddings, so
    the size dial spends its width on the MLPs' hidden spaces; permuted copies still come back."""
    from zipcli.measured import Calibration
    from zipcli.options import MergePoint
    from zipcli.pipeline import merge_at
    from zipcli.sizing import resizable
    from zipcli.tuning import Setting

    model, paths = _permuted_vits(small_spec, tmp_path, 2)
    cal = Calibration(paths, small_spec, calib32, MergeOptions(method=method, stop="norm", batch_size=8))
    mlps = resizable(cal, "norm")
    assert mlps and all(name.endswith("mlp.fc1") for name in mlps), mlps
    cal.measure("norm", method)
    rng = np.random.default_rng(3)
    widths = tuple((s, int(rng.integers(cal.graph.space_size[s] + 1, 2 * cal.graph.space_size[s] + 1))) for s in mlps)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        heads = merge_at(cal, MergePoint("norm", method, Setting(1.0, 0.125), widths=widths)).model(x)
    assert all(_rel(h, expected) < 1e-4 for h in heads), widths
    for space, why in (("blocks.0.attn.qk", "split into attention heads"),
                       ("blocks.stream", "written by cls_token, pos_embed")):    # a width asked anyway
        wider = ((space, cal.graph.space_size[space] + 4),)
        with pytest.raises(ZipitError, match=why):
            merge_at(cal, MergePoint("norm", method, Setting(1.0, 0.125), widths=wider))


def test_cnn_stops_still_may_not_cut_a_stage():
    spec = parse_spec(dump_spec(spec_document("r20", "zipcli.models:cifar_resnet20", {}, CIFAR)), "r20", TRUSTED)
    graph = ModelGraph(spec, build_model(spec, 10))
    assert not graph.cuts_inside_spaces and spec.stops == ("layer1", "layer2", "layer3")
    with pytest.raises(SpecError, match="cuts through feature space 'layer1.stream'"):
        graph.cut("layer1.0")


def test_head_matching_finds_a_permutation_of_heads_and_of_features_within_them():
    """Queries/keys and values of a copy whose heads moved in one order, features within each head
    in orders of their own: every feature is matched to its own copy."""
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(1)
    qk, v = rng.normal(size=(500, 12)), rng.normal(size=(500, 12))
    order = torch.randperm(3, generator=gen)
    qk1, v1 = (x[:, headed_permutation(order, [torch.randperm(4, generator=gen) for _ in range(3)]).numpy()]
               for x in (qk, v))
    corrs = [np.corrcoef(np.hstack([a, b]).T) for a, b in ((qk, qk1), (v, v1))]
    for method in ("permute", "zipit"):
        for m, original, copy in zip(match_heads(corrs, 2, 3, method), (qk, v), (qk1, v1)):
            merged0, merged1 = np.empty_like(original), np.empty_like(copy)
            merged0[:, m.assign[0]], merged1[:, m.assign[1]] = original, copy
            np.testing.assert_array_equal(merged0, merged1)


def test_head_matching_never_splits_a_head_even_where_features_match_better_across_heads():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(400, 16))
    other = features[:, rng.permutation(16)] + 0.1 * rng.normal(size=(400, 16))   # heads scrambled
    corrs = [np.corrcoef(np.hstack([features, other]).T)]
    plain = match_permute(corrs[0], 2).assign[1].reshape(4, 4) // 4
    assert not (plain == plain[:, :1]).all()                      # feature by feature, heads are split
    for method in ("permute", "zipit"):
        (m,) = match_heads(corrs, 2, 4, method)
        for i in range(2):
            merged_head = m.assign[i].reshape(4, 4) // 4          # the merged head of each source feature
            assert (merged_head == merged_head[:, :1]).all()      # a source head goes to one merged head
            assert sorted(merged_head[:, 0]) == [0, 1, 2, 3]


# --- torchvision's ViT-B/16, its attention split into layers ------------------------------------------------

B16_SMALL = {"image_size": 32, "num_layers": 2, "hidden_dim": 64, "num_heads": 4, "mlp_dim": 128}
B16_STOPS = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1", "encoder.ln"]


@pytest.fixture(scope="module")
def b16_spec():
    doc = spec_document("b16", "zipcli.models:vit_b_16", B16_SMALL, CIFAR, stops=B16_STOPS)
    return parse_spec(dump_spec(doc), "b16", TRUSTED)


def test_vit_b_16_gives_torchvision_s_logits_from_torchvision_s_checkpoint(tmp_path):
    """A checkpoint of torchvision's VisionTransformer (packed in_proj_weight/bias) loads into the
    split model, through merge's own loader, and gives torchvision's logits."""
    from torchvision.models.vision_transformer import VisionTransformer

    from zipcli.checkpoints import load_sources
    from zipcli.specs.library import load_spec

    torch.manual_seed(0)
    kwargs = {**B16_SMALL, "patch_size": 16, "num_classes": 5}
    reference = VisionTransformer(**kwargs).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.2)
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in reference.state_dict()
    path = save_checkpoint(tmp_path / "tv.pt", reference.state_dict())
    spec = dataclasses.replace(load_spec("vit_b_16"), kwargs=B16_SMALL, stops=("encoder.ln",),
                               default_stop="encoder.ln")
    (source,) = load_sources([path], spec, min_models=1)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want, got = reference(x), source.model(x)
    assert want.abs().max() > 0.1 and _rel(got, want) < 1e-5


def test_vit_b_16_builds_torchvision_s_model_with_split_attention():
    from zipcli.models import SplitAttention, vit_b_16

    model = vit_b_16(**B16_SMALL, num_classes=3)
    blocks = list(model.encoder.layers)
    assert len(blocks) == 2 and all(isinstance(b.self_attention, SplitAttention) for b in blocks)
    assert model.encoder.pos_embedding.shape == (1, 5, 64) and model.heads.head.out_features == 3
    full = vit_b_16()
    assert sum(p.numel() for p in full.parameters()) == 86_567_656      # torchvision's vit_b_16, to the parameter


def test_the_vit_b_16_spec_passes_the_check_and_a_spec_without_heads_fails(b16_spec):
    spaces = {s.name: s for s in b16_spec.spaces}
    stream = spaces["encoder.stream"]
    assert stream.parameters == ("class_token", "encoder.pos_embedding") and str(stream.observe) == "encoder.ln"
    qk = spaces["encoder.layers.encoder_layer_0.self_attention.qk"]
    assert qk.heads == 4 and [str(m) for m in qk.writers] == [f"encoder.layers.encoder_layer_0.self_attention.{n}"
                                                              for n in "qk"]
    result = check_spec(b16_spec)
    assert result.passed and result.self_check < 1e-5, result.problems
    broken = check_spec(parse_spec(re.sub(r"  heads(_with)?: .*\n", "", b16_spec.text), "edited", TRUSTED))
    assert not broken.passed and broken.self_check > 1e-3


@pytest.mark.parametrize("method", ["permute", pytest.param("zipit", marks=pytest.mark.heavy)])
def test_permuted_copies_of_vit_b_16_merge_back_exactly_at_every_stop(b16_spec, method, tmp_path, calib32):
    model, paths = _permuted_vits(b16_spec, tmp_path, 2)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    assert expected.abs().max() > 0                 # torchvision starts its classifier at zero: drawn above
    for stop in b16_spec.stops:
        result = merge(paths, b16_spec, calib32, MergeOptions(method=method, stop=stop, refit="none", batch_size=8))
        with torch.no_grad():
            heads = result.model(x)
        assert len(heads) == 2 and all(_rel(h, expected) < 1e-4 for h in heads), (method, stop)
