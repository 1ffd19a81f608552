"""zipit sweep: each point is the merge and evaluation a user would get by hand; eval records its figures
in the model card."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from zipcli import MergeOptions, ZipitError
from zipcli.cli import app

from conftest import handled, make_images, resnet20_pair

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAIR = [str(EXAMPLES / "zoo" / "r20x1_c10a_s1.pt"), str(EXAMPLES / "zoo" / "r20x1_c10b_s2.pt")]
CALIB = ["--arch", "resnet20", "--calib", str(EXAMPLES / "calib"), "--num-calib", "64", "--quiet"]
TEST = ["--data", str(EXAMPLES / "test"), "--limit", "8"]


def _json(args) -> dict:
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.mark.parametrize("setting", [["--alpha", "0.3", "--beta", "0.125"], []], ids=["fixed", "default"])
def test_sweep_equals_separate_merge_and_eval_at_every_stop(setting, tmp_path):
    stops = ["layer1", "layer2", "layer3"] if setting else ["layer1", "layer3"]   # tuning: two stops suffice
    swept = _json(["sweep", *PAIR, *CALIB, *TEST, *setting, "--json", *[x for s in stops for x in ("--stop", s)]])
    assert [(p["stop"], p["method"]) for p in swept["points"]] == [(s, m) for s in stops for m in ("zipit", "permute")]
    assert all("size" not in p and "frontier" not in p for p in swept["points"])    # no size axis: as before
    for point in swept["points"]:
        out = tmp_path / f"{point['stop']}_{point['method']}.safetensors"
        merged = _json(["merge", *PAIR, *CALIB, *setting, "--stop", point["stop"], "--method", point["method"],
                        "-o", str(out), "--json", "--no-card"])
        assert {k: v for k, v in merged["params"].items() if k != "tuning"} == \
            {k: v for k, v in point["params"].items() if k != "tuning"}
        evaluated = _json(["eval", str(out), *TEST, "--json"])["results"][0]
        assert [h["images"] for h in evaluated["heads"]] == [h["images"] for h in point["accuracy"]["heads"]]
        for got, want in zip(point["accuracy"]["heads"], evaluated["heads"]):
            assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9), point
        assert point["accuracy"]["joint"] == pytest.approx(evaluated["joint"], abs=1e-9)
    ensemble = _json(["eval", *PAIR, "--arch", "resnet20", *TEST, "--json"])["results"][-1]
    assert swept["reference"]["avg_task"] == pytest.approx(ensemble["avg_task"])
    shares = [(p["parameters"] / swept["source_parameters"], p["macs"] / swept["source_macs"])
              for p in swept["points"] if p["method"] == "permute"]
    assert all(0 < b[0] < a[0] <= 1 and 0 < b[1] < a[1] <= 1 for a, b in zip(shares, shares[1:]))  # deeper: cheaper


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    calib = make_images(root / "calib", 60, 32, seed=2)
    a, b = resnet20_pair(root, calib)
    return {"root": root, "a": str(a), "b": str(b), "calib": str(calib)}


def test_without_labels_points_get_the_divergence_and_a_plot_is_drawn(pair, tmp_path):
    plot = tmp_path / "sweep.png"
    swept = _json(["sweep", pair["a"], pair["b"], "--arch", "resnet20", "--calib", pair["calib"], "--num-calib", "40",
                   "--method", "permute", "--method", "average", "--json", "-p", str(plot), "--quiet"])
    assert swept["data"] is None and swept["reference"] is None
    assert [(p["stop"], p["method"]) for p in swept["points"]] == [
        (s, m) for s in ("layer1", "layer2", "layer3") for m in ("permute", "average")]
    assert all(p["accuracy"] is None and p["divergence"] >= 0 for p in swept["points"])
    assert swept["calibration"]["held_out"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = runner.invoke(app, ["sweep", pair["a"], pair["b"], "--arch", "resnet20", "--calib", pair["calib"],
                                "-p", str(plot)])
    assert again.exit_code == 2 and "already exists" in again.output and "--force" in again.output


@pytest.mark.parametrize("args, message", [
    (["--method", "bogus"], "unknown method 'bogus'"),
    (["--stop", "layer9"], "unknown stop 'layer9'"),
    (["--stop", "output"], "stage stops"),
    (["-p", "sweep.jpg"], "must end in .png"),
    (["--data", "nowhere"], "does not exist"),
    (["--size", "big"], "--size 'big' is not a number in [1, 2]"),
    (["--size", "1.25", "--size", "3"], "(--size) 3.0 is outside [1, 2]"),
    (["--size", "1.25", "--method", "average"], "method average cannot merge at a size"),
])
def test_bad_sweeps_end_in_one_error_line(pair, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["sweep", pair["a"], pair["b"], "--arch", "resnet20", "--calib", pair["calib"], *args])
    assert r.exit_code == 2 and handled(r), r.output
    lines = r.output.strip().splitlines()                       # the error, then its hint
    assert message in lines[0] and lines[0].startswith("error:") and len(lines) <= 2, r.output
    assert list(tmp_path.iterdir()) == []


def test_a_plot_without_matplotlib_says_what_to_install_before_any_work(pair, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    r = runner.invoke(app, ["sweep", pair["a"], pair["b"], "--arch", "resnet20", "--calib", pair["calib"],
                            "-p", str(tmp_path / "s.png")])
    assert r.exit_code == 2 and handled(r), r.output
    assert "needs matplotlib" in r.output and "pip install matplotlib" in r.output
    assert "Calibrat" not in r.output and list(tmp_path.iterdir()) == []


def test_eval_records_its_figures_in_the_card_and_no_card_leaves_it(pair, tmp_path):
    out = tmp_path / "m.safetensors"
    data = make_images(tmp_path / "data", 10, 32, seed=5, classes=["a0", "a1", "b0", "b1", "b2"])
    r = runner.invoke(app, ["merge", pair["a"], pair["b"], "--arch", "resnet20", "--calib", pair["calib"],
                            "--method", "permute", "-o", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    card = tmp_path / "m.md"
    before = card.read_text()
    assert "Not measured" in before
    kept = _json(["eval", str(out), "--data", str(data), "--json", "--no-card"])
    assert kept["cards_updated"] == [] and card.read_text() == before
    result = _json(["eval", str(out), "--data", str(data), "--json"])
    assert result["cards_updated"] == [str(card)]
    text = card.read_text()
    figures = result["results"][0]
    assert "Not measured" not in text and f"| joint | {figures['joint_images']} | {figures['joint']:.4f} |" in text
    assert text.split("## Accuracy")[0] == before.split("## Accuracy")[0]            # the rest is untouched
    assert text.split("## Use it")[1] == before.split("## Use it")[1]
    assert _json(["eval", str(out), "--data", str(data), "--json"])["results"] == result["results"]
    assert card.read_text() == text                                                 # recording twice changes nothing


def test_a_plot_never_lands_on_an_input_even_with_force(pair, tmp_path):
    image = next(Path(pair["calib"]).rglob("*.png"))
    before = image.read_bytes()
    r = runner.invoke(app, ["sweep", pair["a"], pair["b"], "--arch", "resnet20", "--calib", pair["calib"],
                            "-p", str(image), "--force"])
    assert r.exit_code == 2 and handled(r) and "inside the input folder" in r.output, r.output
    assert image.read_bytes() == before


@pytest.mark.parametrize("refit", ["lsq", "none"])
def test_each_points_bars_say_which_point_they_belong_to(pair, refit):
    """Every point runs its own tuning, refit and BatchNorm reset (which rides on the refit's pass
    when there is one): their bars name the (stop, method)."""
    from zipcli.report import SilentReporter
    from zipcli.specs import load_spec
    from zipcli.sweep import sweep

    class Phases(SilentReporter):
        def __init__(self):
            self.phases = []

        def start(self, phase, total=None):
            self.phases.append(phase)

    seen = Phases()
    sweep([pair["a"], pair["b"]], load_spec("resnet20"), pair["calib"], methods=["permute"], stops=["layer1", "layer2"],
          options=MergeOptions(num_calib=40, refit=refit), report=seen)
    own = "refit" if refit == "lsq" else "batchnorm reset"
    for stop in ("layer1", "layer2"):
        assert f"{stop} permute: {own}" in seen.phases, seen.phases
    assert not {"refit", "batchnorm reset"} & set(seen.phases), seen.phases


# --- the size axis (issue 29)

def test_a_sized_sweep_point_equals_merge_at_the_size_and_eval(tmp_path):
    fixed = ["--alpha", "0.3", "--beta", "0.125"]
    swept = _json(["sweep", *PAIR, *CALIB, *TEST, *fixed, "--json", "--stop", "layer1", "--stop", "layer3",
                   "--size", "1.25"])
    # layer1's full zip is ~1.95x one model: 1.25 is out of its reach, so only layer3 has sized points
    assert [(p["stop"], p["size"], p["method"]) for p in swept["points"]] == [
        (stop, size, m) for stop, size in (("layer1", None), ("layer3", None), ("layer3", 1.25))
        for m in ("zipit", "permute")]
    sized = [p for p in swept["points"] if p["size"] is not None]
    for point in sized:
        out = tmp_path / f"{point['method']}.safetensors"
        merged = _json(["merge", *PAIR, *CALIB, *fixed, "--stop", "layer3", "--size", "1.25", "--method",
                        point["method"], "-o", str(out), "--json", "--no-card"])
        assert merged["params"] == point["params"] and merged["params"]["size"]["asked"] == 1.25
        assert point["parameters"] / swept["source_parameters"] * 2 == pytest.approx(merged["params"]["size"]["reached"],
                                                                                     abs=1e-4)
        assert point["macs"] == merged["params"]["size"]["macs"]
        evaluated = _json(["eval", str(out), *TEST, "--json"])["results"][0]
        for got, want in zip(point["accuracy"]["heads"], evaluated["heads"]):
            assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-9), point
        assert point["accuracy"]["joint"] == pytest.approx(evaluated["joint"], abs=1e-9)
    plain = {p["method"]: p for p in swept["points"] if p["stop"] == "layer3" and p["size"] is None}
    assert all(p["parameters"] > plain[p["method"]]["parameters"] for p in sized)       # the size bought width
    for p in swept["points"]:                   # the frontier mark, checked against its definition
        beaten = any(q["macs"] <= p["macs"] and q["accuracy"]["avg_task"] >= p["accuracy"]["avg_task"] and
                     (q["macs"] < p["macs"] or q["accuracy"]["avg_task"] > p["accuracy"]["avg_task"])
                     for q in swept["points"])
        assert p["frontier"] is (not beaten), p
    assert any(p["frontier"] for p in swept["points"])


def test_the_frontier_keeps_the_points_nothing_beats_on_cost_and_score():
    from zipcli.sweep import frontier
    costs = [1, 2, 2, 3, 4, 5, 4]
    scores = [0.5, 0.7, 0.6, 0.7, 0.9, 0.9, 0.9]
    #         kept  kept  beaten by (2, .7)  beaten: same score, dearer  kept (tie with its twin)  dearer  kept
    assert frontier(costs, scores) == [True, True, False, False, True, False, True]
    assert frontier([3], [0.1]) == [True]
    assert frontier([1, 2], [0.9, 0.5]) == [True, False]      # cheaper and better: the other is beaten


def test_a_size_out_of_a_stops_reach_is_skipped_there_and_said_once(pair, tmp_path):
    from zipcli.report import SilentReporter
    from zipcli.specs import load_spec
    from zipcli.sweep import sweep
    from zipcli.plot import plot_sweep

    class Lines(SilentReporter):
        def __init__(self):
            self.lines = []

        def info(self, message):
            self.lines.append(message)

    said = Lines()
    options = MergeOptions(num_calib=40, refit="none", alpha=0.3, beta=0.125)
    result = sweep([pair["a"], pair["b"]], load_spec("resnet20"), pair["calib"], methods=["permute"],
                   stops=["layer1", "layer3"], options=options, report=said, sizes=[1.25, 1.25, None])
    assert [(p.stop, p.size) for p in result.points] == [("layer1", None), ("layer3", 1.25), ("layer3", None)]
    skipped = [line for line in said.lines if "1.25 is below the full zip at stop" in line]
    assert len(skipped) == 1 and "layer1" in skipped[0] and "skipped" in skipped[0], said.lines
    assert result.to_dict()["points"][0]["frontier"] in (True, False)       # a sized sweep carries the mark
    plot = tmp_path / "sized.png"
    plot_sweep(result, plot)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ZipitError, match="no size swept is within reach") as err:
        sweep([pair["a"], pair["b"]], load_spec("resnet20"), pair["calib"], methods=["permute"], stops=["layer1"],
              options=options, report=said, sizes=[1.25])
    assert "--size" in err.value.hint
