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
images (keeping W_zip is one of the choices). Every layer is solved from the one
pass, so each corrects what the zipped layers before it get wrong. Convolutions use
their unfolded inputs at a sample of output positions per image, so the statistics
cost about as much as the layer itself. The target is the layer's own output,
before any BatchNorm: the BatchNorm reset that follows normalises what the refit
produced (see docs/refit.md).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.fx as fx

from .distributed import SINGLE, Ranks
from .methods import Match
from .report import Reporter, SilentReporter
from .specs import layers
from .specs.graph import ModelGraph, StopPlan, trace
from .zip import SpaceMerge

REFITS = ("none", "lsq")
RIDGE_GRID = (float("inf"), 1.0, 1e-1, 1e-2, 1e-3, 1e-4)   # lam as a share of X^T X's mean eigenvalue
CHUNK = 16                    # images per forward pass, as in the BatchNorm reset
MEMORY = 2**28                # bytes the refit's activations may take (all its images are held at once)
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
        self.gram[fold] += (x.T @ x).double()
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


@torch.no_grad()
def affordable_images(model: nn.Module, shape: tuple[int, ...], n_models: int, budget: int = MEMORY) -> int:
    """How many images the refit may hold at once within ``budget`` bytes, from one image's largest
    activation: twice that (a residual block's input lives beside its branch) for each of the
    ``n_models`` sources and the merged model, in float32."""
    largest = 0

    def hook(_m, _args, out):
        nonlocal largest
        if isinstance(out, torch.Tensor):
            largest = max(largest, out.numel())

    leaves = [m for m in model.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        model.eval()(torch.zeros(1, *shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return max(1, budget // (4 * 2 * largest * (n_models + 1)))


def _position_count(length: int, module: nn.Module, images: int) -> int:
    """Output positions sampled per image: about out channels / unknowns of them (so the statistics
    cost about what the layer does), at least ``MIN_POSITIONS``, and at least what ``images``
    images need to reach ``MIN_SAMPLES`` per unknown (few images, where memory is short, are
    sampled more densely); at most all."""
    d = layers.refit_rows(module).unknowns(module)
    unknowns = d + (module.bias is not None)
    return min(length, max(MIN_POSITIONS, -(-length * layers.out_channels(module) // d),
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


class _Runner:
    """Runs a traced model node by node over a list of image chunks, keeping only the values that
    later nodes still need, so that a layer's weights can change between one node and the next."""

    def __init__(self, gm: fx.GraphModule, inputs: list[tuple]):
        self.gm, self.nodes = gm, list(gm.graph.nodes)
        self.modules = dict(gm.named_modules())
        self.inputs, self.pos, self.env = inputs, 0, {}
        last = {}
        for i, node in enumerate(self.nodes):
            for used in node.all_input_nodes:
                last[used] = i
        self.frees: dict[int, list[fx.Node]] = {}
        for node, i in last.items():
            self.frees.setdefault(i, []).append(node)
        self.placeholders = 0

    @property
    def next(self) -> fx.Node | None:
        return self.nodes[self.pos] if self.pos < len(self.nodes) else None

    def step(self) -> list:
        """Compute the next node on every chunk; returns its values."""
        node = self.nodes[self.pos]
        values = [self._run(node, c) for c in range(len(self.inputs))]
        self.env[node] = values
        for dead in self.frees.get(self.pos, []):
            if dead is not node:
                self.env.pop(dead, None)
        if node.op == "placeholder":
            self.placeholders += 1
        self.pos += 1
        return values

    def _run(self, node: fx.Node, c: int):
        load = lambda n: self.env[n][c]          # noqa: E731
        args, kwargs = fx.node.map_arg(node.args, load), fx.node.map_arg(node.kwargs, load)
        if node.op == "placeholder":
            return self.inputs[c][self.placeholders]
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            value = self.gm
            for part in node.target.split("."):
                value = getattr(value, part)
            return value
        return args[0]                            # output

    def until_module(self, name: str) -> list:
        """Run on to the call of module ``name``; its outputs."""
        while True:
            node = self.next
            values = self.step()
            if node.op == "call_module" and node.target == name:
                return values

    def finish(self) -> list:
        while self.next is not None:
            values = self.step()
        return values


def _sample(layer: _Layer, xs: list, ys: list[list], images: int, key: int) -> None:
    """Add one layer's statistics: merged inputs ``xs`` against each source's outputs ``ys[i]``,
    chunk by chunk, at sampled output positions; chunks alternate between the two folds."""
    module, rows = layer.module, layers.refit_rows(layer.module)
    for c, x in enumerate(xs):
        outs = [rows.outputs(module, y[c]) for y in ys]               # (B, positions, channels) views
        where = _positions(outs[0].shape[1], module, images, key + 7919 * c)
        x_rows = _rows_of_input(module, x, where, ys[0][c].shape).float()
        y_rows = [o[:, where].reshape(-1, o.shape[-1]).float() for o in outs]
        target = y_rows[0] if layer.merge is None else layer.merge.merge_rows(y_rows)
        layer.add(c % 2, x_rows, target.to(x_rows.dtype))


@torch.no_grad()
def refit(merged, sources: list[nn.Module], graph: ModelGraph, plan: StopPlan, matches: dict[str, Match],
          images: torch.Tensor, batch_norm_from_images: bool = True, seed: int = 0,
          report: Reporter | None = None, ranks: Ranks = SINGLE) -> dict[str, object]:
    """Refit ``merged`` (zipped, before its BatchNorm reset) in place on ``images``, layer after layer
    in forward order, in one pass: the images go through the sources and the merged model node by
    node, and each layer is solved before its own output is computed, so every layer sees the refit
    of the layers before it.

    ``batch_norm_from_images``: the merged model's BatchNorm layers normalise with the statistics of
    each chunk of images, as in the reset that follows (else with their stored statistics). Returns
    facts for the merged file's metadata.
    """
    report = report or SilentReporter()
    todo = plan_layers(graph, plan, merged, matches, len(sources))
    facts: list[dict] = []
    if not todo:
        return {"kind": "lsq", "layers": 0, "images": 0, "per_layer": facts}
    chunks = [(x,) for x in images.split(CHUNK)]
    count = int(ranks.sum(images.new_tensor([len(images)]))) if ranks.many else len(images)   # every rank's
    norms = [m for m in merged.modules() if layers.keeps_batch_statistics(m)]
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in norms]
    for s in sources:
        s.eval()
    merged.eval()
    if batch_norm_from_images:
        for m in norms:
            m.momentum, m.training = 0.0, True      # chunk statistics, running ones left alone
    source_runs = [_Runner(trace(s), chunks) for s in sources]
    report.start("refit", len(todo))
    try:
        trunk = _Runner(merged.trunk, chunks)
        head_layers = {}
        for layer in todo:
            if layer.merge is None:
                head_layers.setdefault(layer.sources[0], []).append(layer)
        for layer in (t for t in todo if t.merge is not None):
            xs = _inputs_of(trunk, layer.name)
            ys = [source_runs[i].until_module(layer.name) for i in layer.sources]
            facts.append(_fit(layer, xs, ys, seed, ranks, count))
            report.advance()
        boundary = trunk.finish()
        for i in range(len(source_runs)):
            if i not in head_layers:
                source_runs[i] = None               # its activations are needed no more
        for i, head in enumerate(merged.head_modules):
            if i not in head_layers:
                continue
            run = _Runner(head, [tuple(b) for b in boundary])
            for layer in head_layers[i]:
                xs = _inputs_of(run, layer.name)
                ys = [source_runs[i].until_module(layer.name)]
                facts.append(_fit(layer, xs, ys, seed, ranks, count))
                report.advance()
    finally:
        report.done()
        for m, momentum, tracked in saved:
            m.momentum, m.training = momentum, False
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
    kept = sum(f["ridge"] is None for f in facts)
    return {"kind": "lsq", "layers": len(facts), "images": count, "kept_zipped": kept, "per_layer": facts}


def _inputs_of(run: _Runner, name: str) -> list:
    """Run on to (not through) the call of module ``name``; its first argument on every chunk."""
    while True:
        node = run.next
        if node.op == "call_module" and node.target == name:
            arg = node.args[0]
            return run.env[arg] if isinstance(arg, fx.Node) else [arg] * len(run.inputs)
        run.step()


def _samples(layer: _Layer, ys: list[list], images: int) -> int:
    """Rows the layer's statistics would hold: known from the outputs' shapes before any is summed."""
    module, rows = layer.module, layers.refit_rows(layer.module)
    return sum(y.shape[0] * _position_count(rows.outputs(module, y).shape[1], module, images) for y in ys[0])


def _fit(layer: _Layer, xs: list, ys: list[list], seed: int, ranks: Ranks, images: int) -> dict:
    """Statistics, the solve, and the new weights in place for one layer; its facts. A layer that
    would get too few samples to be solved is left as it is without computing them."""
    w0 = layer.zipped()
    samples = _samples(layer, ys, images)
    if ranks.many:
        samples = int(ranks.sum(w0.new_tensor([samples])))
    share, before, after = float("inf"), None, None
    if _enough(samples, w0.shape[1]):
        ranks.together(lambda: _sample(layer, xs, ys, images, seed * 1_000_003 + zlib.crc32(layer.name.encode())))
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
