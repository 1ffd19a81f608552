"""The method seam: a method is one record in the registry; dense merges zip like groupings."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from zipcli import MergeOptions, ZipitError, merge, methods
from zipcli.methods import Match, Method
from zipcli.methods.permute import match_permute
from zipcli.specs.graph import ModelGraph
from zipcli.zip import Zipper

from conftest import random_model, small_spec
from test_exactness import _images, _permuted_copies, _rel


def _dense_permute(corr: np.ndarray, n_models: int) -> Match:
    """permute's matching handed over as dense matrices, as a method outside the grouping would."""
    grouping = match_permute(corr, n_models)
    return Match.dense(grouping.merge_matrix(), grouping.unmerge_matrix())


DENSE = Method("dense-permute", "permute as dense matrices (test)", _dense_permute)


def test_a_dense_match_zips_exactly_like_the_same_grouping():
    spec = small_spec("resnet20")
    models = [random_model(spec, 5, seed=s) for s in (1, 2)]
    graph = ModelGraph(spec, models[0])
    plan = graph.plan("layer2")
    rng = np.random.default_rng(0)
    grouped, dense = {}, {}
    for space in plan.merged_spaces:
        o = graph.space_size[space]
        g = Match(np.stack([np.arange(o), rng.permutation(o)]))
        grouped[space], dense[space] = g, Match.dense(g.merge_matrix(), g.unmerge_matrix())
    states = [m.state_dict() for m in models]
    keys = [k for k in states[0] if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")]
    a = Zipper(graph, plan, grouped).trunk(keys, states)
    b = Zipper(graph, plan, dense).trunk(keys, states)
    for key in keys:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)


def test_a_dense_match_wider_than_one_model_zips_like_the_same_grouping():
    """At a width W between O and n*O (features kept apart), dense M (W, n*O) and U (n*O, W)
    with n given zip to the grouping's tensors."""
    spec = small_spec("resnet20")
    models = [random_model(spec, 5, seed=s) for s in (1, 2, 3)]
    graph = ModelGraph(spec, models[0])
    plan = graph.plan("layer2")
    rng = np.random.default_rng(1)
    grouped, dense = {}, {}
    for space in plan.merged_spaces:
        o = graph.space_size[space]
        corr = np.corrcoef(rng.normal(size=(3 * o, 50)))
        g = match_permute(corr, 3, width=o + int(rng.integers(1, 2 * o + 1)))
        assert o < g.size <= 3 * o and g.merge_matrix().shape == (g.size, 3 * o)
        grouped[space] = g
        dense[space] = Match.dense(g.merge_matrix(), g.unmerge_matrix(), n_models=3)
        assert dense[space].n_models == 3 and dense[space].source_width == o
    states = [m.state_dict() for m in models]
    keys = [k for k in states[0] if k.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")]
    a = Zipper(graph, plan, grouped).trunk(keys, states)
    b = Zipper(graph, plan, dense).trunk(keys, states)
    assert a["layer2.0.conv2.weight"].shape[0] == grouped["layer2.stream"].size
    for key in keys:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)


def test_a_method_added_as_one_record_merges_permuted_copies_exactly(monkeypatch, tmp_path, calib32):
    monkeypatch.setitem(methods.REGISTRY, DENSE.name, DENSE)
    spec = small_spec("resnet20")
    model, paths = _permuted_copies(spec, tmp_path, calib32, 2)
    x = _images(spec, calib32)
    result = merge(paths, spec, calib32, MergeOptions(method="dense-permute", stop="layer2", reset_bn=False))
    with torch.no_grad():
        expected, heads = model(x), result.model(x)
    assert result.metadata["method"] == "dense-permute"
    assert all(_rel(h, expected) < 1e-4 for h in heads)


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(ZipitError) as err:
        MergeOptions(method="cca").validate(2)
    assert "zipit" in str(err.value.hint) and "permute" in str(err.value.hint)


