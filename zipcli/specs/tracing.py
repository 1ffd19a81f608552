"""Derive a spec's feature spaces from a model by tracing it with torch.fx.

Every tensor gets a channel layout: its channel axis as segments, each a channel
variable. Operations that keep channels (norms, activations, pooling, dropout)
pass the layout on, residual additions unify variables, a concatenation on the
channel axis joins segments (its readers see each at an offset), a flatten turns
each channel into a block of positions, and convolutions / linear layers start a
new variable. The unified variables that some layer writes are the feature
spaces. Anything the tracer cannot reason about is refused with the operation and
the layer named: a silently wrong spec would merge fine and give garbage.
"""
from __future__ import annotations

import contextlib
import io
import math
import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import SpecError
from . import layers
from .builders import build
from .format import Member
from .graph import trace

SAME_CHANNEL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.Tanh, nn.Sigmoid,
    nn.Hardsigmoid, nn.Mish, nn.Softplus,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
OBSERVE_THROUGH_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
                           nn.Dropout, nn.Dropout2d, nn.Identity)
SAME_CHANNEL_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu, F.elu, torch.tanh,
    torch.sigmoid, F.sigmoid, F.hardsigmoid, F.mish, F.softplus,
    F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}
SAME_CHANNEL_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}
RESHAPES = {torch.flatten, "flatten", "view", "reshape"}
ADDS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub, torch.sub, "add", "add_", "sub"}
PRODUCTS = {operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv, torch.div, "mul", "mul_",
            "div"}
REDUCTIONS = {"mean", "sum", "amax", torch.mean, torch.sum, torch.amax}
CONCATS = {torch.cat, torch.concat}
ATTENTION = {torch.matmul, operator.matmul, torch.bmm, torch.einsum, F.softmax, torch.softmax, "softmax",
             "matmul", "bmm", F.scaled_dot_product_attention}
ATTENTION_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.Softmax)
NO_TENSOR = {"size", "dim", operator.getitem, getattr}
OBSERVE_THROUGH_FUNCTIONS = RESHAPES | {F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                                        F.adaptive_max_pool2d}


