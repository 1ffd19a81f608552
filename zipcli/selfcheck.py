"""Permutation self-check: permute every feature space a spec declares; outputs must not change.

A wrong spec (a reader in the wrong space, a missing writer) changes the outputs
under this test, so it catches the silent bugs of hand-written specs.
"""
from __future__ import annotations

import torch

from .graph import ModelGraph, is_depthwise


def permute_state_dict(graph: ModelGraph, state: dict[str, torch.Tensor],
                       perms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply ``perms[space]`` to every writer's output channels and every reader's input channels."""
    out = dict(state)
    for key, t in state.items():
        module, _, attr = key.rpartition(".")
        if attr == "num_batches_tracked":
            continue
        space = graph.out_space.get(module)
        if space in perms:
            t = t.index_select(0, perms[space])
        space = graph.in_space.get(module)
        if attr == "weight" and space in perms and not is_depthwise(graph.modules[module]):
            t = t.index_select(1, perms[space])
        out[key] = t
    return out


def random_permutations(graph: ModelGraph, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randperm(size, generator=gen) for name, size in graph.space_size.items()}


@torch.no_grad()
def self_check(graph: ModelGraph, example: torch.Tensor, seed: int = 0) -> float:
    """Largest relative change of the outputs when every space is permuted (should be ~1e-7)."""
    model = graph.model.eval()
    reference = model(example)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        model.load_state_dict(permute_state_dict(graph, state, random_permutations(graph, seed)))
        permuted = model(example)
    finally:
        model.load_state_dict(state)
    return float((permuted - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
