"""BatchNorm reset: recompute running statistics of a merged model on calibration images.

Merging cannot know the variance of averaged features (it depends on their
covariance across models), so after merging the statistics are measured again.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def reset_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], device="cpu",
                    on_batch: Callable[[int], None] | None = None, chunk: int = 16) -> int:
    """Cumulative averages over chunks of at most ``chunk`` images (momentum None), which bounds
    memory; returns the number of BN layers reset."""
    layers = [m for m in model.modules() if isinstance(m, BN_TYPES)]
    if not layers:
        return 0
    saved = [(m, m.momentum) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        seen = 0
        for batch in batches:
            for x in batch.split(chunk):
                model(x.to(device))
                seen += 1
                if on_batch:
                    on_batch(x.shape[0])
        if seen == 0:
            raise ValueError("no calibration batches for BatchNorm reset")
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()
    return len(layers)
