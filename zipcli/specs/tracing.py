"""Derive a spec's feature spaces from a model by tracing it with torch.fx.

Every tensor gets a channel layout: its channel axis as segments, each a channel
variable. Operations that keep channels (norms, activations, pooling, dropout)
pass the layout on, residual additions unify variables, a concatenation on the
channel axis joins segments (its readers see each at an offset), a flatten turns
each channel into a block of positions, and convolutions / linear layers start a
new variable. Tokens ``[B, N, D]`` keep their channels on the last axis: a class
token or position embedding used in forward starts a variable of its own, a
reshape into attention heads records the heads, and scaled dot-product attention
ties queries to keys (one space) and their head order to the values'. The unified
variables that some layer writes are the feature spaces. Anything the tracer
cannot reason about is refused with the operation and the layer named: a
silently wrong spec would merge fine and give garbage.
"""
from __future__ import annotations

import contextlib
import io
import operator
from collections import Counter

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from ..errors import SpecError
from . import layers
from .builders import build
from .format import Member
from .fxgraph import trace
from .layouts import (Layout, Vars, attention_inputs, broadcasts, channels_joined, check_layer, op_name, pooled,
                      reduced, refuse, reshaped, selected, shape_of, transposed)

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
             "matmul", "bmm"}
ATTENTION_MODULES = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.Softmax)
NO_TENSOR = {"size", "dim", operator.getitem, getattr}
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
POOL_FUNCTIONS = {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
TRANSPOSES = {torch.transpose, "transpose", "permute", torch.permute}
OBSERVE_THROUGH_FUNCTIONS = RESHAPES | {F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                                        F.adaptive_max_pool2d}


class ShapeError(SpecError):
    """The model does not run on the example input (or not on the meta device)."""


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
        self.vars = Vars()
        self.size: dict[int, int] = {}
        self.layout: dict[fx.Node, Layout | None] = {}
        self.writes: list[tuple[int, Member]] = []
        self.reads: list[tuple[int, Member]] = []
        self.order: dict[str, int] = {}
        self.calls = Counter(n.target for n in self.gm.graph.nodes if n.op == "call_module")
        self.outputs: list[Layout] = []
        self.tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        self.parameters: dict[str, Layout] = {}       # tensors used in forward, by key
        self.heads: dict[int, int] = {}               # variable -> number of attention heads
        self.ties: list[tuple[int, int]] = []         # (query/key variable, value variable)
        self.selects: set[fx.Node] = set()            # nodes that pick tokens (x[:, 0])

    def new(self, size: int, fixed: bool = False) -> Layout:
        v = self.vars.new(fixed)
        self.size[v] = size
        return Layout(((v, size),))

    def input(self, node: fx.Node, arg) -> Layout:
        layout = self.layout.get(arg) if isinstance(arg, fx.Node) else None
        if layout is None:
            raise refuse(node, "an input without a channel axis")
        return layout

    def unify(self, node: fx.Node, a: Layout, b: Layout) -> Layout:
        if [s for _, s in a.segments] != [s for _, s in b.segments] or a.block != b.block:
            raise refuse(node, "an addition of tensors whose channels are concatenated differently")
        for (va, _), (vb, _) in zip(a.segments, b.segments):
            self.vars.union(va, vb)
        return a

    def run(self) -> None:
        _refuse_attention(self.gm, self.modules)
        for idx, node in enumerate(self.gm.graph.nodes):
            self.order.setdefault(node.target if node.op == "call_module" else node.name, idx)
            if node.op == "placeholder":
                shape = shape_of(node)
                self.layout[node] = self.new(shape[1], fixed=True) if shape and len(shape) > 1 else None
            elif node.op == "call_module":
                self.layout[node] = self.module(node, self.modules[node.target])
            elif node.op in ("call_function", "call_method"):
                self.layout[node] = self.function(node, node.target)
            elif node.op == "get_attr":
                self.layout[node] = self.attribute(node)
            elif node.op == "output":
                outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
                self.outputs = [self.input(node, o) for o in outs]

    def attribute(self, node: fx.Node) -> Layout:
        """A tensor used in forward that broadcasts over the batch with channels last (a class token,
        position embeddings): a variable of its own, written by the tensor."""
        shape = shape_of(node)
        if node.target not in self.tensors or shape is None or len(shape) < 2 or shape[0] != 1 or shape[-1] < 2:
            raise refuse(node, "a tensor attribute used directly in forward (a learned scale or embedding)")
        if node.target not in self.parameters:
            self.parameters[node.target] = self.new(shape[-1]).moved(len(shape) - 1)
        return self.parameters[node.target]

    def module(self, node: fx.Node, m: nn.Module) -> Layout | None:
        name = node.target
        if any(True for _ in m.parameters()) and self.calls[name] > 1:
            raise refuse(node, "a layer whose weights are used more than once")
        kind = layers.kind_of(m)
        if kind is not None and kind.in_channels is not None:
            return self.weighted(node, m)
        x = self.input(node, node.args[0])
        if kind is not None:                            # a per-channel layer (a norm)
            check_layer(node, m, self.layout.get(node.args[0]))
            if any(True for _ in m.parameters()) or getattr(m, "running_mean", None) is not None:
                self.writes += x.members(name)
            return x
        if isinstance(m, nn.Flatten):
            return self.reshape(node, x)
        if isinstance(m, POOL_MODULES):
            return pooled(node, x)
        if isinstance(m, SAME_CHANNEL_MODULES):
            return x
        raise refuse(node, f"module type {type(m).__name__}")

    def weighted(self, node: fx.Node, m: nn.Module) -> Layout:
        """Convolutions and linear layers read one space and write a new one; depthwise ones keep it."""
        x = self.input(node, node.args[0])
        check_layer(node, m, self.layout.get(node.args[0]))
        if len(shape_of(node.args[0]) or ()) > 2 and x.block != 1:
            raise refuse(node, f"a {type(m).__name__} applied to a flattened tensor")
        if layers.is_per_channel(m):
            self.writes += x.members(node.target)
            return x
        self.reads += x.members(node.target)
        out = self.new(layers.out_channels(m)).moved(x.axis)
        self.writes += out.members(node.target)
        return out

    def reshape(self, node: fx.Node, x: Layout) -> Layout:
        """A flatten or view (``layouts.reshaped``), noting the heads where it splits them."""
        out, heads = reshaped(node, x)
        if heads is not None:
            self.heads[x.segments[0][0]] = heads
        return out

    def attention(self, node: fx.Node) -> Layout:
        """``scaled_dot_product_attention(q, k, v)`` on heads [B, H, N, d]: queries and keys are one
        space (their products are summed within a head), and values keep the head order of both."""
        q, k, v = attention_inputs(node)
        parts = [self.input(node, t) for t in (q, k, v)]
        heads = set()
        for t, part in zip((q, k, v), parts):
            n = len(shape_of(t))
            if part.head_axis is None or part.axis != n - 1 or part.head_axis >= n - 2 or len(part.segments) != 1:
                raise refuse(node, "attention on a tensor not split into heads [batch, heads, tokens, features]")
            heads.add(self.heads.get(part.segments[0][0]))
        (vq, _), (vk, _), (vv, _) = (p.segments[0] for p in parts)
        if len(heads) != 1 or self.size[vq] != self.size[vk]:
            raise refuse(node, "attention whose queries, keys and values have different heads")
        self.vars.union(vq, vk)
        if self.vars.find(vq) == self.vars.find(vv):
            raise refuse(node, "attention whose values are its queries or keys")
        self.ties.append((vq, vv))
        return parts[2]

    def function(self, node: fx.Node, t) -> Layout | None:
        if shape_of(node) is None and all(self.layout.get(a) is None for a in node.all_input_nodes):
            return None  # arithmetic on sizes and other plain values
        tensors = [a for a in node.args if isinstance(a, fx.Node) and shape_of(a) is not None]
        if t in ADDS:
            if not tensors:
                return None
            out = self.input(node, tensors[0])
            for a in tensors[1:]:
                if shape_of(a) != shape_of(tensors[0]) and not broadcasts(tensors[0], a, self.layout.get(tensors[0]),
                                                                          self.layout.get(a)):
                    raise refuse(node, "an addition of tensors of different shapes")
                out = self.unify(node, out, self.input(node, a))
            return out
        if t in PRODUCTS:
            if len(tensors) > 1:
                raise refuse(node, "a product of two feature maps (a multiplicative gate such as "
                                    "squeeze-and-excitation)")
            return self.input(node, tensors[0]) if tensors else None
        if t in CONCATS:
            return self.concat(node)
        if t in POOL_FUNCTIONS:
            return pooled(node, self.input(node, node.args[0]))
        if t in SAME_CHANNEL_FUNCTIONS or t in SAME_CHANNEL_METHODS or t == "expand":
            return self.input(node, node.args[0])
        if t in RESHAPES:
            return self.reshape(node, self.input(node, node.args[0]))
        if t in TRANSPOSES:
            return transposed(node, self.input(node, node.args[0]))
        if t is F.scaled_dot_product_attention:
            return self.attention(node)
        if t in REDUCTIONS:
            return reduced(node, self.input(node, node.args[0]))
        if t in NO_TENSOR:
            if shape_of(node) is not None:
                if t is operator.getitem and self.layout.get(node.args[0]) is not None:
                    self.selects.add(node)
                    return selected(node, self.layout[node.args[0]])
                raise refuse(node, "indexing into a tensor (e.g. a slice of its channels)")
            return None
        raise refuse(node, f"operation {op_name(t)!r}")

    def concat(self, node: fx.Node) -> Layout:
        parts = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        shape = shape_of(node)
        if shape is not None and dim % len(shape) != 0:
            tokens = self.token_concat(node, parts, dim % len(shape))
            if tokens is not None:
                return tokens
        if shape is None or dim not in (1, 1 - len(shape)):
            raise refuse(node, f"a concatenation along axis {dim} (only the channel axis, 1, is supported)")
        return channels_joined(node, [self.input(node, p) for p in parts])

    def token_concat(self, node: fx.Node, parts, dim: int) -> Layout | None:
        """Tokens joined along a token axis (the class token in front of the patches): one space."""
        layouts = [self.layout.get(p) if isinstance(p, fx.Node) else None for p in parts]
        if any(x is None or x.axis == 1 or x.axis == dim or x.head_axis is not None or x.block != 1
               or len(x.segments) != 1 for x in layouts):
            return None
        out = layouts[0]
        for x in layouts[1:]:
            out = self.unify(node, out, x)
        return out

def _refuse_attention(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    """Attention is refused up front: its reshapes would otherwise be reported first."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], ATTENTION_MODULES):
            raise refuse(node, f"attention ({type(modules[node.target]).__name__}): its heads and "
                               "softmax mix channels, which zipit cannot merge")
        if node.op in ("call_function", "call_method") and node.target in ATTENTION:
            raise refuse(node, f"{op_name(node.target)!r}, which mixes channels (attention or a matrix product)")


def trace_spaces(model: nn.Module, example: torch.Tensor) -> dict:
    """Trace ``model`` on ``example`` (any device, the meta device too) and derive its spaces.

    Returns ``spaces`` (name, writers, readers, observe, parameters, heads, heads_with and
    observe_axis; members as ``Member``), ``classifiers``, and ``inputs`` and ``outputs``: for each
    module, which traced space each slice of its input (output) holds (coverage checks observe
    points with them).
    """
    tr = _Tracer(model, example)
    tr.run()
    find = tr.vars.find
    attended = {find(q) for q, _ in tr.ties}
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
            groups.setdefault(root, {"writers": [], "readers": [], "parameters": []})["writers"].append(m)
    for key, layout in tr.parameters.items():
        root = find(layout.segments[0][0])
        if root not in groups:
            raise SpecError(f"cannot derive feature spaces: the channels of {key!r} are written by no layer "
                            "of a feature space", "zipit merges tensors used in forward only within a space")
        groups[root]["parameters"].append(key)
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
        if not g["readers"] and root not in attended:
            raise SpecError(f"cannot derive feature spaces: channels written by {first!r} are never read by a "
                            "layer", "zipit needs every feature space to end in a convolution or linear layer")
        for key in ("writers", "readers"):
            g[key].sort(key=lambda m: tr.order[m.module])
        observe, axis = _observe_point(tr, root, g["readers"][-1] if g["readers"] else None, g["writers"])
        spaces.append({"writers": g["writers"], "readers": g["readers"], "root": root, "observe": observe,
                       "parameters": g["parameters"], "heads": _heads(tr, root), "observe_axis": axis})
    spaces.sort(key=lambda s: tr.order[s["writers"][0].module])
    _name_spaces(spaces, tr.modules, attended)
    name_of = {s.pop("root"): s["name"] for s in spaces}
    for s in spaces:
        s["heads_with"] = _heads_with(tr, s, name_of)
    inputs, outputs = {}, {}  # what each module's input (output) holds: [(space name or None, member)]
    for node in tr.gm.graph.nodes:
        if node.op != "call_module" or tr.calls[node.target] != 1:
            continue
        for table, tensor in ((inputs, node.args[0] if node.args else None), (outputs, node)):
            layout = tr.layout.get(tensor) if isinstance(tensor, fx.Node) else None
            if layout is not None:
                table[node.target] = [(name_of.get(find(v)), m) for v, m in layout.members(node.target)]
    return {"spaces": spaces, "classifiers": classifiers, "inputs": inputs, "outputs": outputs}


def node_layouts(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[tuple[Member | None, ...], int, bool]]:
    """How each fx node of ``model`` holds channels, for cutting a graph inside a space: per
    channel segment a layer that writes its space (None: the model input, the outputs), the
    channels' axis, and whether they are plain (one segment, not flattened, not split into heads).
    Nodes without channels (sizes) are left out."""
    tr = _Tracer(model, example)
    tr.run()
    writer: dict[int, Member] = {}
    for v, m in tr.writes:
        writer.setdefault(tr.vars.find(v), m)
    out = {}
    for node, layout in tr.layout.items():
        if layout is not None:
            writers = tuple(writer.get(tr.vars.find(v)) for v, _ in layout.segments)
            plain = len(layout.segments) == 1 and layout.block == 1 and layout.head_axis is None
            out[node.name] = (writers, layout.axis, plain)
    return out


def _heads(tr: _Tracer, root: int) -> int | None:
    """The number of attention heads a space is split into (None: not split)."""
    found = {h for v, h in tr.heads.items() if tr.vars.find(v) == root}
    if len(found) > 1:
        counts = " and ".join(map(str, sorted(found)))
        raise SpecError(f"cannot derive feature spaces: one space is split into {counts} attention heads",
                        "zipit needs every attention on a space to have the same heads")
    return found.pop() if found else None


def _heads_with(tr: _Tracer, space: dict, name_of: dict[int, str]) -> str | None:
    """The query/key space whose head order a value space shares."""
    root = next(r for r, n in name_of.items() if n == space["name"])
    find = tr.vars.find
    partners = {name_of[find(q)] for q, v in tr.ties if find(v) == root}
    if len(partners) > 1 or (partners and any(find(q) == root for q, _ in tr.ties)):
        raise SpecError(f"cannot derive feature spaces: the values {space['name']} belong to more than one "
                        "attention, or are queries too", "zipit needs each value space to belong to one attention")
    return partners.pop() if partners else None


def _call_node(gm: fx.GraphModule, module: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == module)


def _observe_point(tr: _Tracer, root: int, last_reader: Member | None, writers: list[Member]) -> tuple[Member, int]:
    """Where the space is observed, and the axis of its channels there (-1: the last).

    The input of the space's last reader, or of the earliest module in the chain of pooling,
    dropout and flatten in front of it: the same channels, at more positions (more samples). Where
    the reader sees one token (a classifier on the class token), the input of the last norm that
    sees every token instead; queries and keys, which no layer reads, at the first writer's output.
    """
    if last_reader is None:
        first = writers[0]
        return Member(first.module, first.offset, first.block, output=True), \
            _axis_of(tr.layout[_call_node(tr.gm, first.module)], _call_node(tr.gm, first.module))
    best = last_reader
    node = _call_node(tr.gm, last_reader.module).args[0]
    if node in tr.selects:
        norms = [w for w in writers if w.whole and tr.calls[w.module] == 1
                 and layers.is_per_channel(tr.modules[w.module])
                 and _call_node(tr.gm, w.module).args[0] not in tr.selects]
        if norms:
            best = norms[-1]
    while isinstance(node, fx.Node) and _passes_through(tr, node):
        if node.op == "call_module" and tr.calls[node.target] == 1:
            layout = tr.layout[node.args[0]]
            best = next(m for v, m in layout.members(node.target) if tr.vars.find(v) == root)
        node = node.args[0]
    arg = _call_node(tr.gm, best.module).args[0]
    return best, _axis_of(tr.layout[arg], arg)


def _axis_of(layout: Layout, node: fx.Node) -> int:
    """The channel axis as a spec writes it: 1 for maps and [B, C], -1 for the last axis of tokens."""
    n = len(shape_of(node))
    return -1 if layout.axis == n - 1 and layout.axis != 1 else layout.axis


def _passes_through(tr: _Tracer, node: fx.Node) -> bool:
    """Nodes that show each channel unchanged (at fewer positions, or flattened)."""
    if node.op == "call_module":
        return isinstance(tr.modules[node.target], OBSERVE_THROUGH_MODULES)
    return node.op in ("call_function", "call_method") and node.target in OBSERVE_THROUGH_FUNCTIONS


def _name_spaces(spaces: list[dict], modules: dict, attended: set[int]) -> None:
    """Name single-writer spaces after their layer and residual streams after the blocks they span:
    ``layer2.stream`` when it spans all of ``layer2``, ``features.2-3.stream`` when part of it.
    Attention's queries and keys are named after both (``attn.qk``)."""
    used = Counter()
    for s in spaces:
        convs = [w.module for w in s["writers"] if w.whole and layers.is_weighted(modules[w.module])]
        parents = {c.rpartition(".")[0] for c in convs}
        if s["root"] in attended and len(convs) > 1 and len(parents) == 1:
            name = ".".join(filter(None, [parents.pop(), "".join(c.rpartition(".")[2] for c in convs)]))
        elif len(convs) == 1:
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
