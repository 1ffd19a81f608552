"""The size dial (issue 29): a merged model of X times one source model's parameters, for X from 1
(every feature merged: the full zip) up to the number of models.

The extra width goes, one feature at a time, where it buys the most per parameter: the gain of
keeping one more feature of a space apart is ``1 - rho`` of the weakest member still merged in
permute's matching of that space (two standardized features averaged lose (1 - rho) / 2 each), its
cost the exact number of parameters one more merged channel adds there. Labels are never read. The
gains are method-independent on purpose: one set of widths per (stop, size) serves zipit, permute
and every tuning candidate alike.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from .measured import Calibration
from .errors import ZipitError
from .methods.permute import match_permute
from .zip import check_width

UNIT = "parameters"
SLACK = 0.01            # a size this far below the full zip's is told, not silently raised
MIN_GAIN = 1e-4         # a match this close to correlation 1 (a permuted copy, up to rounding) gains nothing


@dataclass(frozen=True)
class Term:
    """One parameter tensor's count: ``coef`` x (width of ``out``, if any) x (width of ``into``, if any)."""

    coef: int
    out: str | None
    into: str | None

    def count(self, widths: dict[str, int]) -> int:
        return self.coef * (widths[self.out] if self.out else 1) * (widths[self.into] if self.into else 1)


@dataclass(frozen=True)
class Allocation:
    """Widths for a size: those wider than one model's, and the parameter counts behind them."""

    asked: float
    widths: tuple[tuple[str, int], ...]
    params: int                  # the merged model's parameters at these widths
    floor: int                   # ... at the full zip (every width one model's)
    one: float                   # one source model's parameters (the unit of a size)

    @property
    def reached(self) -> float:
        return self.params / self.one


def one_model(cal: Calibration) -> float:
    """The unit of a size: one source model's parameters (the mean over the sources)."""
    return sum(sum(p.numel() for p in s.model.parameters()) for s in cal.sources) / len(cal.sources)


def resizable(cal: Calibration, stop: str) -> list[str]:
    """The spaces merged at ``stop`` that can change width (``zip.check_width``), less those the stop
    cuts: their unmerge in the heads is at one model's width."""
    out = []
    plan = cal.plan(stop)
    for s in plan.merged_spaces:
        if s in plan.cut_spaces:
            continue
        try:
            check_width(cal.graph, s, cal.graph.space_size[s] + 1, len(cal.sources))
        except ZipitError:
            continue
        out.append(s)
    return out


def terms(cal: Calibration, stop: str) -> list[Term]:
    """The merged model's parameter count at ``stop`` as a sum of terms in the widths of the spaces
    that can change width: the trunk's modules once, each head's own (a head reads the trunk's
    spaces with its first layers)."""
    graph, template = cal.graph, cal.template(stop)
    merged = set(resizable(cal, stop))
    out: list[Term] = []
    modules = [(n, m, True) for n, m in template.trunk.named_modules()]
    modules += [(n, m, False) for head in template.head_modules for n, m in head.named_modules()]
    for name, module, in_trunk in modules:
        writes = next((s for s, _ in graph.writes.get(name, []) if s in merged), None) if in_trunk else None
        reads = next((s for s, _ in graph.reads.get(name, []) if s in merged), None)
        for p in module.parameters(recurse=False):
            into = reads if p.dim() >= 2 else None
            coef = p.numel() // (graph.space_size[writes] if writes else 1) // (graph.space_size[into] if into else 1)
            out.append(Term(coef, writes, into))
    return out


def gains(cal: Calibration, space: str) -> np.ndarray:
    """``1 - rho`` of each member of permute's matching of ``space``, weakest first: the gain of
    keeping the next one apart (cached on the calibration: every size and candidate reuses it)."""
    key = ("size gains", space)
    if key not in cal.derived:
        n, o = len(cal.sources), cal.graph.space_size[space]
        corr = cal.correlations[space]
        anchors = match_permute(corr, n).assign[1:]
        cols = np.arange(o)[None, :] + o * np.arange(1, n)[:, None]
        rho = np.nan_to_num(corr[anchors, cols], nan=0.0, posinf=0.0, neginf=0.0).ravel()
        cal.derived[key] = 1.0 - np.sort(rho, kind="stable")
    return cal.derived[key]


def full_zip(cal: Calibration, stop: str) -> float:
    """The smallest size at ``stop``: its full zip's parameters, in one source model's."""
    return sum(t.count({s: cal.graph.space_size[s] for s in resizable(cal, stop)}) for t in terms(cal, stop)) \
        / one_model(cal)