def test_dense_match_refuses_matrices_that_do_not_fit():
    with pytest.raises(ValueError):
        Match.dense(np.ones((3, 5)), np.ones((5, 3)))
    with pytest.raises(ValueError):           # W = 2 is below one model's width (3) of two
        Match.dense(np.ones((2, 6)), np.ones((6, 2)), n_models=2)
    assert Match.dense(np.ones((5, 6)), np.ones((6, 5)), n_models=2).source_width == 3
    with pytest.raises(ValueError):
        Match()


HALVES = (
    "import numpy as np\n"
    "from zipcli.methods.base import Match, Method, Param, check_shape\n"
    "def match_halves(corr, n_models, weight=0.5):\n"
    "    o = check_shape(corr, n_models)\n"
    "    return Match.dense(np.hstack([np.eye(o) * weight, np.eye(o) * (1 - weight)]), np.vstack([np.eye(o)] * 2))\n"
    "METHOD = Method('halves', 'feature k of both models, weighted (test)', match_halves, needs_correlation=False,\n"
    "                params=(Param('weight', 0.5, 0.0, 1.0, help=\"the first model's share\"),))\n")


def _halves(tmp_path, monkeypatch) -> dict:
    """The registry with one more method, added as one new file in the methods package."""
    (tmp_path / "halves.py").write_text(HALVES)
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    found = methods._discover()
    monkeypatch.setitem(methods.REGISTRY, "halves", found["halves"])
    return found


def test_a_new_file_in_the_methods_package_is_a_new_method(tmp_path, monkeypatch):
    """What specs/README.md and the README promise: adding a method is adding one file."""
    found = _halves(tmp_path, monkeypatch)
    assert list(found)[:3] == ["zipit", "permute", "average"] and "halves" in found
    match = found["halves"].match(np.eye(8), 2)
    np.testing.assert_allclose(match.merge_matrix() @ match.unmerge_matrix(), np.eye(4))


def test_a_methods_own_parameter_reaches_it_from_python_and_the_cli_and_shows_in_inspect_and_the_card(
        tmp_path, monkeypatch, calib32):
    """Issue 26: a method with a parameter of its own is still one new file."""
    from typer.testing import CliRunner
    from zipcli.cli import app
    from zipcli.merged import read_metadata
    from conftest import resnet20_pair
    (tmp_path / "pkg").mkdir()
    _halves(tmp_path / "pkg", monkeypatch)
    a, b = resnet20_pair(tmp_path, calib32)
    spec = small_spec("resnet20")
    light, heavy = (merge([a, b], spec, calib32, MergeOptions(method="halves", stop="layer1", params={"weight": w},
                                                              refit="none")) for w in (0.2, 0.8))
    assert light.metadata["params"] == {"weight": 0.2} and heavy.metadata["params"] == {"weight": 0.8}
    key = "trunk.conv1.weight"
    assert not torch.allclose(light.model.state_dict()[key], heavy.model.state_dict()[key])
    default = merge([a, b], spec, calib32, MergeOptions(method="halves", stop="layer1", refit="none"))
    assert default.metadata["params"] == {"weight": 0.5}                     # the declared default

    runner = CliRunner()
    out = tmp_path / "m.safetensors"
    base = ["merge", str(a), str(b), "--arch", "resnet20", "--calib", str(calib32), "--stop", "layer1",
            "--method", "halves", "--refit", "none"]
    r = runner.invoke(app, [*base, "--param", "weight=0.2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(read_metadata(out)["params"]) == {"weight": 0.2}
    torch.testing.assert_close(load_file(out)[key], light.model.state_dict()[key].float())
    shown = runner.invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "halves (weight 0.2)" in shown.output, shown.output
    card = (tmp_path / "m.md").read_text()
    assert "`halves`, weight 0.2" in card and "--param weight=0.2" in card
    for bad, message in (("weight=2", "weight 2 is out of range"), ("gamma=1", "has no parameter 'gamma'"),
                         ("weight=lots", "is not NAME=NUMBER")):
        r = runner.invoke(app, [*base, "--param", bad, "-o", str(tmp_path / "bad.safetensors")])
        assert r.exit_code == 2 and message in r.output, (bad, r.output)
