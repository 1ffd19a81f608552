"""Naive matchers written straight from the definitions, as oracles for the fast ones (small sizes only).

The zipit oracle keeps explicit groups (sets of features) and, at every step,
scans every pair of live groups for the best allowed similarity: no cached best
columns, no -inf tricks, no replay. A group's similarity to another is defined
recursively: when groups G and H merge, sim(G+H, K) = f(min(sim(G, K), sim(H, K)))
with f(x) = alpha * x for x > 0 (x otherwise), taken on rows and mirrored; with
alpha 0 a merged group never merges again. Budget rules are an explicit set of
forbidden pairs, inherited by merged groups and dropped when the budget is lifted.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment


def naive_match_zipit(corr: np.ndarray, n_models: int, alpha: float, beta: float):
    """(assign, within merges, budget lifted) for zipit's greedy matching, by full scans."""
    big_n = corr.shape[0]
    o = big_n // n_models
    model_of = [k // o for k in range(big_n)]
    sim = {}
    for a in range(big_n):
        for b in range(big_n):
            v = float(corr[a, b])
            sim[a, b] = v if math.isfinite(v) else 0.0
    groups = {k: {k} for k in range(big_n)}          # representative (smallest index) -> members
    closed = set()                                     # alpha 0: groups that may not merge again
    budget = {m: math.floor(beta * (n_models - 1) * o / n_models + 1e-9) for m in range(n_models)}
    forbidden = set()

    def pure(g):
        models = {model_of[k] for k in groups[g]}
        return models.pop() if len(models) == 1 else None

    def forbid_pure_pairs(m):
        reps = [g for g in groups if pure(g) == m]
        forbidden.update((a, b) for a in reps for b in reps if a != b)

    for m in range(n_models):
        if budget[m] == 0:
            forbid_pure_pairs(m)
    within, lifted = 0, False
    while len(groups) > o:
        best = None
        for a in sorted(groups):                         # row-major scan: first best pair wins ties
            for b in sorted(groups):
                if a == b or a in closed or b in closed or (a, b) in forbidden:
                    continue
                if best is None or sim[a, b] > sim[best]:
                    best = (a, b)
        if best is None:                                 # only forbidden pairs remain: lift the budget
            assert not lifted, "ran out of pairs"
            lifted = True
            forbidden.clear()
            continue
        i, j = min(best), max(best)
        pi, pj = pure(i), pure(j)
        for k in groups:
            if k in (i, j):
                continue
            v = min(sim[i, k], sim[j, k])                 # the merged group's row, mirrored to its column
            sim[i, k] = sim[k, i] = alpha * v if v > 0 else v
            if (i, k) in forbidden or (j, k) in forbidden:
                forbidden.update({(i, k), (k, i)})
        groups[i] |= groups.pop(j)
        if alpha == 0:
            closed.add(i)
        if pi is not None and pi == pj:
            within += 1
            budget[pi] -= 1
            if budget[pi] == 0:
                forbid_pure_pairs(pi)
    order = sorted(groups)
    assign = np.empty(big_n, dtype=np.int64)
    for index, g in enumerate(order):
        for k in groups[g]:
            assign[k] = index
    return assign.reshape(n_models, o), within, lifted


def naive_match_permute(corr: np.ndarray, n_models: int) -> np.ndarray:
    """Every model matched onto the first by linear sum assignment, straight from scipy."""
    o = corr.shape[0] // n_models
    assign = np.empty((n_models, o), dtype=np.int64)
    assign[0] = np.arange(o)
    for i in range(1, n_models):
        block = np.nan_to_num(corr[:o, i * o:(i + 1) * o], nan=0.0, posinf=0.0, neginf=0.0)
        rows, cols = linear_sum_assignment(block, maximize=True)
        assign[i, cols] = rows
    return assign
