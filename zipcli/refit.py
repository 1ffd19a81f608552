"""Refit: after the zip, solve each merged layer's weights in closed form, without labels.

Matching decides which features to average; nothing then corrects the error that
averaging leaves except the BatchNorm reset. The refit streams the calibration
images once more through the sources and the zipped model side by side. For every
weighted layer that writes a merged space (the trunk) or reads one (the first layers
of each head) it sums float64 statistics of the merged model's own input to that
layer, X, against the layer's target Y: in the trunk, the merge M of the sources'
outputs of the layer (what the zipped weights approximate); in head i, source i's
own output. Each layer then solves a ridge problem pulled towards its zipped weights,

    min_W  ||Y - W X||^2 + lam ||W - W_zip||^2,

with lam chosen per layer, without labels, by two-fold cross-validation over the
images (keeping W_zip is one of the choices). Layers are solved in forward order, each
from every image before the next one's input is computed, so each corrects what the
layers before it get wrong; what survives between layers is kept in a store bounded in
memory (``streaming.py``), so every fit image is used at any model size. Convolutions use
their unfolded inputs at a sample of output positions per image, so the statistics
cost about as much as the layer itself. The target is the layer's own output,
before any BatchNorm: the BatchNorm reset that follows normalises what the refit
produced (see docs/refit.md).
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from .bn import BatchStatistics
from .correlation import symmetric_gram
from .distributed import SINGLE, Ranks
from .methods import Match
from .report import Reporter, SilentReporter
from .specs import layers
from .specs.fxgraph import trace
from .specs.graph import ModelGraph, StopPlan
from .streaming import SegmentRunner, SpillStore
from .zip import SpaceMerge

REFITS = ("none", "lsq")
RIDGE_GRID = (float("inf"), 1.0, 1e-1, 1e-2, 1e-3, 1e-4)   # lam as a share of X^T X's mean eigenvalue
CHUNK = 16                    # images per forward pass, as in the BatchNorm reset
MEMORY = 2**28                # bytes of activations the refit holds in memory between layers (the rest in files)
MIN_POSITIONS = 64            # output positions sampled per image and layer, at least (all of a small map)
MIN_SAMPLES = 4               # a layer is solved only from at least this many samples per unknown of a row


@dataclass
class _Layer:
    """One layer to refit and its running statistics, per fold."""

    name: str                          # module name, the same in the sources and the merged model
    module: nn.Module                  # the merged model's layer
    sources: tuple[int, ...]           # the sources whose outputs make the target
    merge: SpaceMerge | None          # trunk: M on the output channels; head: None (its source's own)
    gram: list[torch.Tensor] = field(default_factory=list)    # per fold: X^T X  (D, D)
    cross: list[torch.Tensor] = field(default_factory=list)   # per fold: Y^T X  (O, D)
    energy: list[torch.Tensor] = field(default_factory=list)  # per fold: ||Y||^2
    samples: int = 0                                           # rows of X seen, both folds

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    def zipped(self) -> torch.Tensor:
        """W_zip as a (O, D) matrix, the bias as its last column."""
        w = self.module.weight.detach().double().flatten(1)
        return torch.cat([w, self.module.bias.detach().double()[:, None]], 1) if self.has_bias else w

    def add(self, fold: int, x: torch.Tensor, y: torch.Tensor) -> None:
        if not self.gram:
            d, o = x.shape[1], y.shape[1]
            self.gram = [x.new_zeros(d, d, dtype=torch.float64) for _ in range(2)]
            self.cross = [x.new_zeros(o, d, dtype=torch.float64) for _ in range(2)]
            self.energy = [x.new_zeros((), dtype=torch.float64) for _ in range(2)]
        self.gram[fold] += symmetric_gram(x.T).double()
        self.cross[fold] += (y.T @ x).double()
        self.energy[fold] += torch.linalg.vector_norm(y).double() ** 2
        self.samples += len(x)


def refittable(module: nn.Module) -> bool:
    """A layer the table can read as rows of a linear map (a dense convolution, a linear layer)."""
    return layers.refit_rows(module) is not None


def plan_layers(graph: ModelGraph, plan: StopPlan, merged: nn.Module, matches: dict[str, Match],
                n_sources: int) -> list[_Layer]:
    """The layers the refit solves: trunk layers that write one whole merged space, and head layers
    that read a merged space (once per head)."""
    spaces = {s: SpaceMerge(m) for s, m in matches.items()}
    trunk = dict(merged.trunk.named_modules())
    out = []
    for name in graph.calls:                       # forward order
        module = graph.modules[name]
        if not refittable(module):
            continue
        if name in plan.trunk_modules:
            writes = graph.writes.get(name, [])
            if (len(writes) == 1 and writes[0][0] in spaces and writes[0][1].whole and writes[0][1].block == 1
                    and name in trunk):
                out.append(_Layer(name, trunk[name], tuple(range(n_sources)),
                                  spaces[writes[0][0]]))
        elif any(s in spaces for s, _ in graph.reads.get(name, [])):
            for i, head in enumerate(merged.head_modules):
                mods = dict(head.named_modules())
                if name in mods:
                    out.append(_Layer(name, mods[name], (i,), None))
    return out


def _position_count(length: int, module: nn.Module, images: int) -> int:
    """Output positions sampled per image: a share min(O, D) / max(O, D) of them, for O output
    channels and D unknowns per row, at least ``MIN_POSITIONS``, and at least what ``images`` images
    need to reach ``MIN_SAMPLES`` per unknown (few images are sampled more densely); at most all.

    A narrowing layer (O <= D) takes O / D of its positions, so its statistics (rows x D x D) cost
    about what the layer does. A widening one (O > D, e.g. a bottleneck's 1x1 expansion) would take
    every position by that rule, though its few unknowns need far fewer rows, and each row it keeps
    holds O target values: D / O of them keeps its stored targets at the size of its input."""
    d = layers.refit_rows(module).unknowns(module)
    o = layers.out_channels(module)
    unknowns = d + (module.bias is not None)
    return min(length, max(MIN_POSITIONS, -(-length * min(o, d) // max(o, d)),
                           -(-MIN_SAMPLES * unknowns // max(1, images))))


def _positions(length: int, module: nn.Module, images: int, key: int) -> torch.Tensor:
    """The sampled output positions of one image chunk (seeded by ``key``)."""
    k = _position_count(length, module, images)
    if k == length:
        return torch.arange(length)
    return torch.randperm(length, generator=torch.Generator().manual_seed(key))[:k]


def _rows_of_input(module: nn.Module, x: torch.Tensor, where: torch.Tensor, out: torch.Size) -> torch.Tensor:
    """A layer's input at the sampled positions as (samples, D), a column of ones for a bias."""
    cols = layers.refit_rows(module).patches(module, x, where, out)
    rows = cols.reshape(-1, cols.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(len(rows), 1)], 1)
    return rows


