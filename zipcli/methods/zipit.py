"""ZipIt!'s matching: greedy merges of the most correlated features, within or across models.

Every feature of the n models goes to one of O merged features (a grouping). Its
two parameters are the paper's: ``alpha`` weighs a merged group's correlations
(repeated matching) and ``beta`` is the share of merges allowed within one model.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import ZipitError
from .base import Match, Method, Param, check_shape, check_width

def check_zipit_params(alpha: float | None, beta: float | None, n_models: int) -> None:
    """The one check of zipit's alpha and beta (None: to be tuned), before any work."""
    for name, value in (("alpha", alpha), ("beta", beta)):
        if value is not None and not 0 <= value <= 1:
            raise ZipitError(f"{name} {value:g} is out of range", f"{name} (--{name}) must lie in [0, 1]")
    if alpha == 0 and n_models > 2:
        raise ZipitError("alpha 0 cannot merge more than two models (groups must grow past pairs)",
                         "use an alpha (--alpha) in (0, 1], e.g. 0.3")


def same_model_budget(beta: float, n_models: int, o: int) -> int:
    """Within-model merges each model may make: an equal share of beta of all merges."""
    return int(math.floor(beta * (n_models - 1) * o / n_models + 1e-9))


def match_zipit(corr: np.ndarray, n_models: int, alpha: float = 0.3, beta: float = 0.125,
                width: int | None = None) -> Match:
    """ZipIt! greedy matching over the concatenated features of all models.

    Repeatedly merges the most correlated pair of groups (within or across
    models) until O groups remain (or ``width`` groups: the weakest stay apart).
    A merged group correlates with others as
    the minimum of its members' correlations, scaled by ``alpha`` (repeated
    matching); ``alpha`` 0 forbids merging a group twice. Merging two groups
    drawn only from model m is a within-model merge; each model may make
    ``same_model_budget(beta)`` of them. Pairs the budget rules out are
    forbidden, and a group inherits its members' forbidden pairs, just as it
    inherits their minimum similarity. If only forbidden pairs remain (possible
    with three or more models) the budget is lifted and ``budget_lifted`` says so.

    Each row's best column is cached and only rows whose best pair was touched
    are searched again. To keep a step to one row and one column write:
    forbidden pairs are stored as -inf in the working matrix (the minimum then
    passes them on to a merged group by itself), merged-away columns are masked
    by a penalty vector instead of being overwritten, and lifting the budget
    rebuilds the matrix by replaying the merges on the true correlations.
    """
    o = check_shape(corr, n_models)
    check_zipit_params(alpha, beta, n_models)
    big_n = n_models * o
    width = check_width(width, o, n_models)
    sim = np.empty((big_n, big_n))
    penalty = np.zeros(big_n)                        # -inf on columns no row may pick any more
    merges: list[tuple[int, int]] = []

    def load() -> None:
        """The cleaned correlations, then the merges so far replayed on them (no budget)."""
        sim[...] = corr
        if not np.isfinite(sim.sum()):               # one cheap pass; the mask only when needed
            sim[~np.isfinite(sim)] = 0.0
        np.fill_diagonal(sim, -np.inf)
        for i, j in merges:
            combine(i, j)

    def combine(i: int, j: int) -> None:
        """Row and column i become the merged group's correlations (exact on live columns)."""
        row = sim[i]
        if alpha > 0:
            np.minimum(row, sim[j], out=row)
            np.multiply(row, alpha, out=row, where=row > 0)
            sim[:, i] = row
        else:
            row[:] = -np.inf                         # a merged pair never merges again
            penalty[i] = -np.inf

    def refresh(rows: np.ndarray, chunk: int = 32) -> None:
        """Best live column of each row; chunks bound the copies when many rows go stale at once."""
        for s in range(0, len(rows), chunk):
            r = rows[s:s + chunk]
            cand = sim[r]
            cand += penalty
            col = cand.argmax(1)
            best_col[r] = col
            best_val[r] = cand[np.arange(len(r)), col]

    relaxed = False                                  # set if the budget ever had to be lifted
    load()
    owner = np.repeat(np.arange(n_models), o)       # model of a pure group; -1 mixed; -2 merged away
    budget = np.full(n_models, same_model_budget(beta, n_models, o) if width == o     # beta: a share of the merges
                     else int(math.floor(beta * (big_n - width) / n_models + 1e-9)))
    for m in range(n_models):
        if budget[m] == 0:
            sim[m * o:(m + 1) * o, m * o:(m + 1) * o] = -np.inf
    best_col = np.zeros(big_n, dtype=np.int64)
    best_val = np.full(big_n, -np.inf)
    refresh(np.arange(big_n))
    within = 0
    for _ in range(big_n - width):
        i = int(best_val.argmax())
        if best_val[i] == -np.inf:
            if relaxed:
                raise ZipitError("zipit matching ran out of pairs", "use --method permute")
            relaxed = True                           # only budget-forbidden pairs remain: lift the budget
            load()
            refresh(np.flatnonzero(owner != -2))
            i = int(best_val.argmax())
        j = int(best_col[i])
        i, j = min(i, j), max(i, j)
        merges.append((i, j))
        combine(i, j)
        penalty[j] = -np.inf
        stale = (best_col == i) | (best_col == j)
        stale[i] = True
        if owner[i] >= 0 and owner[i] == owner[j]:   # within-model merge
            within += 1
            m = owner[i]
            budget[m] -= 1
            if budget[m] == 0:
                pure = owner == m                    # (never after a lift: such a group had a free pair)
                sim[np.ix_(pure, pure)] = -np.inf
                stale |= pure
        else:
            owner[i] = -1
        owner[j] = -2
        best_val[j] = -np.inf
        best_col[j] = -1                             # a dead row is never searched again
        stale[j] = False
        refresh(np.flatnonzero(stale))
    group = np.arange(big_n)                         # replay merges backwards: j ends where i ends
    for i, j in reversed(merges):
        group[j] = group[i]
    survivors = np.unique(group)
    index = np.searchsorted(survivors, group)
    return Match(index.reshape(n_models, o).astype(np.int64), within, big_n - width, relaxed)


def _check(params: dict, n_models: int) -> None:
    check_zipit_params(params.get("alpha"), params.get("beta"), n_models)


ALPHA = Param("alpha", 0.3, 0.0, 1.0, grid=(0.1, 0.3, 0.5, 1.0), option="--alpha",
              help="weight of an already merged feature's correlations (repeated matching)")
BETA = Param("beta", 0.125, 0.0, 1.0, grid=(0.0, 0.0625, 0.125, 0.25, 0.5), option="--beta",
             help="share of merges allowed within one model")
METHOD = Method("zipit", "ZipIt!: merge the most correlated features, within or across models (alpha, beta)",
                lambda corr, n_models, alpha=0.3, beta=0.125, width=None: match_zipit(corr, n_models, alpha, beta,
                                                                                       width),
                params=(ALPHA, BETA), extra_check=_check, partial=True)
