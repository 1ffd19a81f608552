"""What a merging method returns and what it declares; the pieces every method file shares.

A method turns the correlation of n models' features in one space into a ``Match``:
merge matrices M_i (n models' features -> the merged space) and unmerge matrices
U_i (merged space -> each model's features). A *grouping* (each feature goes to one
merged feature, M averages each group, U copies back) is stored as indices and
applied by index; any other method may return dense M and U.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class Match:
    """One space's merge. A grouping: ``assign[i, k]`` is the merged feature that feature k of
    model i goes to. Dense: ``dense_merge`` (O, n*O) and ``dense_unmerge`` (n*O, O)."""

    assign: np.ndarray | None = None        # (n_models, O) int64 for a grouping
    within_merges: int = 0                  # merges of two groups drawn only from one and the same model
    total_merges: int = 0
    budget_lifted: bool = False             # zipit got stuck under the beta budget and finished without it
    dense_merge: np.ndarray | None = None
    dense_unmerge: np.ndarray | None = None

    def __post_init__(self):
        if (self.assign is None) == (self.dense_merge is None or self.dense_unmerge is None):
            raise ValueError("a Match is either a grouping (assign) or dense (merge and unmerge matrices)")

    @classmethod
    def dense(cls, merge: np.ndarray, unmerge: np.ndarray) -> "Match":
        """A merge given by its matrices: ``merge`` (O, n*O), ``unmerge`` (n*O, O)."""
        if merge.ndim != 2 or unmerge.shape != merge.shape[::-1] or merge.shape[1] % merge.shape[0]:
            raise ValueError(f"merge {merge.shape} and unmerge {unmerge.shape} are not (O, n*O) and (n*O, O)")
        return cls(dense_merge=np.asarray(merge, dtype=np.float64), dense_unmerge=np.asarray(unmerge, dtype=np.float64))

    @property
    def is_grouping(self) -> bool:
        return self.assign is not None

    @property
    def size(self) -> int:
        return self.assign.shape[1] if self.is_grouping else self.dense_merge.shape[0]

    @property
    def n_models(self) -> int:
        return self.assign.shape[0] if self.is_grouping else self.dense_merge.shape[1] // self.size

    def counts(self) -> np.ndarray:
        """Members per merged feature (groupings only)."""
        return np.bincount(self.assign.ravel(), minlength=self.size)

    def merge_matrix(self) -> np.ndarray:
        """M, shape (O, n*O): for a grouping, row u averages the features of group u."""
        if not self.is_grouping:
            return self.dense_merge
        n, o = self.assign.shape
        m = np.zeros((o, n * o))
        m[self.assign.ravel(), np.arange(n * o)] = 1.0
        return m / self.counts()[:, None]

    def unmerge_matrix(self) -> np.ndarray:
        """U, shape (n*O, O): for a grouping, feature k is read back from its group's merged feature."""
        if not self.is_grouping:
            return self.dense_unmerge
        n, o = self.assign.shape
        u = np.zeros((n * o, o))
        u[np.arange(n * o), self.assign.ravel()] = 1.0
        return u

    def key(self) -> bytes:
        """Equal for equal merges (tuning scores each distinct merge once)."""
        return self.assign.tobytes() if self.is_grouping else self.dense_merge.tobytes() + self.dense_unmerge.tobytes()

    def mean_merged_correlation(self, corr: np.ndarray) -> float | None:
        """Mean correlation between members of the same group (groupings of pairs or more; else None)."""
        if not self.is_grouping:
            return None
        flat = self.assign.ravel()
        same = flat[:, None] == flat[None, :]
        np.fill_diagonal(same, False)
        return float(corr[same].mean()) if same.any() else float("nan")


@dataclass(frozen=True)
class Method:
    """A merging method as the pipeline sees it.

    ``match(corr, n_models, **params)`` gets the correlation of the n models'
    concatenated features in one space (an identity when ``needs_correlation`` is
    False and no images were read) and the values of ``params``; ``tunable`` are
    the parameters the default may choose on held-out images when left open.
    ``check(params, n_models)`` refuses bad values before any image is read.
    """

    name: str
    summary: str                                       # one line for --help and the docs
    match: Callable[..., Match]
    needs_correlation: bool = True
    params: tuple[str, ...] = ()
    tunable: tuple[str, ...] = ()
    check: Callable[[dict, int], None] = lambda params, n_models: None


def check_shape(corr: np.ndarray, n_models: int) -> int:
    """The width O of one model's features, from a correlation of n*O features."""
    if corr.ndim != 2 or corr.shape[0] != corr.shape[1] or corr.shape[0] % n_models:
        raise ValueError(f"correlation of shape {corr.shape} does not split into {n_models} models")
    return corr.shape[0] // n_models
