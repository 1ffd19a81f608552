"""Spec + built model -> checked structure: who reads and writes each feature space,
where the model is cut for a stop point, and the trunk/head split of the graph.

The model is traced once with torch.fx; stop points and the split into a shared
trunk and per-task heads are computed on that graph, so any traceable CNN works.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import SpecError
from . import layers
from .format import OUTPUT_STOP, Member, Spec
from .fxgraph import trace


def observed_channels(x: torch.Tensor, member: Member, size: int, axis: int = 1) -> torch.Tensor | None:
    """The ``[B, size, ...]`` part of activation ``x`` that ``member`` names, its channels on ``axis``
    (tokens ``[B, N, D]`` have them last); None if ``x`` does not fit."""
    if axis != 1:
        if not -x.dim() <= axis < x.dim() or axis % x.dim() == 0:
            return None
        x = x.movedim(axis, 1)
    if member.block != 1:
        if x.dim() != 2 or x.shape[1] % member.block:
            return None
        x = x.unflatten(1, (-1, member.block))
    if x.dim() < 2 or (member.whole and x.shape[1] != size) or member.start + size > x.shape[1]:
        return None
    return x.narrow(1, member.start, size)


def on_last_axis(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``fn`` (which works on axis 0) applied to the last axis of a parameter used directly in forward."""
    return fn(t.movedim(-1, 0)).movedim(0, -1)


