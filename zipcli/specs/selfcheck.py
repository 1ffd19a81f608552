"""Permutation self-check: permute every feature space a spec declares; outputs must not change.

A wrong spec (a reader in the wrong space, a missing writer) changes the outputs
under this test, so it catches the silent bugs of hand-written specs. Per-channel
parameters are randomised first: with a fresh BatchNorm (mean 0, variance 1,
weight 1, bias 0) a BatchNorm left out of its space would go unnoticed.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import layers
from .graph import ModelGraph, on_channels


def permute_state_dict(graph: ModelGraph, state: dict[str, torch.Tensor],
                       perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply ``perms[space]`` to every writer's output channels and every reader's input channels."""
    out = state.copy()
    if hasattr(state, "_metadata"):
        out._metadata = state._metadata  # version numbers that some modules' loaders need (MNASNet)
    for key, t in state.items():
        module, _, attr = key.rpartition(".")
        if attr in layers.NON_CHANNEL_BUFFERS or t.dim() == 0:
            continue
        for space, member in graph.writes.get(module, []):
            if space in perms:
                t = on_channels(t, 0, member, graph.space_size[space], lambda x, p=perms[space]: x.index_select(0, p))
        if attr == "weight":
            for space, member in graph.reads.get(module, []):
                if space in perms:
                    t = on_channels(t, 1, member, graph.space_size[space],
                                    lambda x, p=perms[space]: x.index_select(1, p))
        out[key] = t
    return out


def random_permutations(graph: ModelGraph, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(size, generator=gen) for name, size in graph.space_size.items()}


@torch.no_grad()
def randomize_per_channel(model: nn.Module, seed: int = 0) -> None:
    """Give every per-channel tensor the layer table names (norms, biases) distinct values, so a
    permutation that misses one shows."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        kind = layers.kind_of(m)
        for attr, (low, high) in (kind.random_ranges.items() if kind else ()):
            t = getattr(m, attr, None)
            if isinstance(t, torch.Tensor):
                t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * (high - low) + low)


@torch.no_grad()
def self_check(graph: ModelGraph, example: torch.Tensor, seed: int = 0) -> float:
    """Largest relative change of the outputs when every space is permuted (float32: about 1e-7)."""
    model = graph.model.eval()
    reference = model(example)
    state = model.state_dict()
    for key, value in state.items():
        state[key] = value.clone()
    try:
        model.load_state_dict(permute_state_dict(graph, state, random_permutations(graph, seed)))
        permuted = model(example)
    finally:
        model.load_state_dict(state)
    return float((permuted - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
