"""Label-free choice of zipit's alpha and beta: the search, its screening and its finalists.

A part of the calibration images is held out (``calibration.split_holdout``). Each candidate setting is merged
(from correlations measured once on the rest), and scored by how closely each
head of the merged model reproduces its own source model on the held-out
images that source is most confident about (its own task's images, as far as
can be told without labels). Nothing here can see labels: the held-out set is images and the source
models' outputs, nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Sequence

import torch
import torch.nn as nn

from .calibration import MIN_HOLDOUT
from .distributed import SINGLE, Ranks

MAX_BN_IMAGES = 64          # images for each candidate's BatchNorm reset (its cost dominates screening)
FALLBACK = (0.3, 0.125)     # the paper's defaults, used when nothing can be held out
SCREEN_EVERY = 4            # candidates are first scored on every 4th held-out image (files are sorted by
                            # folder, so a stride samples every class) ...
FINALISTS = 4               # ... and the best 4 distinct matchings again on all of them
MIN_SCREEN = 64             # screening only when its stride holds this many images (else all score on all)


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


@torch.no_grad()
def head_outputs(model: nn.Module, images: torch.Tensor, n_heads: int, chunk: int = 32) -> list[torch.Tensor]:
    outputs = [model(x) for x in images.split(chunk)]
    return [torch.cat([o[i] for o in outputs]) for i in range(n_heads)]


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
class Trial:
    setting: Setting
    score: float
    images: int                 # held-out images behind the score (screened-out candidates: fewer)
    screen_score: float | None = None   # the score on the screening stride (finalists: before re-scoring)


@dataclass
class TuningResult:
    trials: list[Trial]
    chosen: Setting
    held_out: int
    reason: str = ""            # why tuning fell back, if it did

    def to_metadata(self) -> dict:
        return {"criterion": "mean KL divergence of each head from its source on the held-out images that source "
                             "claims (lower is better)",
                "held_out_images": self.held_out, "reason": self.reason,
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

    @classmethod
    def from_divergences(cls, setting: Setting, zipit: torch.Tensor, permute: torch.Tensor) -> "MethodChoice":
        lo, hi = paired_interval(zipit, permute, LEVEL)
        return cls("zipit" if hi < 0 else "permute", setting, float(zipit.mean()), float(permute.mean()),
                   (lo, hi), len(zipit))

    @classmethod
    def without_evidence(cls, setting: Setting) -> "MethodChoice":
        return cls("permute", setting)

    def to_metadata(self) -> dict:
        rule = (f"permute unless zipit's mean divergence is lower with the whole {LEVEL:.0%} paired-bootstrap "
                "interval of the difference below 0")
        if self.interval is None:
            return {"chosen": self.method, "rule": rule, "reason": "no held-out images: no evidence against permute"}
        return {"chosen": self.method, "rule": rule, "held_out_images": self.images,
                "zipit": {"alpha": self.setting.alpha, "beta": self.setting.beta, "divergence": round(self.zipit, 6)},
                "permute": {"divergence": round(self.permute, 6)},
                "difference": round(self.zipit - self.permute, 6),
                "interval": [round(self.interval[0], 6), round(self.interval[1], 6)]}


LEVEL = 0.95


def search(prepare: Callable[[Setting], tuple[Hashable, Callable[[], nn.Module]]], held: HeldOut,
           settings: Sequence[Setting], on_screened: Callable[[int], None] | None = None,
           ranks: Ranks = SINGLE) -> TuningResult:
    """Score every setting; the lowest score wins, ties go to the earlier setting.

    ``prepare(setting)`` gives a key for the setting's matching and a function
    that builds the model; settings that match alike share one score. When the
    held-out set is large enough, every candidate is first screened on a stride
    of it and only the ``FINALISTS`` best are scored on all of it: the scoring
    passes are most of tuning's cost, and a screened-out candidate is rarely close.
    With several ``ranks`` the distinct candidates are dealt out among them and
    the scores summed, so every rank ends with the same result. ``on_screened(k)``:
    k more settings are screened (progress).
    """
    n = len(held.targets)
    stride = SCREEN_EVERY if len(held.images) // SCREEN_EVERY >= MIN_SCREEN else 1
    screen_images, rest_images = held.images[::stride], _rest(held.images, stride)
    screen_targets = [t[::stride] for t in held.targets]
    keys, makers = [], {}
    for s in settings:
        key, make = prepare(s)
        keys.append(key)
        makers.setdefault(key, make)
    distinct = list(makers)                 # in order of first appearance
    first = {key: keys.index(key) for key in distinct}
    mine: dict[Hashable, dict] = {}         # this rank's candidates: score, first index, screen logits, model

    def screen() -> None:
        for j, key in enumerate(distinct):
            if ranks.owns(j):
                model = makers[key]()
                heads = head_outputs(model, screen_images, n)
                mine[key] = {"score": score(heads, screen_targets), "first": first[key], "heads": heads, "model": model}
                for e in _ranked(mine)[FINALISTS if stride > 1 else len(mine):]:
                    e["model"] = None       # can no longer be a finalist: free it
            if on_screened:             # the settings this matching stands for
                on_screened(keys.count(key))

    ranks.together(screen)
    scores = dict(zip(distinct, _gathered(mine, distinct, ranks)))
    trials = [Trial(s, scores[k], len(screen_images), scores[k]) for s, k in zip(settings, keys)]
    if stride > 1:
        finalists = sorted(distinct, key=lambda k: (scores[k], first[k]))[:FINALISTS]
        targets = [torch.cat([a, _rest(t, stride)]) for a, t in zip(screen_targets, held.targets)]

        def final() -> None:
            for key in finalists:
                if key in mine:
                    e = mine[key]
                    rest = head_outputs(e["model"], rest_images, n)
                    e["score"] = score([torch.cat([a, b]) for a, b in zip(e["heads"], rest)], targets)

        ranks.together(final)
        final_scores = dict(zip(finalists, _gathered({k: mine[k] for k in finalists if k in mine}, finalists, ranks)))
        trials = [Trial(t.setting, final_scores[k], len(held.images), t.screen_score) if k in final_scores else t
                  for t, k in zip(trials, keys)]
        finalists = [t for t in trials if t.images == len(held.images)]
    else:
        finalists = trials
    best = min(finalists, key=lambda t: t.score)   # min keeps the first of equal scores
    return TuningResult(trials, best.setting, len(held.images))


def _gathered(entries: dict[Hashable, dict], keys: list[Hashable], ranks: Ranks) -> list[float]:
    """Every rank's scores of ``keys`` (each scored by one rank), on every rank."""
    local = torch.tensor([entries[k]["score"] if k in entries else 0.0 for k in keys], dtype=torch.float64)
    return ranks.sum(local).tolist()


def _ranked(entries: dict) -> list[dict]:
    return sorted(entries.values(), key=lambda e: (e["score"], e["first"]))


def _rest(x: torch.Tensor, stride: int) -> torch.Tensor:
    """The rows of ``x`` not in ``x[::stride]``."""
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[::stride] = False
    return x[keep]


def tune(prepare: Callable[[Setting], tuple[Hashable, Callable[[], nn.Module]]], held: HeldOut | None,
         settings: Sequence[Setting], fallback: Setting, report, ranks: Ranks = SINGLE) -> TuningResult:
    """Search ``settings`` on ``held`` with progress on ``report``; without a held-out set, the
    fallback with the reason. The caller renders the result (``TuningResult.to_metadata``)."""
    if held is None:
        return TuningResult([], fallback, 0, reason=f"too few readable calibration images to hold out {MIN_HOLDOUT}")
    report.start("tuning alpha/beta", len(settings))
    try:
        return search(prepare, held, settings, on_screened=report.advance, ranks=ranks)
    finally:
        report.done()