def on_channels(t: torch.Tensor, axis: int, member: Member, size: int,
                fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``t`` with ``fn`` applied to the ``size`` channels that ``member`` covers on ``axis``.

    ``fn`` gets those channels on ``axis`` (a flattened map's block of values per
    channel on ``axis + 1``) and must keep the shape; the other channels are unchanged.
    """
    view = t.unflatten(axis, (-1, member.block)) if member.block != 1 else t
    new = fn(view.narrow(axis, member.start, size))
    if member.start == 0 and size == view.shape[axis]:
        result = new
    else:
        result = view.clone()
        result.narrow(axis, member.start, size).copy_(new)
    return result.flatten(axis, axis + 1) if member.block != 1 else result


@dataclass(frozen=True)
class StopPlan:
    """What is shared for one stop point, and what becomes per-task heads."""

    stop: str
    trunk_nodes: frozenset[str]      # fx node names computed once, in the trunk
    merged_spaces: tuple[str, ...]   # spaces written in the trunk
    trunk_modules: frozenset[str]    # modules with parameters in the trunk
    sizes: dict[str, int] = field(default_factory=dict, compare=False)  # width of each merged space
    cut_spaces: tuple[str, ...] = ()  # merged spaces also written after the stop (a transformer's stream)
    unmerges: tuple[tuple[str, str, int], ...] = ()   # (trunk output node, cut space it holds, channel axis):
                                                      # each head takes it back to its own model's channels


class ModelGraph:
    """A spec checked against one built model."""

    def __init__(self, spec: Spec, model: nn.Module):
        self.spec = spec
        self.model = model
        self.gm = trace(model, f"model of spec {spec.name!r}")
        self.modules = dict(model.named_modules())
        self.calls = {}  # module name -> the first fx node that calls it
        self.call_count: dict[str, int] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                self.call_count[node.target] = self.call_count.get(node.target, 0) + 1
                if node.target in self.calls and any(True for _ in self.modules[node.target].parameters()):
                    raise SpecError(f"module {node.target!r} is called more than once in the forward pass",
                                    "zipit cannot merge layers whose weights are shared")
                self.calls.setdefault(node.target, node)
        self.writes: dict[str, list[tuple[str, Member]]] = {}   # module -> (space, member) on its outputs
        self.reads: dict[str, list[tuple[str, Member]]] = {}    # module -> (space, member) on its inputs
        self.space_size: dict[str, int] = {}
        self.param_writes: dict[str, str] = {}                  # parameter key -> space (its last axis)
        self._layouts: dict | None = None                       # traced channel layouts, for cuts inside a space
        self._check_spaces()

    def _module(self, name: str, where: str, types=None) -> nn.Module:
        m = self.modules.get(name)
        if m is None or name == "":
            raise SpecError(f"spec {self.spec.name!r}: {where} names module {name!r}, which the model does not have",
                            "module names are those of model.named_modules()")
        if types is not None and not isinstance(m, types):
            raise SpecError(f"spec {self.spec.name!r}: {where} module {name!r} is a {type(m).__name__}",
                            f"expected one of {', '.join(t.__name__ for t in types)}")
        if name not in self.calls:
            raise SpecError(f"spec {self.spec.name!r}: {where} module {name!r} is never called in the forward pass")
        return m

    def _check_spaces(self) -> None:
        for i, space in enumerate(self.spec.spaces):
            where = f"spaces[{i}] ({space.name})"
            widths = {}
            for w in space.writers:
                m = self._module(w.module, f"{where} writer", layers.known_types())
                if layers.problem(m):
                    raise SpecError(f"writer {w.module!r} is {layers.problem(m)}",
                                    "such layers are not supported; see specs/README.md")
                widths[("writer", w)] = layers.out_channels(m)
                self.writes.setdefault(w.module, []).append((space.name, w))
            for r in space.readers:
                m = self._module(r.module, f"{where} reader", layers.weighted_types())
                if not layers.is_weighted(m) or layers.problem(m):
                    raise SpecError(f"reader {r.module!r} is a grouped or depthwise convolution",
                                    "list a depthwise convolution as a writer of the space it reads")
                widths[("reader", r)] = layers.in_channels(m)
                self.reads.setdefault(r.module, []).append((space.name, r))
            self._module(space.observe.module, f"{where} observe")
            if self.call_count[space.observe.module] != 1:
                raise SpecError(f"spec {self.spec.name!r}: {where} observes module "
                                f"{space.observe.module!r}, which runs {self.call_count[space.observe.module]} "
                                "times per forward",
                                "observe the input of a module that runs once (e.g. the next convolution)")
            self.space_size[space.name] = self._size_of(space, where, widths)
            self._check_parameters(space, where)
            if space.heads is not None and self.space_size[space.name] % space.heads:
                raise SpecError(f"spec {self.spec.name!r}: {where} has {self.space_size[space.name]} channels, "
                                f"which do not split into {space.heads} heads", "fix heads")
        for role, table in (("output", self.writes), ("input", self.reads)):
            for module, entries in table.items():
                self._check_disjoint(module, role, entries)
        for c in self.spec.classifiers:
            self._module(c, "classifiers", layers.weighted_types())
        for s in self.spec.stops:
            if s not in self.modules:
                raise SpecError(f"spec {self.spec.name!r}: stop {s!r} is not a module of the model")

    def _check_parameters(self, space, where: str) -> None:
        tensors = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        for key in space.parameters:
            t = tensors.get(key)
            if t is None or t.dim() == 0 or t.shape[-1] != self.space_size[space.name]:
                got = "no such tensor" if t is None else f"shape {tuple(t.shape)}"
                raise SpecError(f"spec {self.spec.name!r}: {where} parameter {key!r} does not have the space's "
                                f"{self.space_size[space.name]} channels on its last axis ({got})",
                                "parameters are state-dict keys of tensors whose last axis is the space")
            self.param_writes[key] = space.name

    def _size_of(self, space, where: str, widths: dict[tuple[str, Member], int]) -> int:
        """A space's width: that of its whole members; every slice must fit its module."""
        whole = {f"{m} ({role})": w for (role, m), w in widths.items() if m.whole}
        if not whole:
            raise SpecError(f"spec {self.spec.name!r}: {where} has only slices (MODULE@OFFSET)",
                            "list at least one member whole, e.g. the convolution that writes the space")
        if len(set(whole.values())) != 1:
            detail = ", ".join(f"{k}={v}" for k, v in whole.items())
            raise SpecError(f"spec {self.spec.name!r}: space {space.name!r} has members of different widths: {detail}",
                            "every writer and reader of a space must have the same number of channels")
        size = next(iter(whole.values()))
        for (_, m), w in widths.items():
            if m.whole:
                continue
            if w % m.block or m.start + size > w // m.block:
                raise SpecError(f"spec {self.spec.name!r}: {where} member {m} does not fit: the module has {w} "
                                f"channels, the space {size}" + (f" in blocks of {m.block}" if m.block > 1 else ""),
                                "fix the offset (or block) so the slice lies inside the module's channels")
        return size

    def _check_disjoint(self, module: str, role: str, entries: list[tuple[str, Member]]) -> None:
        spans = sorted((m.start, m.start + self.space_size[name], name) for name, m in entries)
        for (a0, a1, a), (b0, b1, b) in zip(spans, spans[1:]):
            if b0 < a1:
                raise SpecError(f"spec {self.spec.name!r}: {role} channels {b0}..{a1 - 1} of {module!r} are in two "
                                f"spaces ({a} and {b})", "slices of one module must not overlap")

    def node_in_module(self, node: fx.Node, module: str) -> bool:
        return module in (node.meta.get("nn_module_stack") or {})

    def plan(self, stop: str) -> StopPlan:
        """Cut the graph after module ``stop`` (or nowhere, for ``output``)."""
        valid = list(self.spec.stops) + [OUTPUT_STOP]
        if stop not in valid:
            raise SpecError(f"unknown stop {stop!r} for architecture {self.spec.name!r}", f"valid: {', '.join(valid)}")
        return self.cut(stop)

    @property
    def cuts_inside_spaces(self) -> bool:
        """Whether stops may lie inside a space: in a transformer (a spec with attention heads) the
        residual stream runs through every block, so without such stops the only one would be at
        the end. CNNs keep their stage boundaries (the paper's stops), where no space is split."""
        return any(s.heads is not None for s in self.spec.spaces)

    def cut(self, stop: str, inside: bool | None = None) -> StopPlan:
        """Plan a cut after any module (the tracer tries candidates with this); see ``plan``.
        ``inside``: whether the cut may split a space (default: ``cuts_inside_spaces``); such a
        space is merged in the trunk, and each head takes it back to its own model's channels."""
        nodes = list(self.gm.graph.nodes)
        if stop == OUTPUT_STOP:
            trunk = {n for n in nodes if n.op != "output"}
        else:
            seeds = [n for n in nodes if self.node_in_module(n, stop)]
            if not seeds:
                raise SpecError(f"stop {stop!r} is not a module that the forward pass calls")
            trunk, todo = set(), list(seeds)
            while todo:
                n = todo.pop()
                if n not in trunk:
                    trunk.add(n)
                    todo.extend(n.all_input_nodes)
        trunk_modules = {n.target for n in trunk if n.op == "call_module"}
        if stop != OUTPUT_STOP:
            for c in self.spec.classifiers:
                if c in trunk_modules:
                    raise SpecError(f"stop {stop!r} would share classifier {c!r}",
                                    f"use --stop {OUTPUT_STOP} to merge classifiers of models with identical classes")
        merged, cut = [], []
        allowed = self.cuts_inside_spaces if inside is None else inside
        for space in self.spec.spaces:
            shared = [w.module for w in space.writers if w.module in trunk_modules]
            if shared and len(shared) != len(space.writers):
                if not allowed:
                    outside = [w.module for w in space.writers if w.module not in trunk_modules]
                    raise SpecError(f"stop {stop!r} cuts through feature space {space.name!r} "
                                    f"({shared[0]} is shared, {outside[0]} is not)",
                                    "stops must lie on stage boundaries; fix the spec's stops")
                cut.append(space.name)
            if shared:
                merged.append(space.name)
        with_params = {m for m in trunk_modules if any(True for _ in self.modules[m].parameters(recurse=False))}
        trunk_names = frozenset(n.name for n in trunk)
        return StopPlan(stop, trunk_names, tuple(merged), frozenset(with_params),
                        {name: self.space_size[name] for name in merged}, tuple(cut),
                        self._unmerges(stop, trunk_names, cut) if cut else ())

    def _unmerges(self, stop: str, trunk_nodes: frozenset[str], cut: list[str]) -> tuple[tuple[str, str, int], ...]:
        """Which trunk outputs hold a cut space, and on which axis: each must hold it whole (not
        concatenated with other channels, flattened or split into heads), to be unmerged there."""
        if self._layouts is None:
            self._layouts = _traced_layouts(self)
        space_of = {(m.module, m.start): s for module, entries in self.writes.items() for s, m in entries}
        found = []
        for node in boundary(self.gm.graph, trunk_nodes):
            writers, axis, plain = self._layouts.get(node.name, ((), 1, True))
            spaces = [space_of.get((w.module, w.start)) if w is not None else None for w in writers]
            for space in (s for s in spaces if s in cut):
                if not plain:
                    raise SpecError(f"stop {stop!r} cuts feature space {space!r} where its channels are "
                                    "concatenated, flattened or split into heads",
                                    f"choose another stop: {', '.join(self.spec.stops)}")
                found.append((node.name, space, axis))
        return tuple(found)


def _traced_layouts(graph: ModelGraph) -> dict:
    """The channel layout of every node of ``graph``'s model, traced on the meta device (no memory,
    no work) where the model allows, else on the model itself."""
    from .builders import build_model
    from .tracing import ShapeError, node_layouts

    shape = graph.spec.input.shape
    classes = layers.out_channels(graph.modules[graph.spec.classifiers[0]])
    try:
        with torch.device("meta"):
            model = build_model(graph.spec, classes)
        return node_layouts(model, torch.zeros(1, *shape, device="meta"))
    except ShapeError:
        device = next((t.device for t in graph.model.parameters()), torch.device("cpu"))
        return node_layouts(graph.model, torch.zeros(1, *shape, device=device))


def boundary(graph: fx.Graph, trunk_nodes: frozenset[str]) -> list[fx.Node]:
    """The trunk's outputs: its nodes that a node after the cut uses, in graph order."""
    in_trunk = {n for n in graph.nodes if n.name in trunk_nodes}
    return [n for n in graph.nodes if n in in_trunk and any(u not in in_trunk for u in n.users)]


def split(gm: fx.GraphModule, trunk_nodes: frozenset[str]) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Split a traced model into a trunk (input -> boundary tuple) and a head (boundary -> output)."""
    graph = gm.graph
    in_trunk = {n for n in graph.nodes if n.name in trunk_nodes}
    boundary_nodes = boundary(graph, trunk_nodes)
    trunk_graph, env = fx.Graph(), {}
    for n in graph.nodes:
        if n in in_trunk:
            env[n] = trunk_graph.node_copy(n, lambda a: env[a])
    trunk_graph.output(tuple(env[b] for b in boundary_nodes))
    head_graph, env = fx.Graph(), {}
    for b in boundary_nodes:
        env[b] = head_graph.placeholder(b.name)
    for n in graph.nodes:
        if n not in in_trunk:
            env[n] = head_graph.node_copy(n, lambda a: env[a])
    return fx.GraphModule(gm, trunk_graph, "Trunk"), fx.GraphModule(gm, head_graph, "Head")