def _solve(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, share: float) -> torch.Tensor:
    """argmin ||Y - W X||^2 + lam ||W - w0||^2 from X^T X and Y^T X, lam = share * mean eigenvalue."""
    if share == float("inf"):
        return w0
    d = gram.shape[0]
    lam = share * float(torch.trace(gram)) / d
    a = gram + lam * torch.eye(d, dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info):
        return w0
    return torch.cholesky_solve((cross + lam * w0).T, factor).T


def _error(w: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor) -> float:
    """||Y - W X||^2 less ||Y||^2 (the same for every W), from the statistics."""
    return float(((w @ gram) * w).sum() - 2 * (w * cross).sum())


def _enough(samples: int, unknowns: int) -> bool:
    """Whether a layer's statistics are worth a solve: ``MIN_SAMPLES`` rows per unknown of a row."""
    return samples >= MIN_SAMPLES * unknowns


def solve_layer(layer: _Layer) -> tuple[torch.Tensor, float, float | None, float | None]:
    """(new weights, lam as a share of the mean eigenvalue, then the held-out residuals of the zipped
    and of the refit weights as shares of the target's energy, None if the layer had too few samples
    to be solved): two-fold cross-validation picks lam."""
    w0 = layer.zipped()
    if not _enough(layer.samples, w0.shape[1]):
        return w0, float("inf"), None, None    # too few samples to trust any fit: keep the zipped weights
    best, best_err = float("inf"), None
    errors = {}
    for share in RIDGE_GRID:
        err = 0.0
        for fit, held in ((0, 1), (1, 0)):
            w = _solve(layer.gram[fit], layer.cross[fit], w0, share)
            err += _error(w, layer.gram[held], layer.cross[held])
        errors[share] = err
        if best_err is None or err < best_err - 1e-9 * abs(best_err):
            best, best_err = share, err
    gram, cross = layer.gram[0] + layer.gram[1], layer.cross[0] + layer.cross[1]
    energy = float(layer.energy[0] + layer.energy[1]) or 1.0
    zipped = sum(_error(w0, layer.gram[f], layer.cross[f]) for f in (0, 1))
    before, after = (energy + zipped) / energy, (energy + best_err) / energy
    return _solve(gram, cross, w0, best), best, before, after


