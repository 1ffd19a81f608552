"""The size dial (issue 29): merged spaces between one model's width and the sum of the sources'.

Exact properties: permuted copies come back at any widths, the widest merge is the sources side by
side, a full zip is unchanged, and sized files load back as they were written.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from zipcli import MergeOptions, ZipitError
from zipcli.errors import MergedFileError
from zipcli.measured import Calibration
from zipcli.methods.permute import match_permute
from zipcli.methods.zipit import match_zipit
from zipcli.merged import load_merged, read_metadata
from zipcli.options import MergePoint
from zipcli.pipeline import merge_at
from zipcli import sizing
from zipcli.specs import layers
from zipcli.specs.builders import build_model
from zipcli.specs.graph import ModelGraph
from zipcli.tuning import Setting
from zipcli.zip import check_width

from conftest import random_model, resnet20_pair, save_checkpoint, small_spec
from test_exactness import _images, _permuted_copies, _rel

PAPER = Setting(0.3, 0.125)


def _calibration(paths, spec, calib) -> Calibration:
    cal = Calibration(paths, spec, calib, MergeOptions(reset_bn=False, batch_size=8, refit="none"), hold_out=False)
    cal.measure(spec.stops[-1])
    return cal


@pytest.fixture(scope="module")
def pair(tmp_path_factory, calib32) -> Calibration:
    """Two different ResNet-20s (2 and 3 classes), measured at every stop."""
    root = tmp_path_factory.mktemp("pair")
    return _calibration(list(resnet20_pair(root, calib32)), small_spec("resnet20"), calib32)


def _random_widths(cal: Calibration, stop: str, rng) -> tuple[tuple[str, int], ...]:
    """A width in [O, n*O] per merged space, at least one of them above O."""
    n, sizes = len(cal.sources), cal.graph.space_size
    spaces = cal.plan(stop).merged_spaces
    widths = {s: int(rng.integers(sizes[s], n * sizes[s] + 1)) for s in spaces}
    if all(widths[s] == sizes[s] for s in spaces):
        widths[spaces[0]] = n * sizes[spaces[0]]
    return tuple(widths.items())


def _trunk_width(model, graph: ModelGraph, space: str) -> int:
    """The width a built merged model gives ``space``: the output channels of its first writer."""
    writer = graph.spec.spaces[[s.name for s in graph.spec.spaces].index(space)].writers[0].module
    return layers.out_channels(model.trunk.get_submodule(writer))


STOPS = {"cifar_vgg11": ("features.0", "features.8", "features")}     # the first, one within, the last
# three copies of the VGG run under -m heavy (CI): resnet20 covers three models by default
EXACT_CASES = [pytest.param(method, name, n, marks=[pytest.mark.heavy] if (name, n) == ("cifar_vgg11", 3) else [])
               for method in ("permute", "zipit") for name in ("resnet20", "cifar_vgg11") for n in (2, 3)]


@pytest.mark.parametrize("method, name, n_models", EXACT_CASES)
def test_permuted_copies_merged_at_random_widths_come_back_exactly(method, name, n_models, tmp_path, calib32):
    spec = small_spec(name)
    model, paths = _permuted_copies(spec, tmp_path, calib32, n_models)
    cal = _calibration(paths, spec, calib32)
    x = _images(spec, calib32)
    with torch.no_grad():
        expected = model(x)
    rng = np.random.default_rng(n_models)
    # alpha 1: completing a triple of identical features scores 1, so no within-model pair can come first
    setting = Setting(1.0, 0.125)
    for stop in STOPS.get(name, spec.stops):
        widths = _random_widths(cal, stop, rng)
        result = merge_at(cal, MergePoint(stop, method, setting, widths=widths))
        for space, width in widths:
            assert _trunk_width(result.model, cal.graph, space) == width
        assert [s["width"] for s in result.metadata["spaces"]] == [w for _, w in widths]
        with torch.no_grad():
            heads = result.model(x)
        assert len(heads) == n_models
        for out in heads:
            assert _rel(out, expected) < 1e-4, (stop, widths)


@pytest.mark.parametrize("method, stop, refit", [("permute", "layer1", "none"), ("zipit", "layer3", "none"),
                                                  ("permute", "layer3", "lsq")])
def test_at_the_full_width_the_heads_are_the_sources(method, stop, refit, pair, calib32):
    """n*O everywhere keeps every feature apart: the sources side by side (the refit keeps them)."""
    cal = pair
    sources = [s.model.eval() for s in cal.sources]
    x = _images(cal.spec, calib32)
    widths = tuple((s, 2 * cal.graph.space_size[s]) for s in cal.plan(stop).merged_spaces)
    result = merge_at(cal, MergePoint(stop, method, PAPER, refit=refit, widths=widths))
    with torch.no_grad():
        heads = result.model(x)
        for head, source in zip(heads, sources):
            assert _rel(head, source(x)) < 1e-4


def test_a_sized_file_loads_back_as_written_and_a_default_file_is_unchanged(pair, tmp_path, calib32):
    cal = pair
    x = _images(cal.spec, calib32)
    plain = merge_at(cal, MergePoint("layer2", "permute", PAPER))
    assert plain.metadata["format"] == "zipit-merged/1" and all("width" not in s for s in plain.metadata["spaces"])
    spaces = cal.plan("layer2").merged_spaces
    at_one = merge_at(cal, MergePoint("layer2", "permute", PAPER,
                                      widths=tuple((s, cal.graph.space_size[s]) for s in spaces)))
    for key, value in plain.model.state_dict().items():      # widths of one model: the full zip's tensors
        assert torch.equal(at_one.model.state_dict()[key], value), key
    widths = ((spaces[0], 20), (spaces[-1], 45))
    sized = merge_at(cal, MergePoint("layer2", "permute", PAPER, widths=widths))
    sized.save(tmp_path / "sized.safetensors", card=False)
    loaded = load_merged(tmp_path / "sized.safetensors")
    assert read_metadata(tmp_path / "sized.safetensors")["format"] == "zipit-merged/2"
    assert loaded.widths == dict(widths)
    for key, value in sized.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with torch.no_grad():
        for a, b in zip(loaded(x), sized.model(x)):
            assert _rel(a, b) < 1e-5


def test_a_damaged_width_is_refused_on_load(pair, tmp_path):
    import json
    from safetensors.torch import load_file, save_file
    cal = pair
    space = cal.plan("layer1").merged_spaces[0]
    merge_at(cal, MergePoint("layer1", "permute", PAPER, widths=((space, 20),))).save(tmp_path / "m.safetensors",
                                                                                      card=False)
    meta = read_metadata(tmp_path / "m.safetensors")
    for bad in (33, 15, "20", 20.0):
        spaces = json.loads(meta["spaces"])
        spaces[0]["width"] = bad
        save_file(load_file(tmp_path / "m.safetensors"), tmp_path / "bad.safetensors",
                  {**meta, "spaces": json.dumps(spaces)})
        with pytest.raises(MergedFileError, match="merged width"):
            load_merged(tmp_path / "bad.safetensors")


def test_widths_outside_one_model_and_the_sum_and_unmerged_spaces_are_refused(pair):
    cal = pair
    space = cal.plan("layer1").merged_spaces[0]
    for width in (15, 33):
        with pytest.raises(ValueError, match=r"outside \[16, 32\]"):
            merge_at(cal, MergePoint("layer1", "permute", PAPER, widths=((space, width),)))
    with pytest.raises(ZipitError, match="not merged at stop"):
        merge_at(cal, MergePoint("layer1", "permute", PAPER, widths=(("layer3.stream", 70),)))
    with pytest.raises(ZipitError, match="cannot merge at a size"):
        merge_at(cal, MergePoint("layer1", "average", PAPER, widths=((space, 20),)))


def test_a_concatenated_space_cannot_change_width():
    spec = small_spec("densenet121", 32)
    graph = ModelGraph(spec, build_model(spec, 3))
    sliced = next(s for module, entries in graph.reads.items() for s, m in entries if not m.whole)
    o = graph.space_size[sliced]
    check_width(graph, sliced, o, 2)                        # one model's width: as today
    with pytest.raises(ZipitError, match="concatenation"):
        check_width(graph, sliced, o + 1, 2)


@pytest.mark.parametrize("module, out, inp, x", [
    (nn.Conv2d(4, 6, 3, padding=1), 9, 5, (2, 5, 8, 8)),
    (nn.Conv2d(4, 4, 3, groups=4), 7, None, (2, 7, 8, 8)),
    (nn.Linear(4, 6), 9, 5, (2, 5)),
    (nn.BatchNorm2d(4), 7, None, (2, 7, 3, 3)),
    (nn.BatchNorm1d(4), 7, None, (2, 7)),
    (nn.LayerNorm(4), 7, None, (2, 3, 7)),
    (nn.GroupNorm(1, 4), 7, None, (2, 7, 3, 3)),
    (nn.GroupNorm(4, 4), 7, None, (2, 7, 3, 3)),
])
def test_every_layer_type_resizes_and_runs_at_its_new_width(module, out, inp, x):
    before = {k: v.shape for k, v in module.state_dict().items()}
    new = layers.resize(module, out, inp)
    assert type(new) is type(module) and new is not module
    assert layers.out_channels(new) == out
    if inp is not None:
        assert layers.in_channels(new) == inp
    assert new(torch.randn(x)).shape[1 if len(x) != 3 else 2] == out
    assert {k: v.shape for k, v in module.state_dict().items()} == before    # the original is left as it was


def test_a_forward_that_fixes_a_channel_count_is_refused(monkeypatch):
    spec = small_spec("resnet20")
    from zipcli import merged
    from zipcli.merged import HeadInfo, skeleton

    original = merged.split

    def split(gm, nodes):          # a head that reads its input as 64 channels of 8 x 8, whatever the width
        trunk, head = original(gm, nodes)
        head.forward = lambda *xs: xs[0].view(xs[0].shape[0], 64 * 8 * 8)
        return trunk, head
    monkeypatch.setattr(merged, "split", split)
    heads = [HeadInfo("a", ["0", "1"], "a"), HeadInfo("b", ["0", "1"], "b")]
    skeleton(spec, "layer3", heads, {"layer2.stream": 40})   # a width the head does not see: runs
    with pytest.raises(ZipitError, match="fixes a channel count"):
        skeleton(spec, "layer3", heads, {"layer3.stream": 80})


@pytest.mark.parametrize("n_models", [2, 3])
def test_permute_and_zipit_keep_apart_exactly_the_width_asked(n_models):
    o = 6
    corr = np.corrcoef(np.random.default_rng(n_models).normal(size=(n_models * o, 40)))
    for width in range(o, n_models * o + 1):
        for m in (match_permute(corr, n_models, width=width), match_zipit(corr, n_models, 0.5, 0.25, width=width)):
            assert m.size == width and sorted(np.unique(m.assign)) == list(range(width))
            assert m.total_merges == n_models * o - width
    with pytest.raises(ValueError, match="outside"):
        match_permute(corr, n_models, width=n_models * o + 1)
    assert np.array_equal(match_permute(corr, n_models).assign, match_permute(corr, n_models, width=o).assign)
    assert np.array_equal(match_zipit(corr, n_models).assign, match_zipit(corr, n_models, width=o).assign)


def test_permute_keeps_the_weakest_matched_pairs_apart():
    """Two models: the pairs split first are the least correlated of the matching."""
    o = 5
    corr = np.eye(2 * o)
    strength = np.array([0.9, 0.2, 0.8, 0.1, 0.7])
    corr[np.arange(o), o + np.arange(o)] = corr[o + np.arange(o), np.arange(o)] = strength
    m = match_permute(corr, 2, width=o + 2)
    assert sorted(np.flatnonzero(m.assign[1] >= o)) == [1, 3]       # the 0.2 and 0.1 pairs


# --- step 2: --size, the widths spread over the spaces without labels

@pytest.mark.parametrize("stop, spread", [("layer2", "greedy"), ("layer3", "greedy"), ("layer3", "weakest"),
                                          ("layer3", "uniform")])
def test_the_cost_model_counts_the_built_model_and_sizes_are_nested(pair, stop, spread):
    from zipcli.merged import skeleton
    previous, one = None, sizing.one_model(pair)
    for size in (1.0, 1.1, 1.25, 1.5, 2.0):
        a = sizing.allocate(pair, stop, size, spread)
        built = skeleton(pair.spec, stop, pair.heads(stop), dict(a.widths))
        assert a.params == sum(p.numel() for p in built.parameters())
        assert a.params <= max(size * one, a.floor)
        widths = dict(a.widths)
        if previous is not None:                     # a larger size never narrows a space
            assert all(widths.get(s, 0) >= w for s, w in previous.items())
        previous = widths
    assert sizing.allocate(pair, stop, 2.0, spread).reached > 1.9     # most of the way to the sources side by side


def test_below_the_full_zip_the_size_is_the_full_zip_and_says_so(pair):
    warnings = []
    pair.report.warn = warnings.append
    a = sizing.allocate(pair, "layer1", 1.25)           # layer1 shares little: the full zip is ~1.95x
    assert a.widths == () and a.params == a.floor and any("below the full zip" in w for w in warnings)


def test_permuted_copies_have_nothing_to_gain_from_width(tmp_path, calib32):
    spec = small_spec("resnet20")
    _, paths = _permuted_copies(spec, tmp_path, calib32, 2)
    cal = _calibration(paths, spec, calib32)
    assert sizing.allocate(cal, "layer3", 1.5).widths == ()


def test_the_weakest_space_gets_the_width_first(pair):
    """With equal costs, the space whose matched features correlate least is widened first."""
    stop = "layer3"
    g = {s: sizing.gains(pair, s)[0] for s in sizing.resizable(pair, stop)}
    a = sizing.allocate(pair, stop, sizing.allocate(pair, stop, 1.0).floor / sizing.one_model(pair) + 0.002)
    first = dict(a.widths)
    assert len(first) >= 1
    o = pair.graph.space_size
    width = lambda s: o[s] if s else 1                                          # noqa: E731
    price = {s: sum(t.coef * width(t.into if t.out == s else t.out) for t in sizing.terms(pair, stop)
                    if s in (t.out, t.into)) for s in g}                        # one more channel, all at O
    best = max(g, key=lambda s: g[s] / price[s])
    assert best in first


def test_weakest_keeps_apart_the_least_correlated_matches_of_every_space(pair):
    """One correlation threshold for every space: no match kept apart correlates more than one still merged."""
    a = sizing.allocate(pair, "layer3", 1.3, "weakest")
    o, widths = pair.graph.space_size, dict(a.widths)
    taken = {s: widths.get(s, o[s]) - o[s] for s in sizing.resizable(pair, "layer3")}
    kept = [g for s, k in taken.items() for g in sizing.gains(pair, s)[:k]]
    merged = [sizing.gains(pair, s)[k] for s, k in taken.items() if k < len(sizing.gains(pair, s))]
    assert len(kept) > 0 and min(kept) >= max(merged)


def test_uniform_keeps_apart_the_same_share_of_every_space(pair):
    a = sizing.allocate(pair, "layer3", 1.3, "uniform")
    o, widths = pair.graph.space_size, dict(a.widths)
    room = {s: int(np.count_nonzero(sizing.gains(pair, s) > sizing.MIN_GAIN)) for s in sizing.resizable(pair, "layer3")}
    shares = [(widths.get(s, o[s]) - o[s]) / room[s] for s in room if room[s]]
    assert max(shares) > 0 and max(shares) - min(shares) < max(1 / room[s] for s in room if room[s])
    assert a.params <= 1.3 * a.one


def test_an_unknown_spread_is_refused():
    with pytest.raises(ZipitError, match="unknown spread 'even'"):
        sizing.allocate(None, "layer3", 1.25, "even")


@pytest.mark.parametrize("size, method, match", [(0.5, "permute", r"outside \[1, 2\]"), (2.5, "zipit", r"\[1, 2\]"),
                                                 (float("nan"), "auto", r"\[1, 2\]"),
                                                 (1.25, "average", "cannot merge at a size")])
def test_bad_sizes_are_refused_naming_the_option_and_the_range(size, method, match):
    with pytest.raises(ZipitError, match=match) as err:
        MergeOptions(method=method, size=size).validate(2)
    assert "--size" in str(err.value)


def test_merge_at_a_size_records_it_and_loads_back(tmp_path, calib32):
    from zipcli import merge
    paths = resnet20_pair(tmp_path, calib32)
    spec = small_spec("resnet20")
    result = merge(list(paths), spec, calib32, MergeOptions(method="permute", size=1.25, stop="layer3",
                                                            refit="none", batch_size=8))
    record = result.metadata["params"]["size"]
    assert record["asked"] == 1.25 and record["unit"] == "parameters" and record["floor"] < 1.01
    one = sum(p.numel() for p in build_model(spec, 2).parameters()) / 2 + \
        sum(p.numel() for p in build_model(spec, 3).parameters()) / 2
    assert record["reached"] == round(sum(p.numel() for p in result.model.parameters()) / one, 4)
    assert 1.2 < record["reached"] <= 1.25
    widths = {s["space"]: s["width"] for s in result.metadata["spaces"]}
    assert sum(widths.values()) > sum(s["size"] for s in result.metadata["spaces"])
    result.save(tmp_path / "sized.safetensors")
    loaded = load_merged(tmp_path / "sized.safetensors")
    assert {s: w for s, w in widths.items() if w != _one_width(result, s)} == loaded.widths
    card = (tmp_path / "sized.md").read_text()
    assert "- Size: asked 1.25x one source model's parameters" in card and "## Merged widths" in card


def _one_width(result, space):
    return next(s["size"] for s in result.metadata["spaces"] if s["space"] == space)


def test_cli_merge_at_a_size_shows_it_in_inspect_and_the_card(tmp_path, calib32):
    from typer.testing import CliRunner
    from zipcli.cli import app
    a, b = resnet20_pair(tmp_path, calib32)
    out = tmp_path / "m.safetensors"
    runner = CliRunner()
    r = runner.invoke(app, ["merge", str(a), str(b), "--arch", "resnet20", "--calib", str(calib32), "-o", str(out),
                            "--method", "permute", "--refit", "none", "--size", "1.25", "--json"])
    assert r.exit_code == 0, r.output
    assert "size: asked 1.25x one source model's parameters" in r.stderr
    assert json.loads(r.stdout)["params"]["size"]["asked"] == 1.25
    shown = runner.invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "asked 1.25x" in shown.output and "merged width" in shown.output
    assert "--size 1.25" in (tmp_path / "m.md").read_text()                     # the card's command reproduces it
    plain = runner.invoke(app, ["inspect", str(out).replace("m.safetensors", "m.md")])
    assert plain.exit_code != 0 or "merged width" not in plain.output


@pytest.mark.parametrize("value, says", [("0.5", "outside [1, 2]"), ("3", "outside [1, 2]"), ("abc", "not a number"),
                                         ("nan", "outside [1, 2]")])
def test_cli_bad_sizes_end_in_one_line_naming_size_and_the_range(value, says, tmp_path, calib32):
    from typer.testing import CliRunner
    from zipcli.cli import app
    from conftest import handled
    a, b = resnet20_pair(tmp_path, calib32)
    r = CliRunner().invoke(app, ["merge", str(a), str(b), "--arch", "resnet20", "--calib", str(calib32),
                                 "-o", str(tmp_path / "m.safetensors"), "--size", value])
    assert r.exit_code == 2 and handled(r), r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--size" in errors[0] and says in errors[0] and "[1, 2]" in errors[0], r.stderr
    assert len(r.stderr.strip().splitlines()) == 2                              # the error and its hint
    assert not (tmp_path / "m.safetensors").exists()


def test_help_says_what_a_size_counts():
    from typer.testing import CliRunner
    from zipcli.cli import app
    text = " ".join(CliRunner().invoke(app, ["merge", "--help"], terminal_width=200).output.split())
    assert "multiple of one source model" in text and "parameters, not MACs" in text


def test_tuning_at_a_size_scores_every_candidate_at_the_same_widths(tmp_path, calib32, monkeypatch):
    from zipcli import merge
    from zipcli import choosing
    seen = []
    original = choosing.candidate

    def candidate(cal, stop, matches, bn_images):
        seen.append(tuple(sorted((s, m.size) for s, m in matches.items())))
        return original(cal, stop, matches, bn_images)
    monkeypatch.setattr(choosing, "candidate", candidate)
    paths = resnet20_pair(tmp_path, calib32)
    options = MergeOptions(method="auto", size=1.25, stop="layer3", refit="none", num_calib=8, batch_size=8)
    result = merge(list(paths), small_spec("resnet20"), calib32, options)
    assert result.metadata["params"]["tuning"]["candidates"] and len(seen) > 2
    widths = tuple(sorted((s["space"], s["width"]) for s in result.metadata["spaces"]))
    assert set(seen) == {widths} and any(s["width"] > s["size"] for s in result.metadata["spaces"])


def test_tuning_at_a_size_plans_with_the_sized_models_cost(tmp_path, calib32, monkeypatch):
    # Each tuning candidate of a sized merge runs the wider model: its plan must count that cost,
    # or a sized merge tunes for longer than the budget the default keeps to.
    import zipcli.measured
    from zipcli.choosing import decide

    seen = []
    real = zipcli.measured.plan_tuning
    monkeypatch.setattr(zipcli.measured, "plan_tuning",
                        lambda budget, source, merged, *a, **k: seen.append(merged) or real(budget, source, merged, *a, **k))
    options = MergeOptions(stop="layer3", size=1.5, refit="none", batch_size=8)
    cal = Calibration(list(resnet20_pair(tmp_path, calib32)), small_spec("resnet20"), calib32, options)
    cal.measure("layer3")
    seen.clear()
    decision = decide(cal, options)
    sized = cal.merged_macs("layer3", dict(decision.point.widths))
    assert decision.point.widths and sized > cal.merged_macs("layer3")
    assert seen and all(m == sized for m in seen)
