"""A tensor's channel layout, and how shape operations move it: the tracer's rules that need
nothing but the operation's node and its input's layout (no walk over the graph, no state of
their own), and the union-find over channel variables that the tracer keeps.

A rule returns the output's layout or raises a ``SpecError`` naming the operation and the layer:
an operation the rules cannot reason about is refused, never guessed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch.fx as fx
import torch.nn as nn

from ..errors import SpecError
from . import layers
from .format import Member


class Vars:
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
    each channel is a run of ``block`` values. The channels are on tensor axis ``axis`` (1 for
    maps, the last for tokens); split into attention heads, the head is on ``head_axis``."""

    segments: tuple[tuple[int, int], ...]
    block: int = 1
    axis: int = 1
    head_axis: int | None = None

    def moved(self, axis: int, head_axis: int | None = None) -> "Layout":
        return Layout(self.segments, self.block, axis, head_axis)

    def members(self, module: str) -> list[tuple[int, Member]]:
        """How ``module`` sees each variable of this layout: whole, or at an offset."""
        if len(self.segments) == 1 and self.block == 1:
            return [(self.segments[0][0], Member(module))]
        out, offset = [], 0
        for var, size in self.segments:
            out.append((var, Member(module, offset, self.block)))
            offset += size
        return out


def shape_of(node) -> tuple | None:
    """The node's output shape from shape propagation; None for a non-tensor."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def op_name(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    layer = next(reversed(stack)) if stack else "the top-level forward"
    if node.op == "call_module":
        return f"layer {node.target!r}"
    return f"{node.op} {op_name(node.target)!r} (in {layer!r})"


def refuse(node: fx.Node, why: str) -> SpecError:
    return SpecError(f"cannot derive feature spaces: {why} at {_where(node)}",
                     "the tracer does not support this operation; see 'Supported operations' in specs/README.md "
                     "(installed as zipcli/specs/README.md)")


def pooled(node: fx.Node, x: Layout) -> Layout:
    if x.axis != 1 or x.head_axis is not None:
        raise refuse(node, "pooling over a tensor whose channels are not on axis 1")
    return x


def reshaped(node: fx.Node, x: Layout) -> tuple[Layout, int | None]:
    """[B, C, H, W] -> [B, C*H*W]: channel-major, so each channel becomes a block of H*W values.
    [B, C, H, W] -> [B, C, H*W] keeps the channels; tokens [B, N, H*d] <-> [B, N, H, d] split
    the channels into attention heads or join them again. The layout, and the number of heads
    where the reshape splits them (else None)."""
    src, out = shape_of(node.args[0]), shape_of(node)
    if src is not None and out is not None:
        n = len(src)
        if x.axis == 1 and x.head_axis is None:
            if len(out) == 2 and out[0] == src[0] and out[1] == math.prod(src[1:]):
                return Layout(x.segments, x.block * math.prod(src[2:])), None
            if n > 2 and x.block == 1 and out == src[:2] + (math.prod(src[2:]),):
                return x, None
        if x.axis == n - 1 and n > 2 and x.head_axis is None and len(x.segments) == 1 and x.block == 1 \
                and len(out) == n + 1 and out[:-2] == src[:-1] and out[-2] * out[-1] == src[-1]:
            return x.moved(n, n - 1), out[-2]
        if x.head_axis == n - 2 and x.axis == n - 1 and out == src[:-2] + (src[-2] * src[-1],):
            return x.moved(n - 2), None
    raise refuse(node, "a reshape that mixes channels with the batch or spatial positions")


def transposed(node: fx.Node, x: Layout) -> Layout:
    """Axes moved (the batch axis stays first): the channels and heads move with them."""
    n = len(shape_of(node))
    if op_name(node.target) == "transpose":
        a, b = (list(node.args[1:3]) + [node.kwargs.get("dim0"), node.kwargs.get("dim1")])[:2]
        order = list(range(n))
        order[a % n], order[b % n] = order[b % n], order[a % n]
    else:
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
        order = [d % n for d in (dims or node.kwargs.get("dims"))]
    if order[0] != 0:
        raise refuse(node, "a transpose that moves the batch axis")
    return x.moved(order.index(x.axis), None if x.head_axis is None else order.index(x.head_axis))


def selected(node: fx.Node, x: Layout) -> Layout:
    """``x[:, 0]``: indexing axes in front of the channels (never the batch or channels) keeps them."""
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    full = slice(None, None, None)
    ok = x.head_axis is None and x.block == 1 and len(index) > 0 and index[0] == full and all(
        isinstance(i, (int, slice)) and (a < x.axis or i == full) for a, i in enumerate(index))
    if not ok:
        raise refuse(node, "indexing into a tensor (e.g. a slice of its channels)")
    return x.moved(x.axis - sum(isinstance(i, int) for i in index))


def reduced(node: fx.Node, x: Layout) -> Layout:
    """A mean/sum/max over spatial axes or tokens keeps the channels; over the channel axis it is refused."""
    src = shape_of(node.args[0])
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if src is None or not dims or x.block != 1 or x.head_axis is not None or any(
            d % len(src) in (0, x.axis) or (x.axis == 1 and d % len(src) < 2) for d in dims):
        raise refuse(node, f"a reduction {op_name(node.target)!r} over the batch or channel axis")
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    return x if keep else x.moved(x.axis - sum(d % len(src) < x.axis for d in dims))


def broadcasts(a: fx.Node, b: fx.Node, la: Layout | None, lb: Layout | None) -> bool:
    """Tokens plus a tensor broadcast over the batch or tokens (position embeddings), channels last."""
    sa, sb = shape_of(a), shape_of(b)
    if la is None or lb is None or sa is None or sb is None or len(sa) != len(sb):
        return False
    if la.head_axis is not None or lb.head_axis is not None:
        return False
    return la.axis == lb.axis == len(sa) - 1 and sa[-1] == sb[-1] and all(
        x == y or 1 in (x, y) for x, y in zip(sa, sb))


def channels_joined(node: fx.Node, layouts: list[Layout]) -> Layout:
    """A concatenation on the channel axis: the parts' segments one after another."""
    if len({x.block for x in layouts}) != 1:
        raise refuse(node, "a concatenation of tensors flattened from maps of different sizes")
    return Layout(tuple(s for x in layouts for s in x.segments), layouts[0].block)


def check_layer(node: fx.Node, m: nn.Module, x: Layout | None) -> None:
    """The table's reasons a layer cannot be merged, of its own or on this input's shape, and an
    input (layout ``x``) whose channels are not on the axis the layer works on."""
    shape = shape_of(node.args[0])
    why = layers.problem(m) or layers.input_problem(m, shape)
    if why:
        raise refuse(node, why)
    if x is not None and x.head_axis is not None:
        raise refuse(node, f"a {type(m).__name__} applied to a tensor split into attention heads")
    if x is not None and shape is not None and layers.channel_axis(m, shape) != x.axis:
        raise refuse(node, f"a {type(m).__name__} working on axis {layers.channel_axis(m, shape)} of a tensor "
                           f"whose channels are on axis {x.axis}")


def attention_inputs(node: fx.Node) -> tuple:
    """The query, key and value nodes of ``scaled_dot_product_attention``; a mask tensor or
    grouped queries are refused."""
    names = ("query", "key", "value")
    q, k, v = (list(node.args[:3]) + [node.kwargs.get(n) for n in names[len(node.args):]])[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    if isinstance(mask, fx.Node) or node.kwargs.get("enable_gqa"):
        raise refuse(node, "attention with a mask tensor or grouped queries")
    return q, k, v
