"""Label-free choice of the default's method and zipit's alpha and beta, within a compute budget.

A part of the calibration images is held out (``calibration.split_holdout``). Each candidate setting is merged
(from correlations measured once on the rest), and scored by how closely each
head of the merged model reproduces its own source model on the held-out
images that source is most confident about (its own task's images, as far as
can be told without labels). Nothing here can see labels: the held-out set is images and the source
models' outputs, nothing else.

Scoring is forward passes, so it is planned in multiply-accumulates before any image is read
(``plan_tuning``): successive halving over the candidates, then zipit's best against permute on
every held-out image, as far as the budget allows; big models get fewer held-out images and no
search. Each candidate's BatchNorm is reset on ``BN_IMAGES`` fit images before it is scored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Sequence

import torch
import torch.nn as nn

from .calibration import HOLDOUT, MIN_HOLDOUT
from .distributed import SINGLE, Ranks
from .report import SilentReporter

FALLBACK = (0.3, 0.125)     # the paper's defaults, used when nothing can be searched
TUNING_MACS = 2.5e11        # tuning may always spend this many multiply-accumulates (seconds on a CPU) ...
TUNING_SHARE = 0.3          # ... or this share of the calibration pass's, if that is more
MIN_SEARCH = 128            # a search needs this many held-out images (the final comparison's evidence)
KEEP = 4                    # candidates that go on to round 2 (on a quarter of the held-out images)
CHUNK = 32                  # held-out images per forward chunk
BN_IMAGES = 64              # fit images each candidate's BatchNorm is reset on before it is scored
HELD_SIZES = (512, 384, 256, 192, 128, 96, 64, 48, 32, 16)   # held-out sizes a plan tries, largest first


@dataclass(frozen=True)
class Setting:
    alpha: float
    beta: float


def candidate_settings(n_models: int, alpha: float | None = None, beta: float | None = None) -> list[Setting]:
    """The grid searched; a given ``alpha`` or ``beta`` is held fixed.

    With two models alpha only matters once beta allows within-model merges,
    so beta 0 is tried once.
    """
    alphas = (0.1, 0.3, 0.5, 1.0) if alpha is None else (alpha,)
    betas = (0.0, 0.0625, 0.125, 0.25, 0.5) if beta is None else (beta,)
    grid = [Setting(a, b) for b in betas for a in alphas]
    if n_models == 2:
        grid = [s for s in grid if s.beta > 0 or s.alpha == alphas[-1]]
    return grid


@dataclass
class HeldOut:
    """Unlabelled images and what each source model outputs on them (its logits)."""

    images: torch.Tensor
    targets: list[torch.Tensor]

    @classmethod
    @torch.no_grad()
    def from_sources(cls, images: torch.Tensor, models: Iterable[nn.Module], chunk: int = 32) -> "HeldOut":
        targets = [torch.cat([m(x) for x in images.split(chunk)]) for m in models]
        return cls(images, targets)


def claims(targets: list[torch.Tensor]) -> torch.Tensor:
    """For each image, the source model most confident about it (max softmax): the label-free
    stand-in for "an image of task i"."""
    return torch.stack([t.softmax(1).amax(1) for t in targets]).argmax(0)


def agreement(heads: list[torch.Tensor], targets: list[torch.Tensor], claimed_only: bool = True) -> float:
    """Mean over heads of the share of images where head i predicts what source i predicts.

    With ``claimed_only`` each head is scored on the images its source claims,
    which mirrors per-task accuracy (each head judged on its own task's images)
    with the sources' predictions standing in for labels.
    """
    owner = claims(targets) if claimed_only else None
    shares = []
    for i, (h, t) in enumerate(zip(heads, targets)):
        same = h.argmax(1) == t.argmax(1)
        if owner is not None:
            same = same[owner == i]
        shares.append(same.float().mean() if same.numel() else torch.tensor(1.0))
    return float(sum(shares) / len(shares))


def divergence(heads: list[torch.Tensor], targets: list[torch.Tensor], claimed_only: bool = True) -> float:
    """Mean over heads of KL(source i || head i) on the images source i claims (or on all images)."""
    owner = claims(targets) if claimed_only else None
    kls = []
    for i, (h, t) in enumerate(zip(heads, targets)):
        if owner is not None:
            h, t = h[owner == i], t[owner == i]
        if len(t):
            p = t.log_softmax(1)
            kls.append(float((p.exp() * (p - h.log_softmax(1))).sum(1).mean()))
    return sum(kls) / len(kls) if kls else 0.0


def image_divergences(heads: list[torch.Tensor], targets: list[torch.Tensor]) -> torch.Tensor:
    """Per held-out image: KL(source || head) of the source that claims the image, weighted so that
    the mean over images is ``score`` (each head counts equally, whatever it claims), so that two
    candidates can be compared image by image."""
    owner = claims(targets)
    kl = torch.stack([(t.log_softmax(1).exp() * (t.log_softmax(1) - h.log_softmax(1))).sum(1)
                      for h, t in zip(heads, targets)]).gather(0, owner[None]).squeeze(0)
    counts = torch.bincount(owner, minlength=len(heads)).double()
    weight = len(owner) / (int((counts > 0).sum()) * counts[owner])
    return kl.double() * weight


def paired_interval(a: torch.Tensor, b: torch.Tensor, level: float = 0.95, resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float]:
    """Paired-bootstrap interval of mean(a - b) over images: how far the difference between two
    candidates' scores could move with another draw of held-out images."""
    diff = (a - b).double()
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diff), (resamples, len(diff)), generator=gen)
    means = diff[idx].mean(1)
    tail = (1 - level) / 2
    return float(means.quantile(tail)), float(means.quantile(1 - tail))