def _store(layer: _Layer, w: torch.Tensor) -> None:
    m = layer.module
    with torch.no_grad():
        if layer.has_bias:
            m.bias.copy_(w[:, -1].to(m.bias.dtype))
            w = w[:, :-1]
        m.weight.copy_(w.reshape(m.weight.shape).to(m.weight.dtype))



def _targets(todo: list[_Layer], sources: list[fx.GraphModule], store: SpillStore, chunks: int, images: int,
             seed: int) -> list[int]:
    """Each layer's target rows for every chunk, kept in ``store`` under ``("target", k, chunk)`` with
    the sampled positions and the layer's output shape; returns each layer's row count. The sources
    do not change during the refit, so one pass over them serves every layer. Within a chunk the
    sources run side by side, layer after layer, so only one layer's outputs are held at a time."""
    keys = [seed * 1_000_003 + zlib.crc32(layer.name.encode()) for layer in todo]
    rows = [0] * len(todo)
    for c in range(chunks):
        x = store.get(("image", c))
        with SpillStore(None) as live:             # one chunk's live values: small, in memory
            runs = [SegmentRunner(gm, lambda _c: (x,), live, f"source{i}") for i, gm in enumerate(sources)]
            for k, layer in enumerate(todo):
                module, table = layer.module, layers.refit_rows(layer.module)
                ys = [_output_of(runs[i], layer.name) for i in layer.sources]
                outs = [table.outputs(module, y) for y in ys]
                where = _positions(outs[0].shape[1], module, images, keys[k] + 7919 * c)
                y_rows = [o[:, where].reshape(-1, o.shape[-1]).float() for o in outs]
                target = y_rows[0] if layer.merge is None else layer.merge.merge_rows(y_rows)
                rows[k] += len(target)
                store.put(("target", k, c), (target, where, ys[0].shape))
    return rows


def _output_of(run: SegmentRunner, name: str) -> torch.Tensor:
    """Run the one chunk of ``run`` through the next call of module ``name``; its output."""
    end = run.call_of(name)
    value = run.output_of(0, end)
    run.advance(end + 1)
    return value


@contextmanager
def _chunk_statistics(merged: nn.Module, from_images: bool, counted: bool = False):
    """While the refit runs, the merged model's BatchNorm layers normalise each chunk by its own
    statistics, as the reset that follows does (their stored statistics are left alone; with
    ``counted`` the batches they saw are counted, as the reset counts them)."""
    norms = [m for m in merged.modules() if layers.keeps_batch_statistics(m)]
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]
    merged.eval()
    if from_images:
        for m in norms:
            m.momentum, m.training = 0.0, True
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum, m.training = momentum, False
            if tracked is not None and not counted:
                m.num_batches_tracked.copy_(tracked)


def _keep_images(images: torch.Tensor | Iterable[torch.Tensor], store: SpillStore) -> tuple[int, int]:
    """Put the images in ``store`` by chunks of ``CHUNK``; (chunks, images)."""
    chunks = images.split(CHUNK) if isinstance(images, torch.Tensor) else images
    n = count = 0
    for n, chunk in enumerate(chunks, 1):
        store.put(("image", n - 1), chunk)
        count += len(chunk)
    return n, count


