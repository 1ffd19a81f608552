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

from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Sequence

import torch
import torch.nn as nn

from .calibration import HOLDOUT, MIN_HOLDOUT
from .distributed import SINGLE, Ranks
from .methods.zipit import ALPHA, BETA
from .report import SilentReporter

FALLBACK = (ALPHA.default, BETA.default)    # the paper's values, used when nothing can be searched
TUNING_MACS = 2.5e11        # tuning may always spend this many multiply-accumulates (seconds on a CPU) ...
TUNING_SHARE = 0.3          # ... or this share of the calibration pass's, if that is more
MIN_SEARCH = 128            # a search needs this many held-out images (the final comparison's evidence)
KEEP = 4                    # candidates that go on to round 2 (on a quarter of the held-out images)
TOP_BETAS = 2               # round 1 scores every alpha of this many betas, the best with one alpha each
CHUNK = 32                  # held-out images per forward chunk
BN_IMAGES = 64              # fit images each candidate's BatchNorm is reset on (one chunk) before it is scored
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
    alphas = ALPHA.grid if alpha is None else (alpha,)      # the grids zipit's parameters declare
    betas = BETA.grid if beta is None else (beta,)
    grid = [Setting(a, b) for b in betas for a in alphas]
    if n_models == 2:
        grid = [s for s in grid if s.beta > 0 or s.alpha == alphas[-1]]
    return grid


def _beta_rows(settings: Sequence[Setting]) -> dict[float, list[int]]:
    """Indices of ``settings`` by beta, in order of first appearance."""
    rows: dict[float, list[int]] = {}
    for i, s in enumerate(settings):
        rows.setdefault(s.beta, []).append(i)
    return rows


def _first_wave(settings: Sequence[Setting]) -> dict[float, int]:
    """Round 1's first wave: for each beta one setting, with the paper's alpha where the grid has it."""
    return {b: next((i for i in idx if settings[i].alpha == FALLBACK[0]), idx[0])
            for b, idx in _beta_rows(settings).items()}


