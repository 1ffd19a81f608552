"""Fuse merge (M) and unmerge (U) matrices into parameters: the zip operation.

For a shared (trunk) layer, ``W* = sum_i M_i W_i U_i``: M acts on the output
channels of writers, U on the input channels of readers. Per-channel parameters
(BatchNorm, biases, depthwise kernels) take M like a bias; the BatchNorm
variance takes M on the standard deviation, which is the squared-M rule for
matched features that are fully correlated and makes a merge with a permuted
copy exact (BN reset replaces it anyway). Head layers keep their own weights
with only U applied to their inputs. Groupings are applied with index_add,
never as dense matrices; a method that returns dense M and U is applied by
matrix products.

A merged space may be wider than one model's (O <= W <= n*O, the size dial): M_i then
writes W rows and U_i reads W columns; only spaces whose members cover their modules'
whole channel axes can change width.
"""
from __future__ import annotations

import torch

from .errors import ZipitError
from .merged import UNMERGE
from .methods import Match
from .specs import layers
from .specs.format import Member
from .specs.graph import ModelGraph, StopPlan, on_channels, on_last_axis


def _merge_out(t: torch.Tensor, assign: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """M_i applied to axis 0: each merged channel averages its group (this model's share)."""
    out = torch.zeros((counts.numel(),) + t.shape[1:], dtype=t.dtype)
    out.index_add_(0, assign, t)
    return out / counts.view(-1, *([1] * (t.dim() - 1)))


def _unmerge_in(t: torch.Tensor, assign: torch.Tensor, size: int) -> torch.Tensor:
    """W_i U_i on axis 1: a merged input channel feeds every member it came from."""
    out = torch.zeros((t.shape[0], size) + t.shape[2:], dtype=t.dtype)
    out.index_add_(1, assign, t)
    return out


class SpaceMerge:
    """One space's M_i (on output channels) and U_i (on input channels), per model i."""

    def __init__(self, match: Match):
        self.size = match.size
        if match.is_grouping:
            self.assign = torch.as_tensor(match.assign)
            self.counts = torch.as_tensor(match.counts(), dtype=torch.float64)
        else:
            self.assign = None
            o = match.source_width
            m, u = torch.as_tensor(match.dense_merge), torch.as_tensor(match.dense_unmerge)
            self.merges = [m[:, i * o:(i + 1) * o] for i in range(match.n_models)]      # (W, O_i)
            self.unmerges = [u[i * o:(i + 1) * o] for i in range(match.n_models)]      # (O_i, W)

    def merge_out(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """M_i on axis 0."""
        if self.assign is not None:
            return _merge_out(t, self.assign[i], self.counts)
        return torch.tensordot(self.merges[i].to(t.dtype), t, dims=([1], [0]))

    def merge_rows(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """sum_i M_i y_i for samples ``rows[i]`` (samples, O_i) of each model's features, as
        (samples, W), in their dtype."""
        if self.assign is None:
            return sum(r @ m.T.to(r.device, r.dtype) for r, m in zip(rows, self.merges))
        out = rows[0].new_zeros(len(rows[0]), self.size)     # on the rows' device (the refit's: CUDA too)
        for r, assign in zip(rows, self.assign):
            out.index_add_(1, assign.to(out.device), r)
        return out / self.counts.to(out.device, out.dtype)

    def unmerge_in(self, t: torch.Tensor, i: int) -> torch.Tensor:
        """W_i U_i on axis 1."""
        if self.assign is not None:
            return _unmerge_in(t, self.assign[i], self.size)
        return (t.movedim(1, -1) @ self.unmerges[i].to(t.dtype)).movedim(-1, 1)


class Zipper:
    """Applies one stop's matches to the state dicts of n source models."""

    def __init__(self, graph: ModelGraph, plan: StopPlan, matches: dict[str, Match]):
        self.graph, self.plan = graph, plan
        self.spaces = {s: SpaceMerge(m) for s, m in matches.items()}
        for s, m in matches.items():
            check_width(graph, s, m.size, m.n_models)

    def _members(self, key: str) -> tuple[list[tuple[str, Member]], list[tuple[str, Member]], str]:
        """The merged spaces on this tensor's output axis and (weights only) input axis."""
        module, _, attr = key.rpartition(".")
        merged = self.plan.merged_spaces
        outs = [(s, m) for s, m in self.graph.writes.get(module, []) if s in merged]
        ins = [(s, m) for s, m in self.graph.reads.get(module, []) if s in merged] if attr == "weight" else []
        return outs, ins, attr

    def _unmerge_inputs(self, t: torch.Tensor, ins, i: int) -> torch.Tensor:
        for s, member in ins:
            size = self.graph.space_size[s]
            t = on_channels(t, 1, member, size, lambda x, s=s: self.spaces[s].unmerge_in(x, i))
        return t

    def _merge_outputs(self, t: torch.Tensor, outs, i: int, attr: str) -> torch.Tensor:
        for s, member in outs:
            def merge(x, s=s):
                if attr in layers.VARIANCE_BUFFERS:
                    x = x.clamp_min(0).sqrt()
                return self.spaces[s].merge_out(x, i)
            t = on_channels(t, 0, member, self.graph.space_size[s], merge)
        return t

    def trunk(self, keys: list[str], state_dicts: list[dict]) -> dict[str, torch.Tensor]:
        """Shared parameters: sum over models of M_i p_i U_i (a plain mean on channels no space merges)."""
        n = len(state_dicts)
        out = {}
        for key in keys:
            ref = state_dicts[0][key]
            space = self.graph.param_writes.get(key)
            if space in self.plan.merged_spaces:     # a class token, position embeddings: M on the last axis
                out[key] = sum(on_last_axis(sd[key].double(), lambda x, i=i: self.spaces[space].merge_out(x, i))
                               for i, sd in enumerate(state_dicts)).to(ref.dtype)
                continue
            outs, ins, attr = self._members(key)
            if attr in layers.NON_CHANNEL_BUFFERS or not ref.is_floating_point():
                out[key] = ref.clone()
                continue
            inputs = [self._unmerge_inputs(sd[key].double(), ins, i) for i, sd in enumerate(state_dicts)]
            total = sum(inputs) / n
            if outs:
                merged = sum(self._merge_outputs(t, outs, i, attr) for i, t in enumerate(inputs))
                for s, member in outs:
                    size = self.graph.space_size[s]
                    part = _channels(merged, member, self.spaces[s].size)
                    part = part ** 2 if attr in layers.VARIANCE_BUFFERS else part
                    total = on_channels(total, 0, member, size, lambda _, part=part: part)
            out[key] = total.to(ref.dtype)
        return out

    def head(self, keys: list[str], state_dict: dict, i: int) -> dict[str, torch.Tensor]:
        """Model i's own layers after the stop, reading the merged features through U_i: folded into
        the layers that read a merged space, explicit (an ``Unmerge``) where the stop cuts a space,
        whose readers after the stop then see model i's own channels."""
        out = {}
        dtype = next((v.dtype for v in state_dict.values() if v.is_floating_point()), torch.float32)
        for key in keys:
            if key.startswith(UNMERGE + "."):
                space = self.plan.unmerges[int(key.split(".")[1])][1]
                eye = torch.eye(self.graph.space_size[space], dtype=torch.float64)
                out[key] = self.spaces[space].unmerge_in(eye, i).to(dtype)
                continue
            t = state_dict[key]
            _, ins, attr = self._members(key)
            ins = [(s, m) for s, m in ins if s not in self.plan.cut_spaces]
            if ins and t.is_floating_point() and t.dim() >= 2:
                t = self._unmerge_inputs(t.double(), ins, i).to(t.dtype)
            out[key] = t
        return out


def check_width(graph: ModelGraph, space: str, width: int, n_models: int) -> None:
    """Refuse a merged width outside [O, n*O], or one other than O for a space that cannot change
    width yet: a member is a slice of its module's channels (a concatenation: DenseNet), it is split
    into attention heads (heads are matched whole, never half widened), or tensors used directly in
    forward write it (a class token, position embeddings)."""
    o = graph.space_size[space]
    if not o <= width <= n_models * o:
        raise ValueError(f"space {space}: merged width {width} is outside [{o}, {n_models * o}]")
    if width == o:
        return
    declared = graph.spec.space(space)
    if declared.heads is not None:
        raise ZipitError(f"space {space!r} is split into attention heads: merging it at a size is not supported yet",
                         "merge without a size")
    if declared.parameters:
        raise ZipitError(f"space {space!r} is written by {', '.join(declared.parameters)} (tensors used directly "
                         "in forward): merging it at a size is not supported yet", "merge without a size")
    for role, table, channels in (("writer", graph.writes, layers.out_channels),
                                  ("reader", graph.reads, layers.in_channels)):
        for module, entries in table.items():
            for s, member in entries:
                if s == space and (member.start or channels(graph.modules[module]) != o * member.block):
                    raise ZipitError(f"space {space} is part of a concatenation ({role} {member}): merging it "
                                     "at a size is not supported yet", "merge without a size")


def _channels(t: torch.Tensor, member: Member, size: int) -> torch.Tensor:
    """The channels ``member`` covers on axis 0 of ``t``."""
    view = t.unflatten(0, (-1, member.block)) if member.block != 1 else t
    return view.narrow(0, member.start, size)
