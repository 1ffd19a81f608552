"""BatchNorm reset: recompute running statistics of a merged model on calibration images.

Merging cannot know the variance of averaged features (it depends on their
covariance across models), so after merging the statistics are measured again.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn

from .errors import CalibrationError
from .distributed import SINGLE, Ranks
from .specs import layers



class _PooledMoments:
    """Per-channel sums of a BN layer's inputs over every image and position (float64).

    Pooling the sums, instead of averaging per-batch statistics, weighs every image
    the same and makes the result independent of how images are chunked.
    """

    def __init__(self, layer: nn.Module):
        self.layer, self.count = layer, 0
        self.sum = torch.zeros(layer.num_features, dtype=torch.float64, device=layer.running_mean.device)
        self.sumsq = torch.zeros_like(self.sum)
        self.tracked = 0 if layer.num_batches_tracked is None else int(layer.num_batches_tracked)
        self.handle = layer.register_forward_pre_hook(self)

    def __call__(self, _module, args):
        x = args[0].detach()
        dims = [0] + list(range(2, x.dim()))
        self.sum += x.sum(dims).double()     # one chunk in float32; the running sums in float64
        self.sumsq += (x * x).sum(dims).double()
        self.count += x.numel() // x.shape[1]

    def sum_over(self, ranks: Ranks) -> None:
        """The sums over every rank's images (and the chunks every rank's layer counted)."""
        tracked = self.layer.num_batches_tracked
        steps = 0 if tracked is None else int(tracked) - self.tracked
        total = ranks.sum(torch.cat([self.sum, self.sumsq, self.sum.new_tensor([self.count, steps])]))
        n = len(self.sum)
        self.sum, self.sumsq, self.count = total[:n], total[n:2 * n], int(total[-2])
        if tracked is not None:
            tracked.fill_(self.tracked + int(total[-1]))

    def store(self) -> None:
        mean = self.sum / self.count
        var = (self.sumsq / self.count - mean * mean).clamp_min(0)
        if self.count > 1:
            var = var * self.count / (self.count - 1)   # unbiased, as BatchNorm keeps it
        self.layer.running_mean.copy_(mean.to(self.layer.running_mean.dtype))
        self.layer.running_var.copy_(var.to(self.layer.running_var.dtype))


class BatchStatistics:
    """The pooled input moments of every layer that keeps batch statistics, gathered while the model
    runs: in the reset's own pass, or in the refit's, which computes every such input with the
    final weights before it and so measures the same thing without a pass of its own."""

    def __init__(self, model: nn.Module):
        self.norms = [m for m in model.modules() if layers.keeps_batch_statistics(m)]
        self.saved = [(m, m.momentum) for m in self.norms]
        self.moments = []
        self.measured = False
        for m in self.norms:
            m.momentum = 0.0    # leave running stats alone during the passes; set them from the pooled sums
            self.moments.append(_PooledMoments(m))

    def store(self, seen: int, ranks: Ranks = SINGLE) -> None:
        """Set every layer's running statistics from the sums over ``seen`` images (this rank's)."""
        if ranks.many:
            seen = int(ranks.sum(torch.tensor([seen])))
            for pooled in self.moments:
                pooled.sum_over(ranks)
        if seen == 0:
            raise CalibrationError("no calibration image could be read for the BatchNorm reset",
                                   "check the image files")
        for pooled in self.moments:
            pooled.store()
        self.measured = True

    def close(self) -> None:
        for pooled in self.moments:
            pooled.handle.remove()
        for m, momentum in self.saved:
            m.momentum = momentum


@torch.no_grad()
def reset_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], device="cpu",
                    on_batch: Callable[[int], None] | None = None, chunk: int = 16, ranks: Ranks = SINGLE) -> int:
    """Measure every BN layer's input statistics over all images, in train mode.

    Images go through in chunks of at most ``chunk`` (bounded memory); layers
    normalise with chunk statistics on the way, as in training, while the running
    statistics are pooled over all images (of every rank's shard, with ``ranks``).
    Returns the number of BN layers reset.
    """
    statistics = BatchStatistics(model)
    if not statistics.norms:
        return 0
    model.train()

    def local_pass() -> int:
        seen = 0
        for batch in batches:
            for x in batch.split(chunk):
                model(x.to(device))
                seen += x.shape[0]
                if on_batch:
                    on_batch(x.shape[0])
        return seen

    try:
        statistics.store(ranks.together(local_pass), ranks)
    finally:
        statistics.close()
        model.eval()
    return len(statistics.norms)
