"""Matcher properties: greedy order, budgets, alpha, and the M/U invariants."""
from __future__ import annotations

import numpy as np
import pytest

from zipcli.errors import ZipitError
from zipcli.methods import match
from zipcli.methods.average import match_average
from zipcli.methods.permute import match_permute
from zipcli.methods.zipit import match_zipit, same_model_budget


def _corr(n_models: int, o: int, seed: int = 0, samples: int = 200) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((o, samples))
    feats = [base[rng.permutation(o)] + 0.7 * rng.standard_normal((o, samples)) for _ in range(n_models)]
    return np.corrcoef(np.concatenate(feats))


@pytest.mark.parametrize("method", ["zipit", "permute", "average"])
@pytest.mark.parametrize("n_models", [2, 3, 4])
def test_merge_and_unmerge_matrices(method, n_models):
    o = 12
    m = match(method, _corr(n_models, o), n_models, alpha=0.5, beta=0.25)
    big_m, big_u = m.merge_matrix(), m.unmerge_matrix()
    assert big_m.shape == (o, n_models * o) and big_u.shape == (n_models * o, o)
    np.testing.assert_allclose(big_m.sum(1), 1.0)
    np.testing.assert_allclose(big_m @ big_u, np.eye(o), atol=1e-12)
    assert set(np.unique(big_u)) <= {0.0, 1.0} and (big_u.sum(1) == 1).all()


def test_greedy_takes_the_best_remaining_pair_first():
    # Two models of 3 features: the best pair is (A2, B0) at 0.9, then (A0, B2) at 0.8, then (A1, B1).
    corr = np.eye(6)
    pairs = {(2, 3): 0.9, (0, 5): 0.8, (1, 4): 0.7, (0, 3): 0.85, (2, 5): 0.1}
    for (i, j), v in pairs.items():
        corr[i, j] = corr[j, i] = v
    m = match_zipit(corr, 2, alpha=0.0, beta=0.0)
    # (A2,B0) at 0.9 goes first, which rules out (A0,B0) at 0.85 even though it beats 0.8.
    assert m.assign[0, 2] == m.assign[1, 0]
    assert m.assign[0, 0] == m.assign[1, 2]
    assert m.assign[0, 1] == m.assign[1, 1]


def test_within_model_merge_when_budget_allows():
    corr = np.eye(4)
    corr[0, 1] = corr[1, 0] = 0.99   # A0 ~ A1 within model A
    corr[2, 3] = corr[3, 2] = 0.98   # B0 ~ B1 within model B
    corr[0, 2] = corr[2, 0] = 0.2
    with_budget = match_zipit(corr, 2, alpha=0.0, beta=1.0)
    assert with_budget.assign[0, 0] == with_budget.assign[0, 1] and with_budget.within_merges == 2
    without = match_zipit(corr, 2, alpha=0.0, beta=0.0)
    assert without.within_merges == 0
    assert without.assign[0, 0] != without.assign[0, 1]  # beta 0 forbids any within-model merge


@pytest.mark.parametrize("beta", [0.0, 0.125, 0.3, 1.0])
@pytest.mark.parametrize("n_models", [2, 3])
def test_beta_budget_is_respected(beta, n_models):
    o = 32
    corr = _corr(n_models, o, seed=3, samples=20)  # noisy: many tempting within-model pairs
    m = match_zipit(corr, n_models, alpha=0.5, beta=beta)
    # The budget holds even where greedy got stuck and had to say so (possible with more than two models only).
    assert m.within_merges <= n_models * same_model_budget(beta, n_models, o)
    assert not m.budget_lifted or n_models > 2
    assert m.total_merges == (n_models - 1) * o


def test_beta_zero_two_models_is_a_permutation():
    corr = _corr(2, 16, seed=5)
    m = match_zipit(corr, 2, alpha=0.0, beta=0.0)
    assert (m.counts() == 2).all() and sorted(m.assign[1]) == list(range(16))


def test_alpha_scales_repeated_matches():
    # With alpha 1 a merged pair keeps its members' minimum correlation; a third feature joins it.
    corr = np.eye(6)
    for i, j, v in [(0, 2, 0.95), (2, 4, 0.9), (0, 4, 0.9), (1, 3, 0.5), (3, 5, 0.5), (1, 5, 0.4)]:
        corr[i, j] = corr[j, i] = v
    # 3 models of 2 features: A=(0,1) B=(2,3) C=(4,5)
    full = match_zipit(corr, 3, alpha=1.0, beta=0.0)
    assert full.assign[0, 0] == full.assign[1, 0] == full.assign[2, 0]
    with pytest.raises(ZipitError, match="alpha 0"):
        match_zipit(corr, 3, alpha=0.0, beta=0.0)


def test_permute_is_optimal_and_average_is_identity():
    corr = _corr(2, 8, seed=7)
    m = match_permute(corr, 2)
    from scipy.optimize import linear_sum_assignment
    r, c = linear_sum_assignment(corr[:8, 8:], maximize=True)
    assert corr[:8, 8:][m.assign[1], np.arange(8)].sum() == pytest.approx(corr[:8, 8:][r, c].sum())
    assert (match_average(corr, 2).assign == np.arange(8)).all()