def screened_count(settings: Sequence[Setting]) -> int:
    """Most settings round 1 scores: one per beta, then the other alphas of the ``TOP_BETAS`` best betas."""
    others = sorted((len(idx) - 1 for idx in _beta_rows(settings).values()), reverse=True)
    return len(_beta_rows(settings)) + sum(others[:TOP_BETAS])


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

    def first(self, n: int) -> "HeldOut":
        return HeldOut(self.images[:n], [t[:n] for t in self.targets])

    def joined(self, more: "HeldOut") -> "HeldOut":
        """These images, then ``more``'s."""
        return HeldOut(torch.cat([self.images, more.images]),
                       [torch.cat([a, b]) for a, b in zip(self.targets, more.targets)])


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

    @property
    def looks(self) -> tuple[int, ...]:
        """Held-out images behind each look of the final comparison: half of them first, and all of
        them only if that look is undecided (when half is still a search's worth)."""
        return (self.held // 2, self.held) if self.compare and self.held // 2 >= MIN_SEARCH else (self.held,)

    def to_metadata(self) -> dict:
        return {"held_out_images": self.held, "rounds": list(self.rounds), "compare_with_permute": self.compare,
                "looks": list(self.looks), "gmacs": round(self.macs / 1e9, 3),
                "budget_gmacs": round(self.budget / 1e9, 3)}


def tuning_budget(calibration_macs: float) -> float:
    """Multiply-accumulates tuning may spend: a fixed allowance, or a share of the calibration pass."""
    return max(TUNING_MACS, TUNING_SHARE * calibration_macs)


def plan_tuning(budget: float, source_macs: float, merged_macs: float, available: int, n_settings: int,
                compare: bool) -> TuningPlan:
    """The richest plan within ``budget``: two search rounds, else one, on at least ``MIN_SEARCH``
    held-out images, as many as fit; else no search (the fixed setting against permute) on as
    many held-out images as fit; else nothing.

    ``source_macs``: all sources together, per image; ``merged_macs``: the merged model per image;
    ``available``: held-out images there are; ``n_settings``: candidates in round 1
    (``screened_count``). The cost counts every held-out image, as if the final comparison
    needed its second look.
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
    the held-out images: a candidate that goes on to more images is only run on the new ones.

    With several heads, head i is only run on the images source i claims (the callable takes
    ``rows``, as ``MergedModel`` does): the criterion reads nothing else. Its other rows stay 0.
    """

    def __init__(self, model: Callable[..., list[torch.Tensor]]):
        self.model = model
        self.logits: list[list[torch.Tensor]] = []     # per chunk, per head

    @torch.no_grad()
    def upto(self, held: HeldOut, n: int) -> list[torch.Tensor]:
        """Each head's logits on the first ``n`` held-out images (on the images its source claims)."""
        heads, done = len(held.targets), sum(len(c[0]) for c in self.logits)
        owner = claims([t[:n] for t in held.targets]) if heads > 1 and n > done else None
        for lo in range(done, n, CHUNK):
            x = held.images[lo:min(lo + CHUNK, n)]
            if owner is None:
                self.logits.append([o.detach() for o in self.model(x)[:heads]])
                continue
            rows = [(owner[lo:lo + len(x)] == i).nonzero().squeeze(1) for i in range(heads)]
            chunk = []
            for r, target, out in zip(rows, held.targets, self.model(x, rows=rows)):
                full = x.new_zeros(len(x), target.shape[1])
                if out is not None:
                    full[r] = out.detach().to(full.dtype)
                chunk.append(full)
            self.logits.append(chunk)
        return [torch.cat([c[i] for c in self.logits])[:n] for i in range(heads)]


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
    unscreened: list[Setting] = field(default_factory=list)    # left out by round 1's second wave

    def to_metadata(self) -> dict:
        return {"criterion": "mean KL divergence of each head from its source on the held-out images that source "
                             "claims (lower is better)",
                "held_out_images": self.held_out, "reason": self.reason,
                **({} if self.plan is None else {"plan": self.plan.to_metadata()}),
                "chosen": {"alpha": self.chosen.alpha, "beta": self.chosen.beta},
                "screening": f"round 1 scores one alpha per beta ({FALLBACK[0]:g} where the grid has it), then "
                             f"every alpha of the {TOP_BETAS} best betas",
                "candidates": [{"alpha": t.setting.alpha, "beta": t.setting.beta, "score": round(t.score, 6),
                                "images": t.images,
                                **({} if t.screen_score is None else {"screen_score": round(t.screen_score, 6)})}
                               for t in self.trials],
                "not_screened": [{"alpha": u.alpha, "beta": u.beta} for u in self.unscreened]}


@dataclass
class MethodChoice:
    """The default's choice between permute and zipit's best setting, and the evidence for it.

    Permute is the simpler method and wins unless zipit's mean divergence on the held-out images
    is lower by more than the score's noise: the whole paired-bootstrap interval of
    (zipit - permute) must lie below 0. With two looks (half the held-out images, then all of
    them only if the first is undecided) each interval is at ``1 - (1 - LEVEL) / 2``, so that
    looking twice does not make zipit likelier to win by chance.
    """

    method: str
    setting: Setting
    zipit: float | None = None          # mean per-image divergence on the held-out images
    permute: float | None = None
    interval: tuple[float, float] | None = None
    images: int = 0
    reason: str = ""                    # why there is no evidence, if there is none
    level: float = 0.95
    looks: tuple[int, ...] = ()         # held-out images each planned look reads

    @classmethod
    def from_divergences(cls, setting: Setting, zipit: torch.Tensor, permute: torch.Tensor, level: float = 0.95,
                         looks: tuple[int, ...] = ()) -> "MethodChoice":
        lo, hi = paired_interval(zipit, permute, level)
        return cls("zipit" if hi < 0 else "permute", setting, float(zipit.mean()), float(permute.mean()),
                   (lo, hi), len(zipit), level=level, looks=looks or (len(zipit),))

    @property
    def decided(self) -> bool:
        """The interval lies wholly on one side of 0: more images would hardly change the choice."""
        return self.interval is not None and (self.interval[1] < 0 or self.interval[0] > 0)

    @classmethod
    def without_evidence(cls, setting: Setting, why: str = "") -> "MethodChoice":
        return cls("permute", setting, reason=why or "no held-out images")

    def to_metadata(self) -> dict:
        """The record for the merged file (``wording.choice_rule`` and ``choice_evidence`` say it in words)."""
        if self.interval is None:
            return {"chosen": self.method, "looks": list(self.looks), "level": self.level,
                    "reason": f"{self.reason}: no evidence against permute"}
        return {"chosen": self.method, "looks": list(self.looks), "held_out_images": self.images, "level": self.level,
                "zipit": {"alpha": self.setting.alpha, "beta": self.setting.beta, "divergence": round(self.zipit, 6)},
                "permute": {"divergence": round(self.permute, 6)},
                "difference": round(self.zipit - self.permute, 6),
                "interval": [round(self.interval[0], 6), round(self.interval[1], 6)]}


LEVEL = 0.95                # the comparison's confidence, over all of its looks


def search(prepare: Callable[[Setting], tuple[Hashable, Callable[[], nn.Module]]], held: HeldOut,
           settings: Sequence[Setting], plan: TuningPlan, fallback: Setting,
           permute: Callable[[], nn.Module] | None = None, report=None, ranks: Ranks = SINGLE,
           more: Callable[[], HeldOut] | None = None) -> TuningResult:
    """Successive halving over ``settings``, then, with ``permute``, the default's final comparison.

    ``prepare(setting)`` gives a key for the setting's matching and a function that builds
    the model; settings that match alike share one score. Round 1 scores candidates on the
    first ``plan.rounds[0]`` held-out images (the held-out order is random) in two waves: one
    setting per beta (``_first_wave``), then every other alpha of the ``TOP_BETAS`` best betas;
    the rest are not scored. The ``KEEP`` best go on to the first ``plan.rounds[1]`` (their
    round-1 logits reused); the best of the last round is zipit's setting (``fallback`` when
    the plan has no rounds). With ``permute`` (builder of the permute merge) that setting and
    permute are then compared image by image over ``plan.looks`` (``held`` holds the first
    look's images, ``more()`` all of them), for ``MethodChoice``. The lowest divergence wins,
    ties go to the earlier setting. With several ``ranks`` the candidates are dealt out and the
    scores summed, so that every rank ends with the same result. ``report``: a progress bar
    per wave and round, and one for the final comparison.
    """
    report = report or SilentReporter()
    mine: dict[int, _Scored] = {}           # this rank's candidates, by index among the distinct ones
    trials: list[Trial] = []
    unscreened: list[Setting] = []
    winner, chosen, owner = None, fallback, 0
    if plan.rounds:
        keys, makers = [], {}
        for s in settings:
            key, make = prepare(s)
            keys.append(key)
            makers.setdefault(key, make)
        distinct = list(makers)             # in order of first appearance
        first = [keys.index(k) for k in distinct]
        of = [distinct.index(k) for k in keys]

        def scored_on(size: int, entrants: list[int], title: str, by_setting: bool = False) -> dict[int, float]:
            """Each entrant's score on the first ``size`` images; progress counts the settings an
            entrant stands for (``by_setting``) or entrants."""
            local, weight = {}, [keys.count(distinct[j]) if by_setting else 1 for j in entrants]

            def run() -> None:
                for j, w in zip(entrants, weight):
                    if ranks.owns(j):
                        if j not in mine:
                            mine[j] = _Scored(makers[distinct[j]]())
                        local[j] = score(mine[j].upto(held, size), [t[:size] for t in held.targets])
                    report.advance(w)

            report.start(title, sum(weight))
            try:
                ranks.together(run)
            finally:
                report.done()
            return dict(zip(entrants, _gathered(local, entrants, ranks, held.images.device)))

        size, rows, anchors = plan.rounds[0], _beta_rows(settings), _first_wave(settings)
        wave = list(dict.fromkeys(of[i] for i in anchors.values()))
        scored = scored_on(size, wave, "tuning round 1 (per beta)", by_setting=True)
        best = sorted(rows, key=lambda b: (scored[of[anchors[b]]], anchors[b]))[:TOP_BETAS]
        wave = [j for j in dict.fromkeys(of[i] for b in best for i in rows[b]) if j not in scored]
        if wave:
            scored.update(scored_on(size, wave, "tuning round 1 (best betas)", by_setting=True))
        rounds = [scored]
        alive = sorted(scored, key=lambda j: (scored[j], first[j]))[:KEEP]
        for r, size in enumerate(plan.rounds[1:], start=2):
            for j in [j for j in mine if j not in alive]:
                del mine[j]                 # out of the running: free its model
            scored = scored_on(size, alive, f"tuning round {r}")
            rounds.append(scored)
            alive = sorted(alive, key=lambda j: (scored[j], first[j]))[:KEEP]
        owner = alive[0]
        for j in [j for j in mine if j != owner]:
            del mine[j]
        winner, chosen = mine.get(owner), settings[first[owner]]
        for s, j in zip(settings, of):
            if j not in rounds[0]:
                unscreened.append(s)
                continue
            last = max(r for r, sc in enumerate(rounds) if j in sc)
            trials.append(Trial(s, rounds[last][j], plan.rounds[last], rounds[0][j] if last else None))
    choice = None
    if permute is not None:
        zipit = (lambda: winner) if plan.rounds else (lambda: _Scored(prepare(fallback)[1]()))   # no search:
        report.start("zipit vs permute", 2 * len(plan.looks))                                     # fixed setting
        try:
            choice = _compare(zipit, chosen, permute, held, more or (lambda: held), plan.looks, owner, ranks,
                              report.advance)
        finally:
            report.done()
        if trials:                          # the winner's score is now on the comparison's held-out images
            trials = [Trial(t.setting, choice.zipit, choice.images, t.screen_score if t.screen_score is not None
                            else t.score) if of[settings.index(t.setting)] == owner else t for t in trials]
    return TuningResult(trials, chosen, plan.held, plan=plan, choice=choice, unscreened=unscreened,
                        reason="" if plan.rounds else "the tuning budget leaves no room to search alpha and beta")


def _compare(zipit: Callable[[], _Scored], setting: Setting, permute: Callable[[], nn.Module], held: HeldOut,
             more: Callable[[], HeldOut], looks: tuple[int, ...], owner: int, ranks: Ranks,
             advance: Callable[[int], None] = lambda n: None) -> "MethodChoice":
    """zipit's best (``zipit()``, on the rank that owns it) against permute, image by image: on the
    first ``looks[0]`` held-out images, then, if that is undecided, on the first ``looks[1]``
    (read by ``more()``; fewer if some were unreadable)."""
    built: dict[int, _Scored] = {}
    level = 1 - (1 - LEVEL) / len(looks)
    for k, size in enumerate(looks):
        if k:
            held = more()
        size = min(size, len(held.images))
        targets = [t[:size] for t in held.targets]
        local = torch.zeros(2, size, dtype=torch.float64, device=held.images.device)   # nccl sums on the GPU

        def work() -> None:
            for row, (rank, build) in enumerate(((owner, zipit), (owner + 1, lambda: _Scored(permute())))):
                if ranks.owns(rank):
                    if row not in built:
                        built[row] = build()
                    local[row] = image_divergences(built[row].upto(held, size), targets)
                advance(1)

        ranks.together(work)
        both = ranks.sum(local).cpu()
        choice = MethodChoice.from_divergences(setting, both[0], both[1], level, looks)
        if choice.decided:
            break
    return choice


def _gathered(local: dict[int, float], keys: list[int], ranks: Ranks, device) -> list[float]:
    """Every rank's scores of ``keys`` (each scored by one rank), on every rank (summed on ``device``:
    nccl sums GPU tensors only)."""
    return ranks.sum(torch.tensor([local.get(k, 0.0) for k in keys], dtype=torch.float64, device=device)).tolist()


def tune(prepare: Callable[[Setting], tuple[Hashable, Callable[[], nn.Module]]], held: HeldOut | None,
         settings: Sequence[Setting], fallback: Setting, plan: TuningPlan, report,
         permute: Callable[[], nn.Module] | None = None, ranks: Ranks = SINGLE,
         more: Callable[[], HeldOut] | None = None) -> TuningResult:
    """Run ``plan`` on ``held`` (the first look's held-out images; ``more()``: all of them) with
    progress on ``report``; without a held-out set, the fallback with the reason. The caller
    renders the result (``TuningResult.to_metadata``)."""
    if held is None or plan.held == 0:
        why = (f"scoring even {MIN_HOLDOUT} held-out images would cost more than the tuning budget "
               f"({plan.budget / 1e9:.0f} GMAC)" if plan.held == 0 and plan.available >= MIN_HOLDOUT else
               f"too few readable calibration images to hold out {MIN_HOLDOUT}")
        return TuningResult([], fallback, 0, reason=why, plan=plan)
    return search(prepare, held, settings, plan, fallback, permute, report, ranks, more)