def reaches(cal: Calibration, stop: str, size: float) -> bool:
    """Whether a merge at ``stop`` can be as small as ``size`` (within ``SLACK``); below, it is the full zip."""
    return size >= full_zip(cal, stop) * (1 - SLACK)


SPREADS = ("greedy", "weakest", "uniform")     # how the width is spread; the first is the default


def allocate(cal: Calibration, stop: str, size: float, spread: str = SPREADS[0]) -> Allocation:
    """Widths for ``size`` x one source model. ``greedy``: the feature with the largest gain per
    marginal parameter next; ``weakest``: the least correlated match next, whatever it costs (one
    correlation threshold for every space); both stop at the first feature that does not fit or gains
    nothing (``MIN_GAIN``), so a larger size never narrows a space. ``uniform``: the same share of
    each space's matches kept apart (the baseline a spread has to beat). Below the full zip's own
    size, the full zip."""
    if spread not in SPREADS:
        raise ZipitError(f"unknown spread {spread!r}", f"use one of {', '.join(SPREADS)}")
    graph, one = cal.graph, one_model(cal)
    widths = {s: graph.space_size[s] for s in resizable(cal, stop)}
    all_terms = terms(cal, stop)
    floor = sum(t.count(widths) for t in all_terms)
    budget = size * one
    if spread == "uniform":
        widths, total = _uniform(cal, widths, all_terms, budget)
    else:
        total = _greedy(cal, widths, all_terms, budget, spread == "greedy")
    if budget < floor * (1 - SLACK):
        cal.report.warn(f"size {size:g} is below the full zip's at stop {stop} ({floor / one:.3f}x one model): "
                        "merging at the full zip (a later stop shares more and is smaller)")
    wider = tuple((s, w) for s, w in widths.items() if w != graph.space_size[s])
    return Allocation(size, wider, total, floor, one)


def _greedy(cal: Calibration, widths: dict[str, int], all_terms: list[Term], budget: float, per_cost: bool) -> int:
    """Widen ``widths`` in place one feature at a time by gain (per marginal parameter if
    ``per_cost``); the parameter count reached."""
    total = sum(t.count(widths) for t in all_terms)
    by_space = {s: [t for t in all_terms if s in (t.out, t.into)] for s in widths}

    def cost(s: str) -> int:
        return sum(t.coef * ((widths[t.into] if t.into else 1) if t.out == s else (widths[t.out] if t.out else 1))
                   for t in by_space[s])

    def key(s: str, c: int) -> float:
        return -gains(cal, s)[taken[s]] / (max(c, 1) if per_cost else 1)

    taken = {s: 0 for s in widths}
    heap = []
    for s in widths:
        if len(gains(cal, s)):
            c = cost(s)
            heapq.heappush(heap, (key(s, c), c, s))
    while heap:
        _, c, s = heapq.heappop(heap)
        now = cost(s)
        if now != c and per_cost:                 # a neighbour grew since: requeue at its true price
            heapq.heappush(heap, (key(s, now), now, s))
            continue
        g = gains(cal, s)[taken[s]]
        if g <= MIN_GAIN or total + now > budget:
            break
        widths[s] += 1
        taken[s] += 1
        total += now
        if taken[s] < len(gains(cal, s)):
            c = cost(s)
            heapq.heappush(heap, (key(s, c), c, s))
    return total


def _uniform(cal: Calibration, base: dict[str, int], all_terms: list[Term], budget: float) -> tuple[dict, int]:
    """The largest share f (to 1e-4) such that keeping apart f of every space's matches (those that
    gain anything) fits the budget; the widths and their parameter count."""
    room = {s: int(np.count_nonzero(gains(cal, s) > MIN_GAIN)) for s in base}

    def at(f: float) -> dict[str, int]:
        return {s: base[s] + int(f * room[s]) for s in base}

    low, high = 0.0, 1.0
    if sum(t.count(at(high)) for t in all_terms) <= budget:
        low = high
    for _ in range(14):
        if low == high:
            break
        mid = (low + high) / 2
        low, high = (mid, high) if sum(t.count(at(mid)) for t in all_terms) <= budget else (low, mid)
    widths = at(low)
    return widths, sum(t.count(widths) for t in all_terms)


def record(cal: Calibration, stop: str, size: float, widths: dict[str, int], params: int) -> dict:
    """What the merged file says of its size: asked, reached and the full zip's (in one source
    model's parameters), and the merged model's MACs per image."""
    one = one_model(cal)
    floor = sum(t.count({s: cal.graph.space_size[s] for s in resizable(cal, stop)}) for t in terms(cal, stop))
    return {"asked": size, "reached": round(params / one, 4), "floor": round(floor / one, 4), "unit": UNIT,
            "macs": cal.merged_macs(stop, widths)}