def test_out_of_range_hyperparameters_are_refused():
    with pytest.raises(ZipitError):
        match_zipit(np.eye(4), 2, alpha=1.5)
    with pytest.raises(ZipitError):
        match_zipit(np.eye(4), 2, beta=-0.1)
    with pytest.raises(ZipitError, match="unknown method"):
        match("nope", np.eye(4), 2)


# --- the fast matchers against naive ones written from the definitions (tests/reference_matching.py) ---

from reference_matching import naive_match_permute, naive_match_zipit  # noqa: E402


def _random_corr(rng: np.random.Generator, n_models: int, o: int, kind: str) -> np.ndarray:
    """Correlations of several flavours, ties and oddities included."""
    big_n = n_models * o
    x = rng.standard_normal((big_n, int(rng.integers(3, 60))))
    if kind == "dead":                               # constant features: NaN rows, many ties at 0
        x[rng.random(big_n) < 0.25] = 1.0
    if kind == "shared":                             # models share features up to noise, as in practice
        base = rng.standard_normal((o, x.shape[1]))
        x = np.concatenate([base[rng.permutation(o)] + 0.5 * x[m * o:(m + 1) * o] for m in range(n_models)])
    with np.errstate(all="ignore"):
        corr = np.corrcoef(x)
    if kind == "coarse":                             # few distinct values: ties everywhere
        corr = np.round(corr, 1)
    if kind == "asymmetric":                         # not a correlation, but both must agree anyway
        corr = corr + 0.05 * rng.standard_normal(corr.shape)
    if kind == "nonfinite":
        corr[rng.random(corr.shape) < 0.02] = rng.choice([np.inf, -np.inf, np.nan])
    return corr


KINDS = ["plain", "dead", "shared", "coarse", "asymmetric", "nonfinite"]


@pytest.mark.parametrize("n_models", [2, 3, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_zipit_matches_the_naive_full_scan(n_models, kind):
    rng = np.random.default_rng([n_models, KINDS.index(kind)])
    alphas = [0.0, 0.3, 0.5, 1.0] if n_models == 2 else [0.05, 0.3, 1.0]
    lifted = 0
    for _ in range(25):
        o = int(rng.integers(1, 25 // n_models + 1))
        alpha, beta = float(rng.choice(alphas)), float(rng.choice([0.0, 0.1, 0.125, 0.3, 0.5, 1.0]))
        corr = _random_corr(rng, n_models, o, kind)
        before = corr.copy()
        fast = match_zipit(corr, n_models, alpha, beta)
        assign, within, budget_lifted = naive_match_zipit(corr, n_models, alpha, beta)
        np.testing.assert_array_equal(corr, before)  # the input is left alone
        assert np.array_equal(fast.assign, assign), (o, alpha, beta)
        assert (fast.within_merges, fast.budget_lifted) == (within, budget_lifted)
        lifted += budget_lifted
    if n_models > 2 and kind in ("plain", "coarse"):
        assert lifted, "no case lifted the budget: that path went untested"


def test_alpha_below_one_changes_the_matching_as_the_oracle_says():
    # 3 models of 2 features. (A0, B0) merge first at 0.9; the pair then correlates with C0 as
    # alpha * min(0.8, 0.7). With alpha 1 that is 0.7 and beats (C0, C1) at 0.6, so C0 joins A0+B0;
    # with alpha 0.5 it is 0.35, so C0 merges with C1 first and the groups come out differently.
    corr = np.eye(6)
    for i, j, v in [(0, 2, 0.9), (0, 4, 0.8), (2, 4, 0.7), (4, 5, 0.6), (1, 3, 0.5), (3, 5, 0.2), (1, 5, 0.1)]:
        corr[i, j] = corr[j, i] = v
    full, half = match_zipit(corr, 3, 1.0, 1.0), match_zipit(corr, 3, 0.5, 1.0)
    assert full.assign[2, 0] == full.assign[0, 0] and half.assign[2, 0] == half.assign[2, 1]
    assert not np.array_equal(full.assign, half.assign)
    for alpha, fast in ((1.0, full), (0.5, half)):
        assert np.array_equal(fast.assign, naive_match_zipit(corr, 3, alpha, 1.0)[0])


@pytest.mark.parametrize("n_models", [2, 3, 4])
def test_permute_matches_the_naive_assignment(n_models):
    rng = np.random.default_rng(n_models)
    for kind in KINDS:
        for _ in range(5):
            o = int(rng.integers(2, 65))
            corr = _random_corr(rng, n_models, o, kind)
            fast, naive = match_permute(corr, n_models).assign, naive_match_permute(corr, n_models)
            blocks = [np.nan_to_num(corr[:o, i * o:(i + 1) * o], nan=0.0, posinf=0.0, neginf=0.0)
                      for i in range(n_models)]
            for i in range(1, n_models):             # equally good; identical unless tied
                got = blocks[i][fast[i], np.arange(o)].sum()
                assert got == pytest.approx(blocks[i][naive[i], np.arange(o)].sum(), rel=1e-12, abs=1e-9)
            if kind in ("plain", "shared", "asymmetric"):
                assert np.array_equal(fast, naive), kind
