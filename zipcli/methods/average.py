"""Average: plain weight averaging, feature k of every model onto merged feature k (no images needed)."""
from __future__ import annotations

import numpy as np

from .base import Match, Method, check_shape


def match_average(corr: np.ndarray, n_models: int) -> Match:
    """Feature k of every model goes to merged feature k; ``corr`` only gives the width."""
    o = check_shape(corr, n_models)
    return Match(np.tile(np.arange(o), (n_models, 1)), 0, (n_models - 1) * o)


METHOD = Method("average", "average the weights as they are (no matching, no correlations)",
                lambda corr, n_models: match_average(corr, n_models), needs_correlation=False)
