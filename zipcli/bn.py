"""BatchNorm reset: recompute running statistics of a merged model on calibration images.

Merging cannot know the variance of averaged features (it depends on their
covariance across models), so after merging the statistics are measured again.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


class _PooledMoments:
    """Per-channel sums of a BN layer's inputs over every image and position (float64).

    Pooling the sums, instead of averaging per-batch statistics, weighs every image
    the same and makes the result independent of how images are chunked.
    """

    def __init__(self, layer: nn.Module):
        self.layer, self.count, self.sum, self.sumsq = layer, 0, None, None
        self.handle = layer.register_forward_pre_hook(self)

    def __call__(self, _module, args):
        x = args[0].detach()
        dims = [0] + list(range(2, x.dim()))
        s = x.sum(dims).double()            # one chunk in float32; the running sums in float64
        ss = (x * x).sum(dims).double()
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = ss if self.sumsq is None else self.sumsq + ss
        self.count += x.numel() // x.shape[1]

    def store(self) -> None:
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean * mean).clamp_min(0)
        if self.count > 1:
            var = var * self.count / (self.count - 1)   # unbiased, as BatchNorm keeps it
        self.layer.running_mean.copy_(mean.to(self.layer.running_mean.dtype))
        self.layer.running_var.copy_(var.to(self.layer.running_var.dtype))


@torch.no_grad()
def reset_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], device="cpu",
                    on_batch: Callable[[int], None] | None = None, chunk: int = 16) -> int:
    """Measure every BN layer's input statistics over all images, in train mode.

    Images go through in chunks of at most ``chunk`` (bounded memory); layers
    normalise with chunk statistics on the way, as in training, while the running
    statistics are pooled over all images. Returns the number of BN layers reset.
    """
    layers = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    if not layers:
        return 0
    saved = [(m, m.momentum) for m in layers]
    moments = []
    for m in layers:
        m.momentum = 0.0    # leave running stats alone during the passes; set them from the pooled sums
        moments.append(_PooledMoments(m))
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
        for pooled in moments:
            pooled.store()
    finally:
        for pooled in moments:
            pooled.handle.remove()
        for m, momentum in saved:
            m.momentum = momentum
        model.eval()
    return len(layers)
