"""The tracer on tiny models: what it supports comes out right (self-check, coverage, exact merges),
what it does not support is refused with the operation and the layer named."""
from __future__ import annotations

import sys
import textwrap
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zipcli import MergeOptions, merge
from zipcli.errors import SpecError
from zipcli.specs.graph import ModelGraph
from zipcli.specs.builders import build_model
from zipcli.specs.selfcheck import permute_state_dict, random_permutations, randomize_per_channel, self_check
from zipcli.specs.check import check_spec
from zipcli.specs import parse_spec
from zipcli.specs.authoring import dump_spec, spec_document
from zipcli.specs.tracing import trace_spaces

from conftest import make_images, random_model, save_checkpoint

TINY = {"size": 16, "resize": None, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


class DenseNetLike(nn.Module):
    """Two dense layers (concatenation), a transition, BN on concatenations, a head on a concat."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm0 = nn.BatchNorm2d(8)
        self.grow1 = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
        self.grow2 = nn.Sequential(nn.BatchNorm2d(12), nn.ReLU(), nn.Conv2d(12, 4, 3, padding=1))
        self.transition = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 6, 1), nn.AvgPool2d(2))
        self.grow3 = nn.Sequential(nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1))
        self.norm = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, num_classes)

    def forward(self, x):
        x = F.relu(self.norm0(self.stem(x)))
        x = torch.cat([x, self.grow1(x)], 1)
        x = torch.cat([x, self.grow2(x)], 1)
        x = self.transition(x)
        x = torch.cat([x, self.grow3(x)], 1)
        x = F.relu(self.norm(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class FlattenHead(nn.Module):
    """A VGG-like head: the last conv's map is flattened, so each channel is a block of 4x4 inputs."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(6 * 4 * 4, 12), nn.ReLU(), nn.Dropout(), nn.Linear(12, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


class Norms(nn.Module):
    """Depthwise convolution, GroupNorm with one group and with one channel per group, LayerNorm on [B, C]."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(1, 8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gn8 = nn.GroupNorm(8, 8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu6(self.gn1(self.conv(x)))
        x = F.relu6(self.gn8(self.dw(x)))
        x = x + self.pw(x)
        return self.fc(self.ln(x.mean((2, 3))))


class Tokens(nn.Module):
    """Patches made tokens by permutes (both spellings), position embeddings, an MLP on tokens and a
    mean over them: the channels move to the last axis and back."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 16, 8))
        self.norm = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 12), nn.Linear(12, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        t = torch.permute(self.embed(x).flatten(2), dims=(0, 2, 1)) + self.pos
        t = t + self.fc2(F.gelu(self.fc1(self.norm(t))))
        return self.head(t.permute(0, 2, 1).mean(2))


TRUSTED = ["tiny_models"]


def _register(name: str, cls) -> str:
    """Expose ``cls`` as builder ``tiny_models.<name>:build`` (a module the test creates and trusts)."""
    module = types.ModuleType(f"tiny_models.{name}")
    module.build = lambda num_classes=5, **kw: cls(num_classes=num_classes, **kw)
    sys.modules[module.__name__] = module
    return f"{module.__name__}:build"


def _spec(cls, name: str = "tiny"):
    builder = _register(name, cls)
    return parse_spec(dump_spec(spec_document(name, builder, {}, TINY)), origin=name, trust_builders=TRUSTED)


@pytest.mark.parametrize("cls", [DenseNetLike, FlattenHead, Norms, Tokens])
def test_traced_tiny_models_pass_the_check(cls):
    result = check_spec(_spec(cls, cls.__name__.lower()))
    assert result.passed, result.problems
    assert result.self_check < 1e-5


def test_concatenation_members_carry_offsets():
    spec = _spec(DenseNetLike, "dense")
    stem = next(s for s in spec.spaces if s.writers[0].module == "stem")
    assert [str(m) for m in stem.writers] == ["stem", "norm0", "grow1.0", "grow2.0@0", "transition.0@0"]
    assert [str(m) for m in stem.readers] == ["grow1.2", "grow2.2@0", "transition.2@0"]
    grow2 = next(s for s in spec.spaces if s.writers[0].module == "grow2.2")
    assert [str(m) for m in grow2.readers] == ["transition.2@12"]
    head = next(s for s in spec.spaces if s.writers[0].module == "grow3.2")
    assert [str(m) for m in head.writers] == ["grow3.2", "norm@6"] and [str(m) for m in head.readers] == ["fc@6"]
    assert spec.stops == ("transition.0", "norm")      # after the transition's norm: its conv reads through U


def test_flatten_makes_blocks_and_the_observe_point_sees_the_map():
    spec = _spec(FlattenHead, "flat")
    last = next(s for s in spec.spaces if s.writers[0].module == "features.4")
    assert [str(m) for m in last.readers] == ["classifier.0@0*16"]
    assert str(last.observe) == "features.7"      # the max-pool's input: 8x8 positions, not 4x4
    assert spec.classifiers == ("classifier.3",) and spec.stops == ("features.1", "features", "classifier.0")


def test_a_depthwise_convolution_writes_the_space_it_reads():
    spec = _spec(Norms, "norms")
    (space,) = [s for s in spec.spaces if s.writers[0].module == "conv"]
    assert [str(m) for m in space.writers] == ["conv", "gn1", "dw", "gn8", "pw", "ln"]
    assert [str(m) for m in space.readers] == ["pw", "fc"]


@pytest.mark.parametrize("cls, stop", [(DenseNetLike, "norm"), (FlattenHead, "features"), (FlattenHead, "classifier.0"),
                                       (Norms, "ln")])
def test_merge_with_permuted_copy_is_exact_through_slices_and_blocks(cls, stop, tmp_path, calib32):
    spec = _spec(cls, f"exact_{cls.__name__.lower()}")
    assert stop in spec.stops
    model = random_model(spec, 5, seed=1, calib=calib32)
    graph = ModelGraph(spec, model)
    a = save_checkpoint(tmp_path / "a.pt", model.state_dict())
    b = save_checkpoint(tmp_path / "b.pt", permute_state_dict(graph, model.state_dict(), random_permutations(graph, 3)))
    x = torch.randn(4, 3, 16, 16)
    for method in ("permute", "zipit"):
        result = merge([a, b], spec, calib32, MergeOptions(method=method, stop=stop, reset_bn=False, batch_size=8))
        with torch.no_grad():
            expected, heads = model(x), result.model(x)
        for out in heads:
            assert float((out - expected).abs().max() / expected.abs().max()) < 1e-4, (method, stop)


def test_wrong_offsets_are_caught():
    spec = _spec(DenseNetLike, "dense_wrong")
    # the transition reads the dense layers' 4 + 4 channels at 8 and 12: overlapping slices are refused...
    with pytest.raises(SpecError, match="input channels 12..12 of 'transition.2' are in two spaces"):
        ModelGraph(parse_spec(spec.text.replace("transition.2@8]", "transition.2@9]"), trust_builders=TRUSTED),
                   build_model(spec, 5))
    # ...and swapped ones fail the self-check
    swapped = parse_spec(spec.text.replace("transition.2@8]", "@@]").replace("transition.2@12]", "transition.2@8]")
                         .replace("@@]", "transition.2@12]"), trust_builders=TRUSTED)
    model = build_model(swapped, 5)
    randomize_per_channel(model)
    assert self_check(ModelGraph(swapped, model), torch.randn(2, 3, 16, 16)) > 1e-3


# --- refusals: each names the operation and the layer ---------------------------------------------------------


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.grouped(self.conv(x)).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.squeeze = nn.Conv2d(8, 2, 1)
        self.excite = nn.Conv2d(2, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = self.conv(x)
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))))
        return self.fc((x * gate).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        tokens = self.proj(x.flatten(2).transpose(1, 2))
        return self.fc(self.attn(tokens, tokens, tokens)[0].mean(1))


class ChannelSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.conv(x)[:, :4].mean((2, 3)))


class UnknownLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.act = nn.PReLU(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


class SharedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.twice = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.twice(self.twice(self.conv(x))).mean((2, 3)))


class GroupedNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.gn(self.conv(x)).mean((2, 3)))


class SpatialConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(torch.cat([y, y], 2).mean((2, 3)))


class ChannelMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(64, 2)

    def forward(self, x):
        return self.fc(self.conv(x).mean(1).flatten(1))


@pytest.mark.parametrize("cls, words", [
    (Grouped, ["grouped convolution (groups=2)", "'grouped'"]),
    (SqueezeExcite, ["multiplicative gate", "mul"]),
    (Attention, ["attention (MultiheadAttention)", "'attn'"]),
    (ChannelSlice, ["indexing into a tensor", "getitem"]),
    (UnknownLayer, ["module type PReLU", "'act'"]),
    (SharedWeights, ["used more than once", "'twice'"]),
    (GroupedNorm, ["GroupNorm with 2 groups", "'gn'"]),
    (SpatialConcat, ["concatenation along axis 2", "cat"]),
    (ChannelMean, ["over the batch or channel axis", "mean"]),
])
def test_unsupported_operations_are_refused_by_name(cls, words):
    with pytest.raises(SpecError) as info:
        trace_spaces(cls(), torch.zeros(1, 3, 8, 8))
    for word in words:
        assert word in info.value.message, info.value.message


