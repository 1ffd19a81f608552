"""Label-free alpha/beta tuning: held-out split, no labels, determinism, fallback, metadata."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import zipcli.calibration
import zipcli.evaluate
import zipcli.measured
import zipcli.pipeline
from zipcli.assembly import match
from zipcli.choosing import candidate
from zipcli.wording import choice_rule
from zipcli.measured import Calibration
import zipcli.tuning
from zipcli import MergeOptions, merge
from zipcli.cli import app
from zipcli.merged import read_metadata
from zipcli.calibration import HOLDOUT, MIN_HOLDOUT, split_holdout
from zipcli.merged import HeadInfo, skeleton
from zipcli.tuning import (KEEP, HeldOut, Setting, TuningPlan, _Scored, agreement, candidate_settings, claims,
                           divergence, head_outputs, image_divergences, plan_tuning, search)

from conftest import make_images, resnet20_pair, small_spec
from typer.testing import CliRunner

runner = CliRunner()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    spec = small_spec("resnet20")
    calib = make_images(root / "calib", 72, 32, seed=7, classes=["c0", "c1", "c2"])
    a, b = resnet20_pair(root, calib)
    return {"spec": spec, "calib": calib, "paths": [a, b], "root": root}


def test_held_out_images_are_spare_folder_images_when_there_are_any():
    files = [f"f{i:04d}" for i in range(4 * HOLDOUT)]
    sample = files[::4]
    fit, held = split_holdout(files, sample, 0)
    assert fit == sample and len(held) == HOLDOUT and not set(held) & set(sample) and set(held) <= set(files)
    assert (fit, held) == split_holdout(files, sample, 0) and held != split_holdout(files, sample, 1)[1]


def test_without_spare_images_a_seeded_share_of_the_sample_is_held_out():
    files = [f"f{i}" for i in range(200)]
    fit, held = split_holdout(files, files, 0)
    assert len(held) == 48 and not set(fit) & set(held) and sorted(fit + held) == sorted(files)   # whole 16s
    assert held != sorted(held)                             # a random order: any prefix is a random sample
    assert split_holdout(files, files, 0, limit=16)[1] == held[:16]
    assert (fit, held) == split_holdout(files, files, 0) and held != split_holdout(files, files, 1)[1]
    small = files[: 4 * MIN_HOLDOUT - 1]
    assert split_holdout(small, small, 0) == (small, [])


def test_grid_holds_given_values_fixed_and_skips_alpha_at_beta_zero_for_two_models():
    assert all(s.alpha == 0.5 for s in candidate_settings(3, alpha=0.5))
    assert all(s.beta == 0.25 for s in candidate_settings(2, beta=0.25))
    two = candidate_settings(2)
    assert sum(s.beta == 0 for s in two) == 1 and len({(s.alpha, s.beta) for s in two}) == len(two)


def test_claimed_agreement_scores_each_head_on_the_images_its_source_claims():
    # source 0 is sure about images 0-1, source 1 about images 2-3
    t0 = torch.tensor([[9.0, 0], [0, 9], [1, 0], [0, 1]])
    t1 = torch.tensor([[1.0, 0, 0], [0, 1, 0], [9, 0, 0], [0, 0, 9]])
    assert claims([t0, t1]).tolist() == [0, 0, 1, 1]
    h0 = torch.tensor([[1.0, 0], [0, 1], [0, 1], [1, 0]])   # right on its claimed images, wrong elsewhere
    h1 = torch.tensor([[0.0, 1, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0]])  # half right on its own
    assert agreement([h0, h1], [t0, t1]) == pytest.approx((1.0 + 0.5) / 2)
    assert agreement([h0, h1], [t0, t1], claimed_only=False) == pytest.approx((0.5 + 0.25) / 2)


def test_divergence_is_zero_for_the_source_itself_and_only_counts_claimed_images():
    t0 = torch.tensor([[9.0, 0], [0, 9], [1, 0], [0, 1]])
    t1 = torch.tensor([[1.0, 0, 0], [0, 1, 0], [9, 0, 0], [0, 0, 9]])
    assert divergence([t0, t1], [t0, t1]) == pytest.approx(0.0, abs=1e-6)
    off_task = t0.clone()
    off_task[2:] = torch.tensor([[0.0, 5], [5, 0]])   # head 0 wrong only on images source 1 claims
    assert divergence([off_task, t1], [t0, t1]) == pytest.approx(0.0, abs=1e-6)
    assert divergence([off_task, t1], [t0, t1], claimed_only=False) > 0.1


def test_search_takes_the_first_best_and_scores_each_distinct_matching_once():
    held = HeldOut(torch.zeros(4, 1), [torch.eye(2)[[0, 1, 0, 1]]])
    built = []

    class Fixed(torch.nn.Module):
        def __init__(self, right):
            super().__init__()
            self.right = right

        def forward(self, x):
            n = x.shape[0]
            good = torch.eye(2)[[0, 1, 0, 1]][:n]
            return [good if self.right else 1 - good]

    def prepare(s: Setting):
        key = s.beta > 0.1
        return key, lambda: built.append(s) or Fixed(key)

    settings = [Setting(1.0, 0.0), Setting(0.3, 0.125), Setting(1.0, 0.125), Setting(0.3, 0.25)]
    result = search(prepare, held, settings, TuningPlan(4, (4,), False, 0, 0), Setting(0.3, 0.125))
    assert result.chosen == Setting(0.3, 0.125) and len(built) == 2
    scores = [t.score for t in result.trials]
    assert scores[0] > 0 and scores[1] == scores[2] == scores[3] == pytest.approx(0.0, abs=1e-6)


def test_successive_halving_keeps_the_best_of_round_one_and_chooses_on_more_images():
    n = 128
    targets = torch.randn(n, 3)
    held = HeldOut(torch.arange(n, dtype=torch.float32)[:, None], [targets])
    built, seen = [], {}

    class Noisy(torch.nn.Module):
        """Source logits plus noise that grows with k; candidate 0 is only good on the first 16 images."""

        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            rows = x[:, 0].long()
            seen.setdefault(self.k, []).extend(rows.tolist())
            noise = torch.randn(len(rows), 3, generator=torch.Generator().manual_seed(self.k)) * (0.1 + self.k)
            if self.k == 0:
                noise[rows >= 16] = 50.0 * torch.randn(int((rows >= 16).sum()), 3)
            return [targets[rows] + noise]

    settings = [Setting(1.0, b) for b in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)]
    plan = TuningPlan(128, (16, 64), False, 0, 0)
    result = search(lambda s: (s.beta, lambda: built.append(s) or Noisy(settings.index(s))), held, settings, plan,
                    Setting(0.3, 0.125))
    assert len(built) == len(settings)                       # each candidate built once
    on = [t for t in result.trials if t.images == 64]
    assert len(on) == KEEP and all(t.images == 16 for t in result.trials if t not in on)
    assert all(t.screen_score is not None for t in on)
    # a candidate that goes on is only run on the images it has not seen
    assert all(sorted(rows) == list(range(len(rows))) for rows in seen.values())
    # candidate 0 wins round 1 but loses on more images: the choice is the best on the last round's images
    assert Setting(1.0, 0.0) in [t.setting for t in on] and result.chosen == Setting(1.0, 0.1)


def test_the_plan_fits_the_budget_and_gives_big_models_no_search():
    small = plan_tuning(2.5e11, 82e6, 57e6, 512, 17, compare=True)          # the zoo pair at layer2
    assert small.held == 512 and len(small.rounds) == 2 and small.macs <= small.budget
    tight = plan_tuning(1.2e11, 82e6, 57e6, 512, 17, compare=True)
    assert tight.macs <= 1.2e11 and 0 < tight.held < 512
    big = plan_tuning(6.3e11, 8.2e9, 4.1e9, 512, 17, compare=True)          # two ResNet-50s at 224 px
    assert big.held == 0 and big.macs == 0
    assert plan_tuning(1e30, 1, 1, 10, 17, compare=True).held == 0          # fewer held-out images than 16
    assert plan_tuning(1e30, 1, 1, 40, 17, compare=False).held == 32


def test_auto_never_reads_labels_or_held_out_images_for_correlations(pair, monkeypatch):
    def forbidden(*_a, **_k):
        raise AssertionError("tuning touched labelled data")

    monkeypatch.setattr(zipcli.evaluate, "labelled_images", forbidden)
    monkeypatch.setattr(zipcli.evaluate, "labelled_batches", forbidden)
    seen = {}
    real = zipcli.measured.collect_correlations

    def spy(models, spec, plan, stream, device, report, within):
        seen["files"] = list(stream.files)
        return real(models, spec, plan, stream, device, report, within)

    monkeypatch.setattr(zipcli.measured, "collect_correlations", spy)
    result = merge(pair["paths"], pair["spec"], pair["calib"],
                   MergeOptions(method="zipit", stop="layer2", alpha=None, beta=None))
    tuning = result.metadata["params"]["tuning"]
    assert result.metadata["calibration"]["held_out"] == 16 and tuning["held_out_images"] == 16   # whole 16s
    assert len(seen["files"]) == 72 - 16 == result.metadata["calibration"]["num_images"]
    assert len(tuning["candidates"]) + len(tuning["not_screened"]) == len(candidate_settings(2))
    chosen = tuning["chosen"]
    assert (chosen["alpha"], chosen["beta"]) == (result.metadata["params"]["alpha"], result.metadata["params"]["beta"])
    best = min(c["score"] for c in tuning["candidates"])
    first_best = next(c for c in tuning["candidates"] if c["score"] == best)
    assert (first_best["alpha"], first_best["beta"]) == (chosen["alpha"], chosen["beta"])


def test_auto_is_deterministic_for_a_seed_and_recorded_by_the_cli(pair, tmp_path):
    outs = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for out in outs:
        r = runner.invoke(app, ["merge", *map(str, pair["paths"]), "--arch", "resnet20", "--calib", str(pair["calib"]),
                                "--stop", "layer1", "--method", "zipit", "--alpha", "auto", "--beta", "auto", "-o",
                                str(out)])
        assert r.exit_code == 0, r.output
        assert "chose alpha" in r.output and "divergence" in r.output
    assert outs[0].read_bytes() == outs[1].read_bytes()
    params = json.loads(read_metadata(outs[0])["params"])
    assert params["tuning"]["candidates"] and params["tuning"]["reason"] == ""
    shown = runner.invoke(app, ["inspect", str(outs[0])])
    assert shown.exit_code == 0 and "tuned" in shown.output and "divergence" in shown.output
    unscreened = params["tuning"]["not_screened"]
    assert unscreened and ("–: not scored" in shown.output)
    lines = shown.output[shown.output.index("alpha/beta tuning"):].splitlines()
    columns = [float(c) for c in lines[1].split("┃")[1:]]
    grid = {}
    for line in lines[3:]:
        if "│" in line:
            cells = [c.strip() for c in line.split("│")]
            grid.setdefault(float(cells[0].split()[0]), cells[1:])      # a beta's first row: its round 1
    for u in unscreened:                    # each unscored setting is a "–" in its beta's row
        assert grid[u["beta"]][columns.index(u["alpha"])] == "–"
    as_json = json.loads(runner.invoke(app, ["inspect", str(outs[0]), "--json"]).stdout)
    assert as_json["params"]["tuning"]["chosen"] == params["tuning"]["chosen"]


def test_too_few_images_fall_back_with_a_warning(pair, tmp_path):
    calib = make_images(tmp_path / "few", 20, 32, seed=9)
    out = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["merge", *map(str, pair["paths"]), "--arch", "resnet20", "--calib", str(calib),
                            "--method", "zipit", "--alpha", "auto", "--beta", "auto", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "too few to hold any out" in r.output
    params = json.loads(read_metadata(out)["params"])
    assert (params["alpha"], params["beta"]) == (0.3, 0.125)
    assert params["tuning"]["candidates"] == [] and "too few" in params["tuning"]["reason"]


def test_explicit_values_override_auto(pair, tmp_path):
    result = merge(pair["paths"], pair["spec"], pair["calib"],
                   MergeOptions(method="zipit", alpha=0.5, beta=0.25, stop="layer1"))
    assert {k: v for k, v in result.metadata["params"].items() if k != "refit"} == {"alpha": 0.5, "beta": 0.25}
    r = runner.invoke(app, ["merge", *map(str, pair["paths"]), "--arch", "resnet20", "--calib", str(pair["calib"]),
                            "--alpha", "x", "-o", str(tmp_path / "m.safetensors")])
    assert r.exit_code == 2 and "--alpha 'x'" in r.output and "auto" in r.output


def test_the_default_chooses_between_permute_and_zipit_and_says_why(pair, tmp_path, monkeypatch):
    assert MergeOptions().method == "auto" and MergeOptions().tunes and not MergeOptions(method="permute").tunes
    monkeypatch.setattr(zipcli.evaluate, "labelled_images", lambda *a, **k: pytest.fail("read labels"))
    out = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["merge", *map(str, pair["paths"]), "--arch", "resnet20", "--calib", str(pair["calib"]),
                            "--stop", "layer1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    meta = read_metadata(out)
    params = json.loads(meta["params"])
    choice = params["choice"]
    lo, hi = choice["interval"]
    assert lo <= choice["difference"] <= hi
    assert choice["difference"] == pytest.approx(choice["zipit"]["divergence"] - choice["permute"]["divergence"], abs=1e-5)
    assert meta["method"] == choice["chosen"] == ("zipit" if hi < 0 else "permute")        # conservative rule
    assert (choice["zipit"]["alpha"], choice["zipit"]["beta"]) == (params["tuning"]["chosen"]["alpha"],
                                                                   params["tuning"]["chosen"]["beta"])
    assert r.output.count(f"chose {choice['chosen']}:") == 1 and "95% interval" in r.output
    shown = runner.invoke(app, ["inspect", str(out)])
    assert "why" in shown.output and "95% interval" in shown.output


def test_the_python_api_logs_what_the_default_decided(pair, caplog):
    """A Python caller hears what the CLI prints: the alpha and beta, permute or zipit and why, the refit."""
    with caplog.at_level(logging.INFO, logger="zipit"):
        result = merge(pair["paths"], pair["spec"], pair["calib"], MergeOptions(stop="layer1"))
    said = [r.getMessage() for r in caplog.records if r.name == "zipit"]
    params = result.metadata["params"]
    assert f"chose alpha {params['tuning']['chosen']['alpha']:g}, beta {params['tuning']['chosen']['beta']:g}" \
        in "\n".join(said)
    assert sum(m.startswith(f"chose {params['choice']['chosen']}: held-out divergence") for m in said) == 1, said
    assert sum(m.startswith("refit: lsq on") for m in said) == 1, said


def test_choice_rule_prefers_permute_unless_zipit_is_clearly_better():
    from zipcli.tuning import MethodChoice, Setting as S

    noise = torch.randn(400, generator=torch.Generator().manual_seed(0))
    permute = 1.0 + noise.abs()
    assert MethodChoice.from_divergences(S(1, 0.5), permute - 0.5, permute).method == "zipit"     # clearly lower
    assert MethodChoice.from_divergences(S(1, 0.5), permute + 0.5, permute).method == "permute"
    tied = permute + 0.3 * torch.randn(400, generator=torch.Generator().manual_seed(1))   # lower on average by chance?
    assert MethodChoice.from_divergences(S(1, 0.5), tied - 0.001, permute).method == "permute"   # within its noise


def test_when_the_evidence_would_cost_more_than_the_budget_the_default_is_permute_and_says_so(pair, monkeypatch):
    monkeypatch.setattr(zipcli.tuning, "TUNING_MACS", 1.0)
    monkeypatch.setattr(zipcli.tuning, "TUNING_SHARE", 1e-9)
    result = merge(pair["paths"], pair["spec"], pair["calib"], MergeOptions(stop="layer1"))
    choice = result.metadata["params"]["choice"]
    assert result.metadata["method"] == choice["chosen"] == "permute" and "budget" in choice["reason"]
    assert result.metadata["calibration"]["held_out"] == 0 and result.metadata["calibration"]["num_images"] == 72


@pytest.mark.parametrize("name,size", [("resnet20", None), ("cifar_vgg11", None), ("mobilenet_v2", 64),
                                       ("densenet121", 64)])
def test_heads_asked_for_some_images_give_exactly_those_rows_of_their_logits(name, size):
    spec = small_spec(name, size)
    heads = [HeadInfo("a", ["x", "y"], "a.pt"), HeadInfo("b", ["x", "y", "z"], "b.pt")]
    x = torch.randn(5, 3, spec.input.size, spec.input.size)
    for stop in spec.stops:
        torch.manual_seed(0)
        model = skeleton(spec, stop, heads)
        with torch.no_grad():
            full = model(x)
            routed = model(x, rows=[torch.tensor([0, 3, 4]), torch.tensor([], dtype=torch.long)])
        assert routed[1] is None, stop
        torch.testing.assert_close(routed[0], full[0][[0, 3, 4]], rtol=1e-5, atol=1e-5, msg=stop)


def test_scoring_each_head_on_its_claimed_images_only_gives_the_scores_of_full_passes(pair):
    """Tuning runs head i only on the images source i claims; the score must be what running
    every head on every image gives."""
    cal = Calibration(pair["paths"], pair["spec"], pair["calib"], MergeOptions(stop="layer2"))
    cal.measure("layer2")
    read = cal.held_out()
    a, b = read.targets
    held = HeldOut(read.images, [a, torch.cat([b[:8] * 10, b[8:]])])   # source b claims the first 8 images
    owner = claims(held.targets)
    assert 0 < int((owner == 0).sum()) < len(owner)          # both heads claim some images
    scorer = candidate(cal, "layer2", match(cal, "layer2", "zipit", Setting(0.3, 0.125)), cal.bn_subset())
    full = head_outputs(scorer, held.images, 2)
    scored = _Scored(scorer).upto(held, len(owner))
    assert divergence(scored, held.targets) == pytest.approx(divergence(full, held.targets), rel=1e-5)
    torch.testing.assert_close(image_divergences(scored, held.targets), image_divergences(full, held.targets),
                               rtol=1e-5, atol=1e-6)


class _Offset(torch.nn.Module):
    """One head whose logits are the source's plus ``offset`` on the wrong class: divergence grows with it."""

    def __init__(self, targets: torch.Tensor, offset: float):
        super().__init__()
        self.targets, self.offset = targets, offset

    def forward(self, x):
        rows = x[:, 0].long()
        return [self.targets[rows] + self.offset * torch.eye(3)[(self.targets[rows].argmax(1) + 1) % 3]]


