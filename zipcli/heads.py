"""Matching attention heads: whole heads first, then the features within each matched head.

A head's queries, keys and values only make sense together, so features must never move between
heads, and a block's query/key space and its value space must pair the same heads. Each model's
heads are assigned to the first model's by how well their features can be matched (the best
one-to-one correlation within each pair of heads, summed over the tied spaces); then the chosen
method runs on each merged head's features alone, so any method stays inside heads.
"""
from __future__ import annotations

import numpy as np

from . import methods
from .methods import Match


def _best_pairing(block: np.ndarray) -> float:
    """The largest sum of correlations of a one-to-one matching of two heads' features."""
    from scipy.optimize import linear_sum_assignment   # here: scipy costs a second to import

    block = np.nan_to_num(block, nan=0.0, posinf=0.0, neginf=0.0)
    rows, cols = linear_sum_assignment(block, maximize=True)
    return float(block[rows, cols].sum())


def head_orders(corrs: list[np.ndarray], n_models: int, heads: int) -> np.ndarray:
    """``order[i, a]``: the head of model i merged into head a (model 0's head a)."""
    from scipy.optimize import linear_sum_assignment

    order = np.tile(np.arange(heads), (n_models, 1))
    for i in range(1, n_models):
        score = np.zeros((heads, heads))
        for corr in corrs:
            o = corr.shape[0] // n_models
            d = o // heads
            for a in range(heads):
                for b in range(heads):
                    score[a, b] += _best_pairing(corr[a * d:(a + 1) * d, i * o + b * d:i * o + (b + 1) * d])
        rows, cols = linear_sum_assignment(score, maximize=True)
        order[i, rows] = cols
    return order


def match_heads(corrs: list[np.ndarray], n_models: int, heads: int, method: str, **params) -> list[Match]:
    """One ``Match`` per tied space (``corrs[s]``: its n models' correlation), in whole heads."""
    order = head_orders(corrs, n_models, heads)
    out = []
    for corr in corrs:
        o = corr.shape[0] // n_models
        d = o // heads
        parts = []
        for a in range(heads):
            index = np.concatenate([i * o + order[i, a] * d + np.arange(d) for i in range(n_models)])
            parts.append(methods.match(method, corr[np.ix_(index, index)], n_models, **params))
        out.append(_assemble(parts, order, d, n_models))
    return out


def _assemble(parts: list[Match], order: np.ndarray, d: int, n: int) -> Match:
    """Per-head matches (features of head ``order[i, a]`` -> merged head a) as one match of the space."""
    o = d * len(parts)
    if all(p.is_grouping for p in parts):
        assign = np.empty((n, o), dtype=np.int64)
        for a, p in enumerate(parts):
            for i in range(n):
                assign[i, order[i, a] * d:(order[i, a] + 1) * d] = a * d + p.assign[i]
        return Match(assign, sum(p.within_merges for p in parts), sum(p.total_merges for p in parts),
                     any(p.budget_lifted for p in parts))
    merge, unmerge = np.zeros((o, n * o)), np.zeros((n * o, o))
    for a, p in enumerate(parts):
        m, u = p.merge_matrix(), p.unmerge_matrix()
        for i in range(n):
            cols = slice(i * o + order[i, a] * d, i * o + (order[i, a] + 1) * d)
            merge[a * d:(a + 1) * d, cols] = m[:, i * d:(i + 1) * d]
            unmerge[cols, a * d:(a + 1) * d] = u[i * d:(i + 1) * d]
    return Match.dense(merge, unmerge)
