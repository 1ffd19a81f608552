"""Streaming correlation of features across all models: float64 sums of float32 Gram blocks.

``collect_correlations`` streams the calibration images once through every
model and feeds one accumulator per merged feature space.

Every image and spatial position is one sample. Each observed activation is
written once, channels last and shifted (by the first chunk's mean, so that
E[xx] - E[x]E[x] does not cancel), into a ``[samples, features + 1]`` buffer
whose last column is all ones (a plain strided copy for the channels-last maps
zipit runs on the CPU); one symmetric product of that buffer then gives the
sums of x x^T, of x and the sample count together. Only the upper block
triangle is multiplied (about half the work of a full product), and NaN or Inf
anywhere shows up in the small Gram matrix, so the large activations are read
exactly once.

A method that reads only how features of different models correlate (permute) gets
``within=False``: the blocks between models, each feature's own sums, and no
products within one model, half the products for two models.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .calibration import ImageStream
from .distributed import Ranks
from .errors import CalibrationError, MergeError
from .specs.format import Space, Spec
from .specs.graph import StopPlan, observed_channels

GRAM_BLOCK = 256               # rows per block of the upper triangle: 1.3x faster than 512 on 513- to 2049-wide spaces


def symmetric_gram(x: torch.Tensor, block: int = GRAM_BLOCK) -> torch.Tensor:
    """``x @ x.T`` for ``x`` of shape (F, P), computing each off-diagonal block once."""
    f = x.shape[0]
    if f <= block:
        return x @ x.T
    gram = torch.empty(f, f, dtype=x.dtype, device=x.device)
    for start in range(0, f, block):
        stop = min(start + block, f)
        gram[start:stop, start:] = x[start:stop] @ x[start:].T
        gram[stop:, start:stop] = gram[start:stop, stop:].T
    return gram


class CorrelationAccumulator:
    """Running float64 sums over the concatenated features of n models for one feature space."""

    def __init__(self, sizes: list[int], device="cpu", within: bool = True):
        self.sizes = list(sizes)
        self.within = within            # False: no products of two features of one model (see the module)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.num_features = sum(self.sizes)
        self.device = device
        self.shift: torch.Tensor | None = None           # (F,) float32
        self.moments = torch.zeros(self.num_features + 1, self.num_features + 1, dtype=torch.float64, device=device)
        self.buffer: torch.Tensor | None = None
        self.filled: set[int] = set()

    @property
    def n(self) -> int:
        return int(self.moments[-1, -1])

    def begin(self, samples_per_channel: int) -> None:
        """Prepare a buffer for one chunk of ``samples_per_channel`` samples."""
        shape = (samples_per_channel, self.num_features + 1)
        if self.buffer is None or self.buffer.shape != shape:
            self.buffer = torch.empty(shape, dtype=torch.float32, device=self.device)
            self.buffer[:, -1] = 1.0
        self.filled.clear()

    def add_model(self, i: int, feature: torch.Tensor) -> None:
        """Write model i's activation ``[B, C, ...]`` into its columns, channels last and shifted."""
        c, lo = self.sizes[i], self.offsets[i]
        src = feature.detach().movedim(1, -1)                   # (B, ..., C) view
        if self.shift is None or len(self.shift) < self.num_features:
            mean = src.float().reshape(-1, c).mean(0)
            self.shift = mean if self.shift is None else torch.cat([self.shift, mean])
        torch.sub(src, self.shift[lo:lo + c], out=self.buffer[:, lo:lo + c].view(src.shape))
        self.filled.add(i)

    def end(self) -> bool:
        """Fold the chunk into the running sums; False if it held NaN or Inf."""
        assert len(self.filled) == len(self.sizes), "every model must add its features"
        gram = symmetric_gram(self.buffer.T) if self.within else self._between_models()
        if not torch.isfinite(gram.diagonal()).all():     # a NaN or Inf anywhere shows in its sum of squares
            return False
        self.moments += gram
        return True

    def _between_models(self) -> torch.Tensor:
        """The chunk's sums of products as ``symmetric_gram`` gives them, less the products of two
        features of one model (left 0): the blocks between models, squares, sums, the count."""
        x, f = self.buffer, self.num_features
        gram = x.new_zeros(f + 1, f + 1)
        for i, (lo, c) in enumerate(zip(self.offsets, self.sizes)):
            for lo2, c2 in zip(self.offsets[i + 1:], self.sizes[i + 1:]):
                block = x[:, lo:lo + c].T @ x[:, lo2:lo2 + c2]
                gram[lo:lo + c, lo2:lo2 + c2] = block
                gram[lo2:lo2 + c2, lo:lo + c] = block.T
        features = x[:, :f]
        gram.diagonal()[:f] = torch.linalg.vector_norm(features, dim=0).square()
        gram[:f, f] = gram[f, :f] = features.sum(0)
        gram[f, f] = len(x)
        return gram

    def update(self, features: list[torch.Tensor]) -> bool:
        """One chunk in one call: ``features[i]`` is model i's ``[B, C, ...]`` activation."""
        self.begin(features[0].numel() // features[0].shape[1])
        for i, f in enumerate(features):
            self.add_model(i, f)
        return self.end()

    def covariance(self) -> torch.Tensor:
        n = self.moments[-1, -1]
        if n == 0:
            raise ValueError("no samples were accumulated")
        mean = self.moments[:-1, -1] / n
        return self.moments[:-1, :-1] / n - torch.outer(mean, mean)

    def recentre(self, shift: torch.Tensor) -> None:
        """Express the sums about another shift (exact in float64), so that sums from other
        processes, each about its own first chunk's mean, can be added."""
        d = (self.shift.double() - shift.double()).to(self.moments.device)
        m, s1, n = self.moments, self.moments[:-1, -1].clone(), self.moments[-1, -1]
        m[:-1, :-1] += torch.outer(d, s1) + torch.outer(s1, d) + n * torch.outer(d, d)
        m[:-1, -1] += n * d
        m[-1, :-1] = m[:-1, -1]
        self.shift = shift.to(self.shift.dtype).to(self.shift.device)

    def correlation(self) -> torch.Tensor:
        """Pearson correlation of all features; without ``within``, 0 between two features of one
        model (never measured)."""
        cov = self.covariance()
        raw_mean = self.moments[:-1, -1] / self.moments[-1, -1] + self.shift.double()
        corr = correlation_from_covariance(cov, cov.diagonal() + raw_mean ** 2)
        if not self.within:
            for lo, c in zip(self.offsets, self.sizes):
                corr[lo:lo + c, lo:lo + c] = torch.eye(c, dtype=corr.dtype, device=corr.device)
        return corr


def correlation_from_covariance(cov: torch.Tensor, second_moment: torch.Tensor | None = None) -> torch.Tensor:
    """Pearson correlation; constant (dead) features correlate 0 with everything, 1 with themselves."""
    var = cov.diagonal().clamp_min(0)
    scale = second_moment.abs() if second_moment is not None else var  # E[x^2] of the unshifted data
    alive = var > 1e-10 * scale.clamp_min(1e-30)
    std = torch.where(alive, var.sqrt(), torch.ones_like(var))
    corr = cov / torch.outer(std, std)
    corr = torch.where(alive[:, None] & alive[None, :], corr, torch.zeros_like(corr)).clamp(-1, 1)
    corr.fill_diagonal_(1.0)
    return corr


class _Enough(Exception):
    """Raised from a hook once every observed activation of a forward pass is in hand."""


CHUNK_BYTES = 256 * 2**20   # bound on the activations held for one chunk of images (all spaces, all models)


@torch.no_grad()
def collect_correlations(models: list[nn.Module], spec: Spec, plan: StopPlan, stream: ImageStream,
                         device: str, report, within: bool = True) -> dict[str, CorrelationAccumulator]:
    """Stream the images once through all models; one accumulator per merged space (``within``:
    see ``CorrelationAccumulator``).

    Each batch is cut into chunks small enough that the observed activations of
    every space fit in ``CHUNK_BYTES``, so memory does not grow with the batch
    size or the number of images. Each model stops as soon as its last observed
    activation is in hand.
    """
    spaces = [spec.space(s) for s in plan.merged_spaces]
    observe: dict[tuple[str, bool], list[Space]] = {}   # (module, its output?) -> spaces observed there
    for s in spaces:
        observe.setdefault((s.observe.module, s.observe.output), []).append(s)
    acc: dict[str, CorrelationAccumulator] = {}
    state = {"model": 0, "captured": 0}

    def hook_for(point):
        def hook(_module, args, output=None):
            seen = output if point[1] else args[0]
            for space in observe[point]:
                x = observed_channels(seen, space.observe, plan.sizes[space.name], space.observe_axis)
                if x is None:
                    raise MergeError(f"space {space.name!r} is observed at {space.observe}, whose "
                                     f"{'output' if point[1] else 'input'} {tuple(seen.shape)} does not hold its "
                                     f"{plan.sizes[space.name]} channels",
                                     "fix the spec's observe point ('zipit specs check' tests it)")
                if space.name not in acc:
                    acc[space.name] = CorrelationAccumulator([x.shape[1]] * len(models), device, within)
                if state["model"] == 0:
                    acc[space.name].begin(x.numel() // x.shape[1])
                acc[space.name].add_model(state["model"], x)
            state["captured"] += 1
            if state["captured"] == len(observe):
                raise _Enough
        return hook

    handles = []
    for model in models:
        modules = dict(model.named_modules())
        handles += [modules[m].register_forward_hook(hook_for((m, out))) if out
                    else modules[m].register_forward_pre_hook(hook_for((m, out))) for m, out in observe]
    chunk = None
    report.start("calibration", len(stream))
    try:
        for batch in stream.batches():
            batch = batch.to(device)
            start = 0
            while start < batch.shape[0]:
                size = chunk or 1
                x = batch[start:start + size]
                for i, model in enumerate(models):
                    state["model"], state["captured"] = i, 0
                    try:
                        model(x)
                    except _Enough:
                        pass
                for name, a in acc.items():
                    if not a.end():
                        raise MergeError(f"activations of feature space {name!r} became NaN or Inf during "
                                         "calibration", "the checkpoints or images produce non-finite values; "
                                         "check their dtype and range")
                if chunk is None:  # size the chunks from what one image costs
                    per_image = sum(a.buffer.numel() * 4 for a in acc.values())
                    chunk = max(1, min(stream.batch_size, CHUNK_BYTES // max(per_image, 1)))
                start += size
                report.advance(x.shape[0])
    finally:
        for h in handles:
            h.remove()
        report.done()
    if not acc and spaces:
        raise CalibrationError(f"none of the {len(stream)} calibration images could be read",
                               "check the image files (see the warnings above)")
    return acc


def sum_over_ranks(acc: dict[str, CorrelationAccumulator], names: Sequence[str], ranks: Ranks) -> None:
    """Make every rank's accumulators hold the sums over all ranks' images (in place)."""
    if not ranks.many:
        return
    for name in names:
        a = acc[name]
        a.recentre(ranks.broadcast(a.shift))
        a.moments = ranks.sum(a.moments)