def test_round_one_scores_one_alpha_per_beta_then_every_alpha_of_the_two_best_betas():
    n = 64
    targets = 3 * torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    held = HeldOut(torch.arange(n, dtype=torch.float32)[:, None], [targets])
    settings = candidate_settings(2)
    badness = {0.0: 5.0, 0.0625: 4.0, 0.125: 1.0, 0.25: 2.0, 0.5: 3.0}      # per beta; alpha 0.5 best within a row
    built = []

    def prepare(s: Setting):
        return (s.alpha, s.beta), lambda: built.append(s) or _Offset(targets, badness[s.beta] + abs(s.alpha - 0.5))

    result = search(prepare, held, settings, TuningPlan(n, (16,), False, 0, 0), Setting(0.3, 0.125))
    first_wave = {Setting(1.0, 0.0), *(Setting(0.3, b) for b in (0.0625, 0.125, 0.25, 0.5))}
    second_wave = {Setting(a, b) for a in (0.1, 0.5, 1.0) for b in (0.125, 0.25)}
    assert set(built) == first_wave | second_wave and len(built) == 11
    assert {t.setting for t in result.trials} == set(built)
    assert set(result.unscreened) == set(settings) - set(built)
    assert result.chosen == Setting(0.5, 0.125)
    meta = result.to_metadata()
    assert len(meta["candidates"]) == 11 and len(meta["not_screened"]) == 6
    assert zipcli.tuning.screened_count(settings) == 11 and zipcli.tuning.screened_count(candidate_settings(3)) == 11