def test_a_user_module_builder_is_imported_from_its_folder(tmp_path, monkeypatch):
    (tmp_path / "my_models_for_test.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def small_cnn(num_classes=10, width=8):
            return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = spec_document("small", "my_models_for_test:small_cnn", {"width": 4, "num_classes": 3}, TINY)
    assert doc["kwargs"] == {"width": 4}           # the number of classes is set per checkpoint at merge time
    assert doc["classifiers"] == ["5"] and doc["stops"] == ["1"]


class Dense(nn.Module):
    """A linear layer of a type zipit's table does not know: not an ``nn.Linear``, not in torch.nn."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / cin ** 0.5)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class DenseHead(nn.Module):
    def __init__(self, num_classes: int = 5, layer=Dense):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.hidden = layer(8, 6)
        self.fc = layer(6, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.fc(F.relu(self.hidden(x)))


def test_a_new_layer_type_is_one_table_entry(monkeypatch, tmp_path):
    """One entry in ``layers.KINDS`` is all a new weighted layer type needs: it is traced as a layer,
    self-checked, calibrated, zipped, refit and counted in MACs."""
    from zipcli.macs import count_macs
    from zipcli.specs import layers
    monkeypatch.setitem(layers.KINDS, Dense, layers.LayerKind(
        out_channels=lambda m: m.weight.shape[0], in_channels=lambda m: m.weight.shape[1],
        per_channel=lambda m: False, random_ranges={"bias": (-0.5, 0.5)},
        macs=lambda m, out: out.numel() * m.weight.shape[1], rows=layers.LINEAR_ROWS))
    spec = _spec(DenseHead, "dense_head")
    result = check_spec(spec)
    assert result.passed and result.self_check < 1e-5, result.problems
    hidden = next(s for s in spec.spaces if s.writers[0].module == "hidden")
    assert [str(m) for m in hidden.readers] == ["fc"] and spec.classifiers == ("fc",)
    calib = make_images(tmp_path / "calib", 64, 16)
    model = random_model(spec, 5, seed=1, calib=calib)
    assert count_macs(model, (3, 16, 16)) == 16 * 16 * 8 * 27 + 6 * 8 + 5 * 6
    graph = ModelGraph(spec, model)
    a = save_checkpoint(tmp_path / "a.pt", model.state_dict())
    b = save_checkpoint(tmp_path / "b.pt", permute_state_dict(graph, model.state_dict(), random_permutations(graph, 3)))
    x = torch.randn(4, 3, 16, 16)
    for method in ("permute", "zipit"):
        merged = merge([a, b], spec, calib, MergeOptions(method=method, stop=spec.stops[-1], refit="lsq", reset_bn=False,
                                                          batch_size=8))
        solved = {f["layer"] for f in merged.metadata["params"]["refit"]["per_layer"] if f["ridge"] is not None}
        facts = {f["layer"]: f for f in merged.metadata["params"]["refit"]["per_layer"]}
        assert facts["hidden"]["residual"] is not None, facts          # its statistics were summed and solved
        with torch.no_grad():
            expected, heads = model(x), merged.model(x)
        for out in heads:
            assert float((out - expected).abs().max() / expected.abs().max()) < 1e-4, (method, solved)
    # ...and it merges as the nn.Linear it mimics: two different models, default options
    twin = _spec(lambda num_classes=5: DenseHead(num_classes, nn.Linear), "linear_head")
    other = save_checkpoint(tmp_path / "c.pt", random_model(spec, 5, seed=2, calib=calib).state_dict())
    ours, linear = (merge([a, other], s, calib, MergeOptions(stop=s.stops[-1], batch_size=8)) for s in (spec, twin))
    assert ours.metadata["params"]["refit"]["layers"] == linear.metadata["params"]["refit"]["layers"] > 0
    with torch.no_grad():
        for got, want in zip(ours.model(x), linear.model(x)):
            torch.testing.assert_close(got, want)