@torch.no_grad()
def refit(merged, sources: list[nn.Module], graph: ModelGraph, plan: StopPlan, matches: dict[str, Match],
          images: torch.Tensor | Iterable[torch.Tensor], batch_norm_from_images: bool = True, seed: int = 0,
          report: Reporter | None = None, ranks: Ranks = SINGLE, memory: int | None = None,
          statistics: BatchStatistics | None = None) -> dict[str, object]:
    """Refit ``merged`` (zipped, before its BatchNorm reset) in place on ``images`` (a tensor, or
    chunks of ``CHUNK`` read once), layer after layer in forward order: each layer is solved from
    every image before the next layer's input is computed, so every layer sees the refit of the
    layers before it. The sources' targets come from one pass; the merged model runs segment by
    segment, its live activations kept in at most ``memory`` bytes (``MEMORY``) and in temporary files
    beyond.

    ``batch_norm_from_images``: the merged model's BatchNorm layers normalise with the statistics of
    each chunk of images, as in the reset that follows (else with their stored statistics).
    ``statistics``: also gather the BatchNorm reset's statistics in this pass (every layer's input
    is computed once, after the layers before it are final), and store them at its end. Returns
    facts for the merged file's metadata.
    """
    report = report or SilentReporter()
    todo = plan_layers(graph, plan, merged, matches, len(sources))
    facts: list[dict] = []
    if not todo:
        return {"kind": "lsq", "layers": 0, "images": 0, "per_layer": facts}
    for s in sources:
        s.eval()
    report.start("refit", len(todo) + 1)
    try:
        with SpillStore(MEMORY if memory is None else memory) as store, \
                _chunk_statistics(merged, batch_norm_from_images, counted=statistics is not None):
            chunks, count = ranks.together(lambda: _keep_images(images, store))
            local = count
            if ranks.many:
                count = int(ranks.sum(torch.tensor([count])))           # every rank's
            graphs = [trace(s) for s in sources]
            rows = ranks.together(lambda: _targets(todo, graphs, store, chunks, count, seed))
            report.advance()
            trunk = SegmentRunner(merged.trunk, lambda c: (store.pop(("image", c)),), store, "trunk")
            for k, layer in enumerate(todo):
                if layer.merge is not None:
                    facts.append(_fit(layer, k, trunk, chunks, rows[k], ranks))
                    report.advance()
            for c in range(chunks):
                store.put(("boundary", c), tuple(trunk.finish(c)))
            for i, head in enumerate(merged.head_modules):
                run = SegmentRunner(head, lambda c: store.get(("boundary", c)), store, f"head{i}")
                for k, layer in enumerate(todo):
                    if layer.merge is None and layer.sources[0] == i:
                        facts.append(_fit(layer, k, run, chunks, rows[k], ranks))
                        report.advance()
                if statistics is not None:            # the rest of the head, for its statistics
                    ranks.together(lambda: [run.finish(c) for c in range(chunks)])
            if statistics is not None:
                statistics.store(local, ranks)
    finally:
        report.done()
    kept = sum(f["ridge"] is None for f in facts)
    return {"kind": "lsq", "layers": len(facts), "images": count, "kept_zipped": kept, "per_layer": facts}


def _fit(layer: _Layer, k: int, run: SegmentRunner, chunks: int, samples: int, ranks: Ranks) -> dict:
    """Run every chunk up to the layer, summing its statistics if it has samples enough to be
    solved; the solve, and the new weights in place. Its facts."""
    w0 = layer.zipped()
    if ranks.many:
        samples = int(ranks.sum(w0.new_tensor([samples])))
    enough = _enough(samples, w0.shape[1])
    end = run.call_of(layer.name)

    def statistics():
        for c in range(chunks):
            x = run.input_of(c, end)
            target, where, shape = run.store.pop(("target", k, c))
            if enough:
                x_rows = _rows_of_input(layer.module, x, where, shape).float()
                layer.add(c % 2, x_rows, target.to(x_rows.dtype))

    ranks.together(statistics)
    run.advance(end)
    share, before, after = float("inf"), None, None
    if enough:
        if ranks.many:
            layer.gram = [ranks.sum(g) for g in layer.gram]
            layer.cross = [ranks.sum(c) for c in layer.cross]
            layer.energy = [ranks.sum(e) for e in layer.energy]
        layer.samples = samples
        w, share, before, after = solve_layer(layer)
        _store(layer, w)
        layer.gram, layer.cross, layer.energy = [], [], []
    return {"layer": layer.name, "head": None if layer.merge is not None else layer.sources[0],
            "ridge": None if share == float("inf") else share, "samples": samples,
            "residual": None if before is None else [round(before, 6), round(after, 6)]}
