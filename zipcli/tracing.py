"""Derive a spec's feature spaces from a model by tracing it with torch.fx.

Every tensor with a channel axis gets a channel variable; operations that keep
channels (norms, activations, pooling, flatten of 1x1 maps) pass it on, residual
additions unify their inputs, and convolutions / linear layers start a new one.
The unified variables that some layer writes are the feature spaces. Anything
the tracer cannot reason about is refused with the operation and layer named:
a silently wrong spec would merge fine and give garbage.
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
import yaml
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from .errors import SpecError
from .graph import CONV_LIKE, NORM_LIKE, is_depthwise, trace

SAME_CHANNEL_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.Tanh,
    nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)
GLOBAL_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d)
SAME_CHANNEL_FUNCTIONS = {
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu, F.elu, torch.tanh,
    F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
}
SAME_CHANNEL_METHODS = {"relu", "relu_", "contiguous", "clone"}
RESHAPES = {torch.flatten, "flatten", "view", "reshape"}
ADDS = {operator.add, operator.iadd, torch.add}
NO_TENSOR_METHODS = {"size", "dim"}


class _Vars:
    """Union-find over channel variables; a variable tied to the input is fixed."""

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


def _shape(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    layer = next(reversed(stack)) if stack else "the top-level forward"
    return f"{node.op} {node.target if isinstance(node.target, str) else getattr(node.target, '__name__', node.target)} (in {layer})"


def _refuse(node: fx.Node, why: str) -> SpecError:
    return SpecError(f"cannot derive feature spaces: {why} at {_where(node)}",
                     "this operation is not supported by the tracer; see specs/README.md")


def trace_spaces(model: nn.Module, example: torch.Tensor) -> dict:
    """Return ``{"spaces": [...], "classifiers": [...], "order": [...]}`` for ``model``."""
    model.eval()
    gm = trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    modules = dict(model.named_modules())
    vars_, var_of = _Vars(), {}
    writers, readers, order = {}, {}, {}
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")

    def var(node_arg, node):
        if not isinstance(node_arg, fx.Node) or node_arg not in var_of or var_of[node_arg] is None:
            raise _refuse(node, "an input without a channel axis")
        return var_of[node_arg]

    def keeps_flat_channels(node):
        src, out = _shape(node.args[0]), _shape(node)
        return src is not None and out is not None and len(out) == 2 and out[1] == src[1] and all(
            d == 1 for d in src[2:])

    for idx, node in enumerate(gm.graph.nodes):
        order[node.name] = idx
        out = None
        if node.op == "placeholder":
            out = vars_.new(fixed=True)
        elif node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, CONV_LIKE):
                if isinstance(m, nn.Linear) and len(_shape(node.args[0]) or ()) != 2:
                    raise _refuse(node, "a linear layer applied to a tensor that is not [batch, features]")
                if is_depthwise(m):
                    out = var(node.args[0], node)
                else:
                    if isinstance(m, nn.Conv2d) and m.groups != 1:
                        raise _refuse(node, f"a grouped convolution (groups={m.groups}) whose groups must stay intact")
                    readers[node.target] = var(node.args[0], node)
                    out = vars_.new()
                writers[node.target] = out
            elif isinstance(m, NORM_LIKE):
                out = var(node.args[0], node)
                writers[node.target] = out
            elif isinstance(m, nn.Flatten):
                if not keeps_flat_channels(node):
                    raise _refuse(node, "a flatten that mixes channels with spatial positions")
                out = var(node.args[0], node)
            elif isinstance(m, SAME_CHANNEL_MODULES):
                out = var(node.args[0], node)
            else:
                raise _refuse(node, f"module type {type(m).__name__}")
            if any(True for _ in m.parameters()) and calls[node.target] > 1:
                raise _refuse(node, "a layer whose weights are used more than once")
        elif node.op in ("call_function", "call_method"):
            t = node.target
            if t in ADDS:
                tensors = [a for a in node.args if isinstance(a, fx.Node) and _shape(a) is not None]
                if not tensors:
                    out = None
                else:
                    out = var(tensors[0], node)
                    for a in tensors[1:]:
                        if _shape(a) != _shape(tensors[0]):
                            raise _refuse(node, "an addition of tensors of different shapes")
                        out = vars_.union(out, var(a, node))
            elif t in SAME_CHANNEL_FUNCTIONS or t in SAME_CHANNEL_METHODS:
                out = var(node.args[0], node)
            elif t in RESHAPES:
                if not keeps_flat_channels(node):
                    raise _refuse(node, "a reshape that mixes channels with spatial positions")
                out = var(node.args[0], node)
            elif t in NO_TENSOR_METHODS or t in (operator.getitem, getattr):
                if _shape(node) is not None:
                    raise _refuse(node, "indexing into a tensor")
                out = None
            elif t == "mean" and tuple(node.args[1:2]) in ((2, 3), ([2, 3],), ((2, 3),)):
                out = var(node.args[0], node)
            else:
                name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
                raise _refuse(node, f"operation {name!r}")
        elif node.op == "get_attr":
            raise _refuse(node, "a tensor attribute used directly in forward")
        elif node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
            class_vars = {vars_.find(var(o, node)) for o in outs}
        var_of[node] = out

    classifiers = sorted((m for m, v in writers.items() if vars_.find(v) in class_vars), key=lambda m: order[
        _call_node(gm, m).name])
    groups: dict[int, dict] = {}
    for m, v in writers.items():
        root = vars_.find(v)
        if root in class_vars:
            continue
        groups.setdefault(root, {"writers": [], "readers": []})["writers"].append(m)
    for m, v in readers.items():
        root = vars_.find(v)
        if vars_.fixed[root]:
            continue  # reads the model input (RGB): not a feature space
        if root not in groups:
            raise _refuse(_call_node(gm, m), "a layer reading channels that no layer writes")
        groups[root]["readers"].append(m)
    spaces = []
    for root, g in groups.items():
        if vars_.fixed[root]:
            raise SpecError(f"cannot derive feature spaces: the channels written by {g['writers'][0]!r} "
                            "are added to the model input", "such channels cannot be permuted")
        g["writers"].sort(key=lambda m: order[_call_node(gm, m).name])
        g["readers"].sort(key=lambda m: order[_call_node(gm, m).name])
        if not g["readers"]:
            raise SpecError(f"cannot derive feature spaces: channels written by {g['writers'][0]!r} are never read "
                            "by a layer", "zipit needs every feature space to end in a convolution or linear layer")
        spaces.append({"writers": g["writers"], "readers": g["readers"],
                       "observe": _observe_point(gm, modules, g["readers"][-1])})
    spaces.sort(key=lambda s: order[_call_node(gm, s["writers"][0]).name])
    _name_spaces(spaces, modules)
    return {"spaces": spaces, "classifiers": classifiers}


def _call_node(gm: fx.GraphModule, module: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == module)


def _observe_point(gm: fx.GraphModule, modules: dict, last_reader: str) -> str:
    """Observe a space at the input of its last reader, or before a global pooling in front of it."""
    node = _call_node(gm, last_reader).args[0]
    observe = last_reader
    while isinstance(node, fx.Node):
        if node.op == "call_module" and isinstance(modules[node.target], GLOBAL_POOL_MODULES):
            observe = node.target
            break
        if node.op == "call_module" and isinstance(modules[node.target], (nn.Flatten, nn.Dropout, nn.Identity)):
            node = node.args[0]
        elif node.op in ("call_function", "call_method") and node.target in RESHAPES | {F.dropout}:
            node = node.args[0]
        else:
            break
    return observe


def _name_spaces(spaces: list[dict], modules: dict) -> None:
    """Name single-writer spaces after their layer and residual streams after their stage."""
    used = Counter()
    for s in spaces:
        convs = [w for w in s["writers"] if isinstance(modules[w], CONV_LIKE)]
        if len(convs) <= 1:
            name = (convs or s["writers"])[0]
        else:
            stage = Counter(w.split(".")[0] for w in convs).most_common(1)[0][0]
            name = f"{stage}.stream"
        used[name] += 1
        s["name"] = name if used[name] == 1 else f"{name}#{used[name]}"


def spec_document(name: str, builder: str, kwargs: dict, preprocess: dict, *, description: str = "",
                  num_classes_arg: str = "num_classes", stops: list[str] | None = None,
                  default_stop: str | None = None) -> dict:
    """Build the model, trace it and return a complete spec document (a YAML-ready dict).

    Without ``stops``, every top-level child after which the graph can be cut
    cleanly (a stage boundary) is suggested.
    """
    from .graph import ModelGraph
    from .models import resolve_builder
    from .specs import FORMAT_VERSION, parse_spec

    model = resolve_builder(builder)(**kwargs)
    size = preprocess["size"]
    traced = trace_spaces(model, torch.zeros(2, 3, size, size))
    candidates = stops or [n for n, c in model.named_children()
                           if any(True for _ in c.parameters()) and n not in traced["classifiers"]]
    doc = {"format": FORMAT_VERSION, "name": name, "description": description, "builder": builder,
           "kwargs": dict(kwargs), "num_classes_arg": num_classes_arg, "input": dict(preprocess),
           "classifiers": traced["classifiers"], "stops": list(candidates), "default_stop": candidates[-1],
           "spaces": [{k: s[k] for k in ("name", "observe", "writers", "readers")} for s in traced["spaces"]]}
    graph = ModelGraph(parse_spec(dump_spec(doc), origin=name), model)
    valid = []
    for stop in candidates:
        try:
            if graph.plan(stop).merged_spaces:
                valid.append(stop)
        except SpecError:
            if stops:
                raise
    if not valid:
        raise SpecError(f"no stop point found for {name!r}", "name stage modules explicitly")
    doc["stops"] = valid
    doc["default_stop"] = default_stop or valid[-1]
    return doc


def dump_spec(doc: dict) -> str:
    header = ("# zipit architecture spec (format 1), generated by tracing the model.\n"
              "# Regenerate instead of editing by hand; see specs/README.md.\n")
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