class _Vars:
    """Union-find over channel variables; a variable tied to the model input is fixed."""

    def __init__(self):
        self.parent: list[int] = []
        self.fixed: list[bool] = []

    def new(self, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.fixed.append(fixed)
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[b] = a
            self.fixed[a] = self.fixed[a] or self.fixed[b]
        return a


@dataclass(frozen=True)
class Layout:
    """A tensor's channel axis: consecutive ``(variable, channels)`` segments; after a flatten
    each channel is a run of ``block`` values."""

    segments: tuple[tuple[int, int], ...]
    block: int = 1

    def members(self, module: str) -> list[tuple[int, Member]]:
        """How ``module`` sees each variable of this layout: whole, or at an offset."""
        if len(self.segments) == 1 and self.block == 1:
            return [(self.segments[0][0], Member(module))]
        out, offset = [], 0
        for var, size in self.segments:
            out.append((var, Member(module, offset, self.block)))
            offset += size
        return out


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    layer = next(reversed(stack)) if stack else "the top-level forward"
    if node.op == "call_module":
        return f"layer {node.target!r}"
    return f"{node.op} {_name(node.target)!r} (in {layer!r})"


class ShapeError(SpecError):
    """The model does not run on the example input (or not on the meta device)."""


def _refuse(node: fx.Node, why: str) -> SpecError:
    return SpecError(f"cannot derive feature spaces: {why} at {_where(node)}",
                     "the tracer does not support this operation; see 'Supported operations' in specs/README.md "
                     "(installed as zipcli/specs/README.md)")


class _Tracer:
    """One pass over the fx graph, giving every tensor a channel layout."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        model.eval()
        self.gm = trace(model)
        try:
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # ShapeProp prints tracebacks
                ShapeProp(self.gm).propagate(example)
        except Exception as exc:  # the user's model: any failure means this input does not fit it
            cause = exc.__cause__ or exc
            raise ShapeError(f"the model fails on a {'x'.join(map(str, example.shape))} input: "
                             f"{cause.__class__.__name__}: {str(cause)[:200]}",
                             "check the input size (--size) and the builder's arguments") from None
        self.modules = dict(model.named_modules())
        self.vars = _Vars()
        self.size: dict[int, int] = {}
        self.layout: dict[fx.Node, Layout | None] = {}
        self.writes: list[tuple[int, Member]] = []
        self.reads: list[tuple[int, Member]] = []
        self.order: dict[str, int] = {}
        self.calls = Counter(n.target for n in self.gm.graph.nodes if n.op == "call_module")
        self.outputs: list[Layout] = []

    def new(self, size: int, fixed: bool = False) -> Layout:
        v = self.vars.new(fixed)
        self.size[v] = size
        return Layout(((v, size),))

    def input(self, node: fx.Node, arg) -> Layout:
        layout = self.layout.get(arg) if isinstance(arg, fx.Node) else None
        if layout is None:
            raise _refuse(node, "an input without a channel axis")
        return layout

    def unify(self, node: fx.Node, a: Layout, b: Layout) -> Layout:
        if [s for _, s in a.segments] != [s for _, s in b.segments] or a.block != b.block:
            raise _refuse(node, "an addition of tensors whose channels are concatenated differently")
        for (va, _), (vb, _) in zip(a.segments, b.segments):
            self.vars.union(va, vb)
        return a

    def run(self) -> None:
        self.refuse_attention()
        for idx, node in enumerate(self.gm.graph.nodes):
            self.order.setdefault(node.target if node.op == "call_module" else node.name, idx)
            if node.op == "placeholder":
                shape = _shape(node)
                self.layout[node] = self.new(shape[1], fixed=True) if shape and len(shape) > 1 else None
            elif node.op == "call_module":
                self.layout[node] = self.module(node, self.modules[node.target])
            elif node.op in ("call_function", "call_method"):
                self.layout[node] = self.function(node, node.target)
            elif node.op == "get_attr":
                raise _refuse(node, "a tensor attribute used directly in forward (a learned scale or embedding)")
            elif node.op == "output":
                outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
                self.outputs = [self.input(node, o) for o in outs]

    def refuse_attention(self) -> None:
        """Attention is refused up front: its reshapes would otherwise be reported first."""
        for node in self.gm.graph.nodes:
            if node.op == "call_module" and isinstance(self.modules[node.target], ATTENTION_MODULES):
                raise _refuse(node, f"attention ({type(self.modules[node.target]).__name__}): its heads and "
                                    "softmax mix channels, which zipit cannot merge")
            if node.op in ("call_function", "call_method") and node.target in ATTENTION:
                raise _refuse(node, f"{_name(node.target)!r}, which mixes channels (attention or a matrix product)")

    def module(self, node: fx.Node, m: nn.Module) -> Layout | None:
        name = node.target
        if any(True for _ in m.parameters()) and self.calls[name] > 1:
            raise _refuse(node, "a layer whose weights are used more than once")
        kind = layers.kind_of(m)
        if kind is not None and kind.in_channels is not None:
            return self.weighted(node, m)
        x = self.input(node, node.args[0])
        if kind is not None:                            # a per-channel layer (a norm)
            self.refuse_problems(node, m)
            if any(True for _ in m.parameters()) or getattr(m, "running_mean", None) is not None:
                self.writes += x.members(name)
            return x
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x)
        if isinstance(m, SAME_CHANNEL_MODULES):
            return x
        raise _refuse(node, f"module type {type(m).__name__}")

    def weighted(self, node: fx.Node, m: nn.Module) -> Layout:
        """Convolutions and linear layers read one space and write a new one; depthwise ones keep it."""
        x = self.input(node, node.args[0])
        self.refuse_problems(node, m)
        if len(_shape(node.args[0]) or ()) > 2 and x.block != 1:
            raise _refuse(node, f"a {type(m).__name__} applied to a flattened tensor")
        if layers.is_per_channel(m):
            self.writes += x.members(node.target)
            return x
        self.reads += x.members(node.target)
        out = self.new(layers.out_channels(m))
        self.writes += out.members(node.target)
        return out

    def refuse_problems(self, node: fx.Node, m: nn.Module) -> None:
        """The table's reasons a layer cannot be merged, of its own or on this input's shape."""
        why = layers.problem(m) or layers.input_problem(m, _shape(node.args[0]))
        if why:
            raise _refuse(node, why)

    def flatten(self, node: fx.Node, x: Layout) -> Layout:
        """[B, C, H, W] -> [B, C*H*W]: channel-major, so each channel becomes a block of H*W values."""
        src, out = _shape(node.args[0]), _shape(node)
        if src is None or out is None or len(out) != 2 or out[0] != src[0] or out[1] != math.prod(src[1:]):
            raise _refuse(node, "a reshape that mixes channels with the batch or spatial positions")
        return Layout(x.segments, x.block * math.prod(src[2:]))

    def function(self, node: fx.Node, t) -> Layout | None:
        if _shape(node) is None and all(self.layout.get(a) is None for a in node.all_input_nodes):
            return None  # arithmetic on sizes and other plain values
        tensors = [a for a in node.args if isinstance(a, fx.Node) and _shape(a) is not None]
        if t in ADDS:
            if not tensors:
                return None
            out = self.input(node, tensors[0])
            for a in tensors[1:]:
                if _shape(a) != _shape(tensors[0]):
                    raise _refuse(node, "an addition of tensors of different shapes")
                out = self.unify(node, out, self.input(node, a))
            return out
        if t in PRODUCTS:
            if len(tensors) > 1:
                raise _refuse(node, "a product of two feature maps (a multiplicative gate such as "
                                    "squeeze-and-excitation)")
            return self.input(node, tensors[0]) if tensors else None
        if t in CONCATS:
            return self.concat(node)
        if t in SAME_CHANNEL_FUNCTIONS or t in SAME_CHANNEL_METHODS:
            return self.input(node, node.args[0])
        if t in RESHAPES:
            return self.flatten(node, self.input(node, node.args[0]))
        if t in REDUCTIONS:
            return self.reduction(node)
        if t in NO_TENSOR:
            if _shape(node) is not None:
                raise _refuse(node, "indexing into a tensor (e.g. a slice of its channels)")
            return None
        raise _refuse(node, f"operation {_name(t)!r}")

    def concat(self, node: fx.Node) -> Layout:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = _shape(node)
        if shape is None or dim not in (1, 1 - len(shape)):
            raise _refuse(node, f"a concatenation along axis {dim} (only the channel axis, 1, is supported)")
        layouts = [self.input(node, p) for p in parts]
        if len({x.block for x in layouts}) != 1:
            raise _refuse(node, "a concatenation of tensors flattened from maps of different sizes")
        return Layout(tuple(s for x in layouts for s in x.segments), layouts[0].block)

    def reduction(self, node: fx.Node) -> Layout:
        """A mean/sum/max over spatial axes keeps the channels; over the channel axis it is refused."""
        x = self.input(node, node.args[0])
        src = _shape(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if src is None or not dims or x.block != 1 or any(d % len(src) < 2 for d in dims):
            raise _refuse(node, f"a reduction {_name(node.target)!r} over the batch or channel axis")
        return x


def trace_spaces(model: nn.Module, example: torch.Tensor) -> dict:
    """Trace ``model`` on ``example`` (any device, the meta device too) and derive its spaces.

    Returns ``spaces`` (name, writers, readers, observe; members as ``Member``), ``classifiers``
    and ``inputs``: for each module, which traced space each slice of its input holds (coverage
    checks observe points with it).
    """
    tr = _Tracer(model, example)
    tr.run()
    find = tr.vars.find
    class_vars = {find(v) for layout in tr.outputs for v, _ in layout.segments}
    classifiers = sorted({m.module for v, m in tr.writes if find(v) in class_vars
                          and isinstance(tr.modules[m.module], layers.weighted_types())}, key=tr.order.get)
    groups: dict[int, dict] = {}
    for v, m in tr.writes:
        root = find(v)
        layer = tr.modules[m.module]
        if tr.vars.fixed[root] and layers.is_weighted(layer):
            raise SpecError(f"cannot derive feature spaces: the channels written by {m.module!r} are added to the "
                            "model input", "such channels cannot be permuted")
        if root not in class_vars and not tr.vars.fixed[root]:
            groups.setdefault(root, {"writers": [], "readers": []})["writers"].append(m)
    for v, m in tr.reads:
        root = find(v)
        if tr.vars.fixed[root]:
            continue  # reads the model input (RGB): not a feature space
        if root in class_vars:
            raise SpecError(f"cannot derive feature spaces: {m.module!r} reads the model's outputs",
                            "zipit needs the classifier to be the last layer")
        groups[root]["readers"].append(m)
    spaces = []
    for root, g in groups.items():
        first = g["writers"][0].module
        if not g["readers"]:
            raise SpecError(f"cannot derive feature spaces: channels written by {first!r} are never read by a "
                            "layer", "zipit needs every feature space to end in a convolution or linear layer")
        for key in ("writers", "readers"):
            g[key].sort(key=lambda m: tr.order[m.module])
        spaces.append({"writers": g["writers"], "readers": g["readers"], "root": root,
                       "observe": _observe_point(tr, root, g["readers"][-1])})
    spaces.sort(key=lambda s: tr.order[s["writers"][0].module])
    _name_spaces(spaces, tr.modules)
    name_of = {s.pop("root"): s["name"] for s in spaces}
    inputs = {}  # what each module's input holds: [(space name or None, member)]
    for node in tr.gm.graph.nodes:
        arg = node.args[0] if node.op == "call_module" and node.args else None
        layout = tr.layout.get(arg) if isinstance(arg, fx.Node) else None
        if layout is not None and tr.calls[node.target] == 1:
            inputs[node.target] = [(name_of.get(find(v)), m) for v, m in layout.members(node.target)]
    return {"spaces": spaces, "classifiers": classifiers, "inputs": inputs}


def _call_node(gm: fx.GraphModule, module: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == module)


def _observe_point(tr: _Tracer, root: int, last_reader: Member) -> Member:
    """The input of the space's last reader, or of the earliest module in the chain of pooling,
    dropout and flatten in front of it: the same channels, at more positions (more samples)."""
    best = last_reader
    node = _call_node(tr.gm, last_reader.module).args[0]
    while isinstance(node, fx.Node) and _passes_through(tr, node):
        if node.op == "call_module" and tr.calls[node.target] == 1:
            layout = tr.layout[node.args[0]]
            best = next(m for v, m in layout.members(node.target) if tr.vars.find(v) == root)
        node = node.args[0]
    return best


def _passes_through(tr: _Tracer, node: fx.Node) -> bool:
    """Nodes that show each channel unchanged (at fewer positions, or flattened)."""
    if node.op == "call_module":
        return isinstance(tr.modules[node.target], OBSERVE_THROUGH_MODULES)
    return node.op in ("call_function", "call_method") and node.target in OBSERVE_THROUGH_FUNCTIONS


def _name_spaces(spaces: list[dict], modules: dict) -> None:
    """Name single-writer spaces after their layer and residual streams after the blocks they span:
    ``layer2.stream`` when it spans all of ``layer2``, ``features.2-3.stream`` when part of it."""
    used = Counter()
    for s in spaces:
        convs = [w.module for w in s["writers"] if w.whole and layers.is_weighted(modules[w.module])]
        if len(convs) == 1:
            name = convs[0]
        else:
            stage = Counter(c.split(".")[0] for c in convs).most_common(1)[0][0]
            blocks = list(dict.fromkeys(c.split(".")[1] for c in convs if c.startswith(stage + ".")))
            children = [n for n, _ in modules[stage].named_children()]
            if not blocks or blocks == children or not all(c.startswith(stage + ".") for c in convs):
                name = f"{stage}.stream"
            else:
                name = f"{stage}.{blocks[0]}{'-' + blocks[-1] if len(blocks) > 1 else ''}.stream"
        used[name] += 1
        s["name"] = name if used[name] == 1 else f"{name}#{used[name]}"


def build_and_trace(builder: str, kwargs: dict, shape: tuple[int, ...]) -> tuple[nn.Module, dict]:
    """Trace on the meta device (shapes without memory or compute), or on the CPU where the
    builder or model does not support it."""
    try:
        with torch.device("meta"):
            model = build(builder, kwargs)
        return model, trace_spaces(model, torch.zeros(1, *shape, device="meta"))
    except ShapeError:
        pass
    except SpecError as exc:
        if not str(exc).startswith("builder "):
            raise
    model = build(builder, kwargs)
    return model, trace_spaces(model, torch.zeros(1, *shape))
