"""Merging methods, one file each: every module of this package that defines ``METHOD`` is one.

A method's ``match`` turns the correlation of n models' features in one space into
merge and unmerge matrices (``base.Match``); the pipeline, the zip, tuning and the
CLI ask the ``Method`` record for everything else (which statistics it needs, which
parameters it takes and which the default may tune).
"""
from __future__ import annotations

import pkgutil
from importlib import import_module

import numpy as np

from ..errors import ZipitError
from .base import Match, Method, Param, check_shape

ORDER = ("zipit", "permute", "average")     # how the built-ins are listed; others follow by name


def _discover() -> dict[str, Method]:
    """Every ``METHOD`` in this package's modules (zipit's own code, never a user's file)."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        method = getattr(import_module(f"{__name__}.{info.name}"), "METHOD", None)
        if isinstance(method, Method):
            found[method.name] = method
    order = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    return {n: found[n] for n in order}


REGISTRY: dict[str, Method] = _discover()
METHODS = tuple(REGISTRY)


def get(name: str) -> Method:
    """The method called ``name``; an unknown name is a one-line error that lists the valid ones."""
    if name not in REGISTRY:
        raise ZipitError(f"unknown method {name!r}", f"valid methods (--method): {', '.join(METHODS)}")
    return REGISTRY[name]


def match(method: str, corr: np.ndarray, n_models: int, width: int | None = None, **params) -> Match:
    """Match one space with ``method``, passing it the parameters it takes from ``params``, and the
    merged ``width`` only when one is given (None: one model's width; methods that are not
    ``partial`` take none)."""
    m = get(method)
    extra = {k: v for k, v in params.items() if k in m.param_names}
    if width is not None:
        if not m.partial:
            raise ZipitError(f"method {m.name} cannot merge at a size (it keeps no feature apart)",
                             "use --method zipit or permute")
        extra["width"] = width
    return m.match(corr, n_models, **extra)


__all__ = ["METHODS", "REGISTRY", "Match", "Method", "Param", "check_shape", "get", "match"]
