"""The zipit matcher as it was before the speed-up (commit 79741d3), kept verbatim as an oracle.

tests/test_matching.py checks that the fast matcher returns exactly what this one returns.
"""
from __future__ import annotations

import numpy as np

from zipcli.errors import ZipitError
from zipcli.matching import Match, _check, same_model_budget


def _reference_match_zipit(corr: np.ndarray, n_models: int, alpha: float = 0.3, beta: float = 0.125) -> Match:
    """ZipIt! greedy matching over the concatenated features of all models.

    Repeatedly merges the most correlated pair of groups (within or across
    models) until O groups remain. A merged group correlates with others as
    the minimum of its members' correlations, scaled by ``alpha`` (repeated
    matching); ``alpha`` 0 forbids merging a group twice. Merging two groups
    drawn only from model m is a within-model merge; each model may make
    ``same_model_budget(beta)`` of them. Pairs the budget rules out are
    forbidden, and a group inherits its members' forbidden pairs, just as it
    inherits their minimum similarity. If only forbidden pairs remain (possible
    with three or more models) the budget is lifted and ``budget_lifted`` says so.

    Each row's best column is cached and only rows whose best pair was touched
    are searched again, so a step costs O(N) instead of O(N^2).
    """
    o = _check(corr, n_models)
    if not 0 <= alpha <= 1:
        raise ZipitError(f"--alpha {alpha} is out of range", "alpha must lie in [0, 1]")
    if not 0 <= beta <= 1:
        raise ZipitError(f"--beta {beta} is out of range", "beta must lie in [0, 1]")
    if alpha == 0 and n_models > 2:
        raise ZipitError("--alpha 0 cannot merge more than two models (groups must grow past pairs)",
                         "use an alpha in (0, 1], e.g. 0.3")
    big_n = n_models * o
    sim = np.array(corr, dtype=np.float64, copy=True)
    sim[~np.isfinite(sim)] = 0.0
    np.fill_diagonal(sim, -np.inf)
    owner = np.repeat(np.arange(n_models), o)       # model of a pure group; -1 mixed; -2 merged away
    budget = np.full(n_models, same_model_budget(beta, n_models, o))
    forbidden = np.zeros((big_n, big_n), dtype=bool)  # pairs the budget rules out (inherited like -inf)
    for m in range(n_models):
        if budget[m] == 0:
            forbidden[m * o:(m + 1) * o, m * o:(m + 1) * o] = True
    forbidden_any = [bool(forbidden.any())]
    group = np.arange(big_n)                         # current group (its surviving row) of each feature
    best_col = np.zeros(big_n, dtype=np.int64)
    best_val = np.full(big_n, -np.inf)
    relaxed = False                                  # set if the budget ever had to be lifted

    def refresh(rows: np.ndarray) -> None:
        mask = None if relaxed or not forbidden_any[0] else forbidden[rows]
        cand = sim[rows] if mask is None or not mask.any() else np.where(mask, -np.inf, sim[rows])
        best_col[rows] = cand.argmax(1)
        best_val[rows] = cand[np.arange(len(rows)), best_col[rows]]
        best_val[rows[owner[rows] == -2]] = -np.inf

    refresh(np.arange(big_n))
    within = 0
    for _ in range(big_n - o):
        i = int(best_val.argmax())
        if not np.isfinite(best_val[i]):
            if relaxed:
                raise ZipitError("zipit matching ran out of pairs", "use --method permute")
            relaxed = True                           # only budget-forbidden pairs remain: lift the budget
            refresh(np.flatnonzero(owner != -2))
            i = int(best_val.argmax())
        j = int(best_col[i])
        i, j = min(i, j), max(i, j)
        is_within = owner[i] >= 0 and owner[i] == owner[j]
        group[group == j] = i
        merged = np.minimum(sim[i], sim[j])
        merged = np.where(merged > 0, alpha * merged, merged) if alpha > 0 else np.full_like(merged, -np.inf)
        sim[i, :] = merged
        sim[:, i] = merged
        sim[i, i] = sim[j, :] = sim[:, j] = -np.inf
        if forbidden_any[0]:
            forbidden[i, :] |= forbidden[j, :]
            forbidden[:, i] = forbidden[i, :]
        stale = (best_col == i) | (best_col == j)
        stale[i] = True
        if is_within:
            within += 1
            m = owner[i]
            budget[m] -= 1
            if budget[m] == 0:
                pure = np.flatnonzero(owner == m)
                forbidden[np.ix_(pure, pure)] = True
                forbidden_any[0] = True
                stale[pure] = True
        else:
            owner[i] = -1
        owner[j] = -2
        best_val[j] = -np.inf
        stale[j] = False
        refresh(np.flatnonzero(stale))
    survivors = np.unique(group)
    index = np.searchsorted(survivors, group)
    return Match(index.reshape(n_models, o).astype(np.int64), within, big_n - o, relaxed)


def _reference_match_permute(corr: np.ndarray, n_models: int) -> Match:
    """match_permute as it was before the speed-up."""
    from scipy.optimize import linear_sum_assignment

    o = _check(corr, n_models)
    assign = np.empty((n_models, o), dtype=np.int64)
    assign[0] = np.arange(o)
    for i in range(1, n_models):
        block = np.nan_to_num(corr[:o, i * o:(i + 1) * o], nan=0.0)
        rows, cols = linear_sum_assignment(block, maximize=True)
        assign[i, cols] = rows
    return Match(assign, 0, (n_models - 1) * o)