def score(heads: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    """The tuning criterion (lower is better): how far each head's predicted distribution is from
    its source's, on the images that source claims. Smoother than top-1 agreement, so a small
    held-out set still ranks settings."""
    return divergence(heads, targets)


@dataclass(frozen=True)
class TuningPlan:
    """What tuning will score, decided from multiply-accumulates before any image is read."""

    held: int                       # held-out images scored (0: no tuning)
    rounds: tuple[int, ...]         # images per search round (empty: no search, the fixed setting)
    compare: bool                   # zipit's best against permute on all ``held`` images (the default)
    macs: float                     # what the plan costs
    budget: float
    available: int = 0              # held-out images there were to plan with

    def to_metadata(self) -> dict:
        return {"held_out_images": self.held, "rounds": list(self.rounds), "compare_with_permute": self.compare,
                "gmacs": round(self.macs / 1e9, 3), "budget_gmacs": round(self.budget / 1e9, 3)}


def tuning_budget(calibration_macs: float) -> float:
    """Multiply-accumulates tuning may spend: a fixed allowance, or a share of the calibration pass."""
    return max(TUNING_MACS, TUNING_SHARE * calibration_macs)


def plan_tuning(budget: float, source_macs: float, merged_macs: float, available: int, n_settings: int,
                compare: bool) -> TuningPlan:
    """The richest plan within ``budget``: two search rounds, else one, on at least ``MIN_SEARCH``
    held-out images, as many as fit; else no search (the fixed setting against permute) on as
    many held-out images as fit; else nothing.

    ``source_macs``: all sources together, per image; ``merged_macs``: the merged model per image;
    ``available``: held-out images there are; ``n_settings``: candidates in round 1.
    """
    top = min(available, HOLDOUT) // MIN_HOLDOUT * MIN_HOLDOUT
    sizes = [top] + [h for h in HELD_SIZES if h < top]
    modes = ([2] if n_settings > KEEP else []) + ([1] if n_settings > 1 else []) + ([0] if compare else [])
    for mode in modes:
        for held in sizes:
            if mode and held < min(MIN_SEARCH, top):
                break
            r1 = 32 if held >= 256 else MIN_HOLDOUT
            rounds = (r1, held // 4)[:mode] if held // 4 > r1 else (r1,)[:mode]
            if len(rounds) < mode:
                continue
            cost = held * source_macs + merged_macs * _scored_images(rounds, n_settings, held, compare)
            if cost <= budget:
                return TuningPlan(held, rounds, compare, cost, budget, available)
    return TuningPlan(0, (), compare, 0.0, budget, available)


def _scored_images(rounds: tuple[int, ...], n_settings: int, held: int, compare: bool) -> int:
    """Merged-model images a plan runs: each candidate's BatchNorm reset, then its held-out images
    (a candidate that goes on is only run on the new ones)."""
    total, done = 0, 0
    for r, size in enumerate(rounds):
        total += n_settings * (BN_IMAGES + size) if r == 0 else min(KEEP, n_settings) * (size - done)
        done = size
    if compare:
        total += (held - done if rounds else BN_IMAGES + held) + BN_IMAGES + held   # zipit's best, permute
    return total


@torch.no_grad()
def head_outputs(model: nn.Module, images: torch.Tensor, n_heads: int, chunk: int = 32) -> list[torch.Tensor]:
    outputs = [model(x) for x in images.split(chunk)]
    return [torch.cat([o[i] for o in outputs]) for i in range(n_heads)]


class _Scored:
    """A candidate (a callable giving each head's logits) and its logits on a growing prefix of
    the held-out images: a candidate that goes on to more images is only run on the new ones."""

    def __init__(self, model: Callable[[torch.Tensor], list[torch.Tensor]], n_heads: int):
        self.model, self.n_heads = model, n_heads
        self.logits: list[list[torch.Tensor]] = []     # per chunk, per head

    @torch.no_grad()
    def upto(self, images: torch.Tensor, n: int) -> list[torch.Tensor]:
        """Each head's logits on ``images[:n]``."""
        done = sum(len(c[0]) for c in self.logits)
        for lo in range(done, n, CHUNK):
            self.logits.append([o.detach() for o in self.model(images[lo:min(lo + CHUNK, n)])[:self.n_heads]])
        return [torch.cat([c[i] for c in self.logits])[:n] for i in range(self.n_heads)]


@dataclass(frozen=True)
class Trial:
    setting: Setting
    score: float
    images: int                 # held-out images behind the score (candidates out after round 1: fewer)
    screen_score: float | None = None   # the round-1 score, for a candidate scored again on more images


@dataclass
class TuningResult:
    trials: list[Trial]
    chosen: Setting
    held_out: int
    reason: str = ""            # why tuning fell back or did not search, if it did
    plan: TuningPlan | None = None
    choice: "MethodChoice | None" = None

    def to_metadata(self) -> dict:
        return {"criterion": "mean KL divergence of each head from its source on the held-out images that source "
                             "claims (lower is better)",
                "held_out_images": self.held_out, "reason": self.reason,
                **({} if self.plan is None else {"plan": self.plan.to_metadata()}),
                "chosen": {"alpha": self.chosen.alpha, "beta": self.chosen.beta},
                "candidates": [{"alpha": t.setting.alpha, "beta": t.setting.beta, "score": round(t.score, 6),
                                "images": t.images,
                                **({} if t.screen_score is None else {"screen_score": round(t.screen_score, 6)})}
                               for t in self.trials]}


@dataclass
class MethodChoice:
    """The default's choice between permute and zipit's best setting, and the evidence for it.

    Permute is the simpler method and wins unless zipit's mean divergence on the held-out images
    is lower by more than the score's noise: the whole paired-bootstrap interval of
    (zipit - permute) must lie below 0.
    """

    method: str
    setting: Setting
    zipit: float | None = None          # mean per-image divergence on the held-out images
    permute: float | None = None
    interval: tuple[float, float] | None = None
    images: int = 0
    reason: str = ""                    # why there is no evidence, if there is none

    @classmethod
    def from_divergences(cls, setting: Setting, zipit: torch.Tensor, permute: torch.Tensor) -> "MethodChoice":
        lo, hi = paired_interval(zipit, permute, LEVEL)
        return cls("zipit" if hi < 0 else "permute", setting, float(zipit.mean()), float(permute.mean()),
                   (lo, hi), len(zipit))

    @classmethod
    def without_evidence(cls, setting: Setting, why: str = "") -> "MethodChoice":
        return cls("permute", setting, reason=why or "no held-out images")

    def to_metadata(self) -> dict:
        rule = (f"permute unless zipit's mean divergence is lower with the whole {LEVEL:.0%} paired-bootstrap "
                "interval of the difference below 0")
        if self.interval is None:
            return {"chosen": self.method, "rule": rule, "reason": f"{self.reason}: no evidence against permute"}
        return {"chosen": self.method, "rule": rule, "held_out_images": self.images,
                "zipit": {"alpha": self.setting.alpha, "beta": self.setting.beta, "divergence": round(self.zipit, 6)},
                "permute": {"divergence": round(self.permute, 6)},
                "difference": round(self.zipit - self.permute, 6),
                "interval": [round(self.interval[0], 6), round(self.interval[1], 6)]}


LEVEL = 0.95


def search(prepare: Callable[[Setting], tuple[Hashable, Callable[[], nn.Module]]], held: HeldOut,
           settings: Sequence[Setting], plan: TuningPlan, fallback: Setting,
           permute: Callable[[], nn.Module] | None = None, report=None, ranks: Ranks = SINGLE) -> TuningResult:
    """Successive halving over ``settings``, then, with ``permute``, the default's final comparison.

    ``prepare(setting)`` gives a key for the setting's matching and a function that builds
    the model; settings that match alike share one score. Round 1 scores every distinct
    candidate on the first ``plan.rounds[0]`` held-out images (the held-out order is random);
    the ``KEEP`` best go on to the first ``plan.rounds[1]`` (their round-1 logits reused);
    the best of the last round is zipit's setting (``fallback`` when the plan has no rounds).
    With ``permute`` (builder of the permute merge) that setting and permute are then
    scored image by image on all ``plan.held`` images, for ``MethodChoice``. The lowest
    divergence wins, ties go to the earlier setting. With several ``ranks`` the candidates
    are dealt out and the scores summed, so that every rank ends with the same result.
    ``report``: a progress bar per round and one for the final comparison.
    """
    report = report or SilentReporter()
    n = len(held.targets)
    mine: dict[int, _Scored] = {}           # this rank's candidates, by index among the distinct ones
    trials: list[Trial] = []
    winner, chosen, owner = None, fallback, 0
    keys: list[Hashable] = []
    if plan.rounds:
        makers: dict[Hashable, Callable[[], nn.Module]] = {}
        for s in settings:
            key, make = prepare(s)
            keys.append(key)
            makers.setdefault(key, make)
        distinct = list(makers)             # in order of first appearance
        first = [keys.index(k) for k in distinct]
        alive, rounds = list(range(len(distinct))), []
        for r, size in enumerate(plan.rounds):
            local = {}

            def run(size=size, entrants=tuple(alive), build=r == 0) -> None:
                for j in entrants:
                    if ranks.owns(j):
                        if build:
                            mine[j] = _Scored(makers[distinct[j]](), n)
                        local[j] = score(mine[j].upto(held.images, size), [t[:size] for t in held.targets])
                    report.advance(keys.count(distinct[j]) if build else 1)    # settings this candidate stands for

            report.start(f"tuning round {r + 1}", len(settings) if r == 0 else len(alive))
            try:
                ranks.together(run)
            finally:
                report.done()
            scored = dict(zip(alive, _gathered(local, alive, ranks, held.images.device)))
            rounds.append(scored)
            alive = sorted(alive, key=lambda j: (scored[j], first[j]))[:KEEP]
            for j in [j for j in mine if j not in alive]:
                del mine[j]                 # out of the running: free its model
        owner = alive[0]
        winner, chosen = mine.get(owner), settings[first[owner]]
        for s, key in zip(settings, keys):
            j = distinct.index(key)
            last = max(r for r, sc in enumerate(rounds) if j in sc)
            trials.append(Trial(s, rounds[last][j], plan.rounds[last], rounds[0][j] if last else None))
    choice = None
    if permute is not None:
        zipit = (lambda: winner) if plan.rounds else (lambda: _Scored(prepare(fallback)[1](), n))   # no search:
        report.start("zipit vs permute", 2)
        try:
            choice = _compare(zipit, chosen, permute, held, plan.held, owner, ranks, report.advance)  # fixed setting
        finally:
            report.done()
        if trials:                          # the winner's score is now on every held-out image
            won = keys[settings.index(chosen)]
            trials = [Trial(t.setting, choice.zipit, plan.held, t.screen_score if t.screen_score is not None
                            else t.score) if k == won else t for t, k in zip(trials, keys)]
    return TuningResult(trials, chosen, plan.held, plan=plan, choice=choice,
                        reason="" if plan.rounds else "the tuning budget leaves no room to search alpha and beta")


def _compare(zipit: Callable[[], _Scored], setting: Setting, permute: Callable[[], nn.Module], held: HeldOut,
             size: int, owner: int, ranks: Ranks, advance: Callable[[int], None] = lambda n: None) -> "MethodChoice":
    """zipit's best (``zipit()``, on the rank that owns it) against permute, image by image on the
    first ``size`` held-out images."""
    n, targets = len(held.targets), [t[:size] for t in held.targets]
    local = torch.zeros(2, size, dtype=torch.float64, device=held.images.device)   # nccl sums on the GPU

    def work() -> None:
        if ranks.owns(owner):
            local[0] = image_divergences(zipit().upto(held.images, size), targets)
        advance(1)
        if ranks.owns(owner + 1):
            local[1] = image_divergences(_Scored(permute(), n).upto(held.images, size), targets)
        advance(1)

    ranks.together(work)
    both = ranks.sum(local).cpu()
    return MethodChoice.from_divergences(setting, both[0], both[1])


def _gathered(local: dict[int, float], keys: list[int], ranks: Ranks, device) -> list[float]:
    """Every rank's scores of ``keys`` (each scored by one rank), on every rank (summed on ``device``:
    nccl sums GPU tensors only)."""
    return ranks.sum(torch.tensor([local.get(k, 0.0) for k in keys], dtype=torch.float64, device=device)).tolist()


def tune(prepare: Callable[[Setting], tuple[Hashable, Callable[[], nn.Module]]], held: HeldOut | None,
         settings: Sequence[Setting], fallback: Setting, plan: TuningPlan, report,
         permute: Callable[[], nn.Module] | None = None, ranks: Ranks = SINGLE) -> TuningResult:
    """Run ``plan`` on ``held`` with progress on ``report``; without a held-out set, the fallback
    with the reason. The caller renders the result (``TuningResult.to_metadata``)."""
    if held is None or plan.held == 0:
        why = (f"scoring even {MIN_HOLDOUT} held-out images would cost more than the tuning budget "
               f"({plan.budget / 1e9:.0f} GMAC)" if plan.held == 0 and plan.available >= MIN_HOLDOUT else
               f"too few readable calibration images to hold out {MIN_HOLDOUT}")
        return TuningResult([], fallback, 0, reason=why, plan=plan)
    return search(prepare, held, settings, plan, fallback, permute, report, ranks)