def _compared(gap: float, n: int = 512):
    """The final comparison of a zipit candidate ``gap`` worse per image than permute, with its reads."""
    targets = 3 * torch.randn(n, 3, generator=torch.Generator().manual_seed(1))
    full = HeldOut(torch.arange(n, dtype=torch.float32)[:, None], [targets])
    noisy = torch.rand(n, generator=torch.Generator().manual_seed(2)) * 2
    reads = []

    class PerImage(torch.nn.Module):
        def __init__(self, extra):
            super().__init__()
            self.extra = extra

        def forward(self, x):
            rows = x[:, 0].long()
            wrong = torch.eye(3)[(targets[rows].argmax(1) + 1) % 3]
            return [targets[rows] + (noisy[rows] + self.extra)[:, None] * wrong]

    plan = TuningPlan(n, (), True, 0, 0)
    result = search(lambda s: (s, lambda: PerImage(gap)), full.first(n // 2), [Setting(0.3, 0.125)], plan,
                    Setting(0.3, 0.125), permute=lambda: PerImage(0.0), more=lambda: reads.append(1) or full)
    return result.choice, reads


def test_the_comparison_reads_the_second_half_only_when_the_first_leaves_it_undecided():
    assert TuningPlan(512, (32, 128), True, 0, 0).looks == (256, 512)
    assert TuningPlan(192, (32, 48), True, 0, 0).looks == (192,)              # half would be under a search's worth
    clear, reads = _compared(-1.0)
    assert clear.method == "zipit" and clear.images == 256 and not reads and clear.level == 0.975
    worse, reads = _compared(+1.0)
    assert worse.method == "permute" and worse.images == 256 and not reads  # clearly worse: permute at once
    tied, reads = _compared(0.0)
    assert tied.method == "permute" and tied.images == 512 and reads == [1]
    assert "then on all 512" in choice_rule(tied.to_metadata()) and tied.to_metadata()["level"] == 0.975


def test_held_out_images_are_read_once_and_more_of_them_extend_the_first(pair, monkeypatch):
    cal = Calibration(pair["paths"], pair["spec"], pair["calib"], MergeOptions(stop="layer1"), hold_out=True)
    decoded = []
    real = zipcli.calibration.decode
    monkeypatch.setattr(zipcli.calibration, "decode", lambda path, pre: decoded.append(path) or real(path, pre))
    everything = cal.held_out()
    assert everything is not None and len(decoded) == len(cal.held_files) == len(everything.images)
    decoded.clear()
    fresh = Calibration(pair["paths"], pair["spec"], pair["calib"], MergeOptions(stop="layer1"), hold_out=True)
    head = fresh.held_out(8)
    assert head is None and len(decoded) == 8                  # fewer than MIN_HOLDOUT: no held-out set yet
    whole = fresh.held_out()
    assert len(decoded) == len(fresh.held_files)               # only the files not read before
    torch.testing.assert_close(whole.images, everything.images)
    torch.testing.assert_close(whole.targets[1], everything.targets[1])
    assert len(fresh.held_out(16).images) == 16 and fresh.held_count == len(fresh.held_files)
