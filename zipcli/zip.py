"""Fuse merge (M) and unmerge (U) matrices into parameters: the zip operation.

For a shared (trunk) layer, ``W* = sum_i M_i W_i U_i``: M acts on the output
channels of writers, U on the input channels of readers. Per-channel parameters
(BatchNorm, biases, depthwise kernels) take M like a bias; the BatchNorm
variance takes M on the standard deviation, which is the squared-M rule for
matched features that are fully correlated and makes a merge with a permuted
copy exact (BN reset replaces it anyway). Head layers keep their own weights
with only U applied to their inputs. Groupings are applied with index_add,
never as dense matrices.
"""
from __future__ import annotations

import torch

from .graph import ModelGraph, StopPlan
from .matching import Match

NON_CHANNEL_BUFFERS = ("num_batches_tracked",)


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


class Zipper:
    """Applies one stop's matches to the state dicts of n source models."""

    def __init__(self, graph: ModelGraph, plan: StopPlan, matches: dict[str, Match]):
        self.graph, self.plan = graph, plan
        self.assign = {s: torch.as_tensor(m.assign) for s, m in matches.items()}
        self.counts = {s: torch.as_tensor(m.counts(), dtype=torch.float64) for s, m in matches.items()}

    def _spaces_of(self, key: str) -> tuple[str | None, str | None, str]:
        module, _, attr = key.rpartition(".")
        out_space = self.graph.out_space.get(module)
        in_space = self.graph.in_space.get(module) if attr == "weight" else None
        merged = self.plan.merged_spaces
        return (out_space if out_space in merged else None), (in_space if in_space in merged else None), attr

    def _transform(self, key: str, t: torch.Tensor, i: int, with_merge: bool) -> torch.Tensor:
        out_space, in_space, attr = self._spaces_of(key)
        if attr in NON_CHANNEL_BUFFERS or not t.is_floating_point():
            return t
        t = t.double()
        if in_space is not None and t.dim() >= 2:
            t = _unmerge_in(t, self.assign[in_space][i], self.counts[in_space].numel())
        if with_merge and out_space is not None:
            if attr == "running_var":
                t = _merge_out(t.clamp_min(0).sqrt(), self.assign[out_space][i], self.counts[out_space])
            else:
                t = _merge_out(t, self.assign[out_space][i], self.counts[out_space])
        return t

    def trunk(self, keys: list[str], state_dicts: list[dict]) -> dict[str, torch.Tensor]:
        """Shared parameters: sum over models of M_i p_i U_i (a plain mean where no space is merged)."""
        n = len(state_dicts)
        out = {}
        for key in keys:
            ref = state_dicts[0][key]
            out_space, _, attr = self._spaces_of(key)
            if attr in NON_CHANNEL_BUFFERS or not ref.is_floating_point():
                out[key] = ref.clone()
                continue
            total = sum(self._transform(key, sd[key], i, True) for i, sd in enumerate(state_dicts))
            if out_space is None:
                total = total / n
            elif attr == "running_var":
                total = total ** 2
            out[key] = total.to(ref.dtype)
        return out

    def head(self, keys: list[str], state_dict: dict, i: int) -> dict[str, torch.Tensor]:
        """Model i's own layers after the stop, reading the merged features through U_i."""
        return {k: self._transform(k, state_dict[k], i, False).to(state_dict[k].dtype) for k in keys}
