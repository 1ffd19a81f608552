"""What a merging method returns and what it declares; the pieces every method file shares.

A method turns the correlation of n models' features in one space into a ``Match``:
merge matrices M_i (n models' features -> the merged space) and unmerge matrices
U_i (merged space -> each model's features). A *grouping* (each feature goes to one
merged feature, M averages each group, U copies back) is stored as indices and
applied by index; any other method may return dense M and U. The merged space is
usually as wide as one model's (O), but may be anything up to the sum (n*O): features
kept apart are groups of one (the size dial, issue 29).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import ZipitError


@dataclass(frozen=True)
class Match:
    """One space's merge into W merged features (O <= W <= n*O). A grouping: ``assign[i, k]`` is the
    merged feature that feature k of model i goes to. Dense: ``dense_merge`` (W, n*O) and
    ``dense_unmerge`` (n*O, W), with the number of models in ``models`` (n*O / W alone no longer says it)."""

    assign: np.ndarray | None = None        # (n_models, O) int64 for a grouping
    within_merges: int = 0                  # merges of two groups drawn only from one and the same model
    total_merges: int = 0
    budget_lifted: bool = False             # zipit got stuck under the beta budget and finished without it
    dense_merge: np.ndarray | None = None
    dense_unmerge: np.ndarray | None = None
    models: int | None = None               # dense: the number of models (None: n*O / W, for W = O)

    def __post_init__(self):
        if (self.assign is None) == (self.dense_merge is None or self.dense_unmerge is None):
            raise ValueError("a Match is either a grouping (assign) or dense (merge and unmerge matrices)")

    @classmethod
    def dense(cls, merge: np.ndarray, unmerge: np.ndarray, n_models: int | None = None) -> "Match":
        """A merge given by its matrices: ``merge`` (W, n*O), ``unmerge`` (n*O, W). Without ``n_models``
        the merge keeps one model's width (W = O) and n is n*O / W."""
        if merge.ndim != 2 or unmerge.shape != merge.shape[::-1]:
            raise ValueError(f"merge {merge.shape} and unmerge {unmerge.shape} are not (W, n*O) and (n*O, W)")
        w, total = merge.shape
        if n_models is None:
            if total % w:
                raise ValueError(f"merge {merge.shape} and unmerge {unmerge.shape} are not (O, n*O) and (n*O, O)")
        elif n_models < 1 or total % n_models or not total // n_models <= w <= total:
            raise ValueError(f"merge {merge.shape} of {n_models} models is not (W, n*O) with O <= W <= n*O")
        return cls(dense_merge=np.asarray(merge, dtype=np.float64), dense_unmerge=np.asarray(unmerge, dtype=np.float64),
                   models=n_models)

    @property
    def is_grouping(self) -> bool:
        return self.assign is not None

    @property
    def size(self) -> int:
        """The merged width W."""
        return int(self.assign.max()) + 1 if self.is_grouping else self.dense_merge.shape[0]

    @property
    def n_models(self) -> int:
        if self.is_grouping:
            return self.assign.shape[0]
        return self.models or self.dense_merge.shape[1] // self.size

    @property
    def source_width(self) -> int:
        """One model's width O."""
        return self.assign.shape[1] if self.is_grouping else self.dense_merge.shape[1] // self.n_models

    def counts(self) -> np.ndarray:
        """Members per merged feature (groupings only)."""
        return np.bincount(self.assign.ravel(), minlength=self.size)

    def merge_matrix(self) -> np.ndarray:
        """M, shape (W, n*O): for a grouping, row u averages the features of group u."""
        if not self.is_grouping:
            return self.dense_merge
        n, o = self.assign.shape
        m = np.zeros((self.size, n * o))
        m[self.assign.ravel(), np.arange(n * o)] = 1.0
        return m / self.counts()[:, None]

    def unmerge_matrix(self) -> np.ndarray:
        """U, shape (n*O, W): for a grouping, feature k is read back from its group's merged feature."""
        if not self.is_grouping:
            return self.dense_unmerge
        n, o = self.assign.shape
        u = np.zeros((n * o, self.size))
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
class Param:
    """A method's own parameter: what options, the CLI (``--param NAME=VALUE``), tuning, the merged
    file, ``inspect`` and the card know of it. ``grid``: the values the default may try on held-out
    images when the user leaves it open (no grid: the default value is used)."""

    name: str
    default: float
    low: float = float("-inf")
    high: float = float("inf")
    grid: tuple[float, ...] = ()
    help: str = ""
    option: str = ""            # the CLI option that sets it, if not --param NAME=VALUE

    def check(self, value: float) -> None:
        if not self.low <= value <= self.high:
            how = self.option or f"--param {self.name}=VALUE"
            raise ZipitError(f"{self.name} {value:g} is out of range",
                             f"{self.name} ({how}) must lie in [{self.low:g}, {self.high:g}]")


@dataclass(frozen=True)
class Method:
    """A merging method as the pipeline sees it.

    ``match(corr, n_models, **params)`` gets the correlation of the n models'
    concatenated features in one space (an identity when ``needs_correlation`` is
    False and no images were read) and a value for each of its ``params``; those with
    a grid are ``tunable``: the default may choose them on held-out images when left open.
    ``extra_check(values, n_models)`` refuses what ranges cannot (before any image is read).
    A ``partial`` method also takes ``width`` (O <= W <= n*O: merge only the best-matched features).
    Without ``reads_within``, ``match`` reads only how features of different models correlate, and
    the calibration leaves out the products within one model.
    """

    name: str
    summary: str                                       # one line for --help and the docs
    match: Callable[..., Match]
    needs_correlation: bool = True
    reads_within: bool = True        # reads correlations between two features of one model
    params: tuple[Param, ...] = ()
    partial: bool = False            # ``match`` takes ``width=W``: keeps W - O features apart (the size dial)
    extra_check: Callable[[dict, int], None] = lambda values, n_models: None

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def tunable(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.grid)

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def values(self, given: dict) -> dict[str, float]:
        """Every parameter's value: the given one (None or absent: its default)."""
        return {p.name: p.default if given.get(p.name) is None else given[p.name] for p in self.params}

    def check(self, given: dict, n_models: int) -> None:
        """Refuse names the method does not take and values outside their ranges (None: left open)."""
        for name, value in given.items():
            if name not in self.param_names:
                takes = ", ".join(self.param_names) or "none"
                raise ZipitError(f"method {self.name} has no parameter {name!r}",
                                 f"its parameters: {takes} (--param NAME=VALUE)")
            if value is not None:
                self.param(name).check(value)
        self.extra_check(given, n_models)


def check_width(width: int | None, o: int, n_models: int) -> int:
    """The merged width asked for (None: one model's, O); refuses one outside [O, n*O]."""
    if width is None:
        return o
    if not o <= width <= n_models * o:
        raise ValueError(f"merged width {width} is outside [{o}, {n_models * o}]")
    return int(width)


def check_shape(corr: np.ndarray, n_models: int) -> int:
    """The width O of one model's features, from a correlation of n*O features."""
    if corr.ndim != 2 or corr.shape[0] != corr.shape[1] or corr.shape[0] % n_models:
        raise ValueError(f"correlation of shape {corr.shape} does not split into {n_models} models")
    return corr.shape[0] // n_models
