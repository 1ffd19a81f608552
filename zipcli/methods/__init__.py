"""Merging methods, one file each. Adding one is a new file with a ``METHOD`` listed here.

A method's ``match`` turns the correlation of n models' features in one space into
merge and unmerge matrices (``base.Match``); the pipeline, the zip, tuning and the
CLI ask the ``Method`` record for everything else (which statistics it needs, which
parameters it takes and which the default may tune).
"""
from __future__ import annotations

import numpy as np

from ..errors import ZipitError
from . import average, permute, zipit
from .base import Match, Method, check_shape

REGISTRY: dict[str, Method] = {m.name: m for m in (zipit.METHOD, permute.METHOD, average.METHOD)}
METHODS = tuple(REGISTRY)


def get(name: str) -> Method:
    """The method called ``name``; an unknown name is a one-line error that lists the valid ones."""
    if name not in REGISTRY:
        raise ZipitError(f"unknown method {name!r}", f"valid methods (--method): {', '.join(METHODS)}")
    return REGISTRY[name]


def match(method: str, corr: np.ndarray, n_models: int, **params) -> Match:
    """Match one space with ``method``, passing it the parameters it takes from ``params``."""
    m = get(method)
    return m.match(corr, n_models, **{k: v for k, v in params.items() if k in m.params})


__all__ = ["METHODS", "REGISTRY", "Match", "Method", "check_shape", "get", "match"]
