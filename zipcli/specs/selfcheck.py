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
from .graph import ModelGraph, on_channels, on_last_axis


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
        space = graph.param_writes.get(key)
        if space in perms:
            out[key] = on_last_axis(t, lambda x, p=perms[space]: x.index_select(0, p))
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
    """A random permutation of every space; a space of heads moves whole heads (one head order per
    query/key space and the value space tied to it) and permutes the features within each head."""
    gen = torch.Generator().manual_seed(seed)
    head_orders: dict[str, torch.Tensor] = {}
    perms = {}
    for space in graph.spec.spaces:
        size = graph.space_size[space.name]
        if space.heads is None:
            perms[space.name] = torch.randperm(size, generator=gen)
            continue
        group = space.heads_with or space.name
        if group not in head_orders:
            head_orders[group] = torch.randperm(space.heads, generator=gen)
        perms[space.name] = headed_permutation(head_orders[group],
                                               [torch.randperm(size // space.heads, generator=gen)
                                                for _ in range(space.heads)])
    return perms


def headed_permutation(head_order: torch.Tensor, within: list[torch.Tensor]) -> torch.Tensor:
    """Flat permutation of heads of ``len(within[h])`` features: new feature ``j`` of head ``h`` is old
    feature ``within[h][j]`` of head ``head_order[h]``."""
    width = len(within[0])
    return torch.cat([head_order[h] * width + w for h, w in enumerate(within)])


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
def randomize_spec_tensors(graph: ModelGraph, traced: dict | None = None, seed: int = 0) -> None:
    """Give tensors used in forward (a class token may start at zero) distinct values, and draw the
    weights of attention's layers (queries, keys, values, output) at a trained model's scale (std
    1/sqrt(inputs)): at a fresh model's small scale attention is nearly uniform and adds little to
    the stream, so a head order mixed up would hardly show. Weights of a space's layers that start
    at zero (torchvision's ViT classifier) are drawn at that scale too: a zero layer hides every
    permutation before it. Where the spec and tracing (``traced``) disagree, both are drawn, so that
    a spec that forgot heads fails."""
    gen = torch.Generator().manual_seed(seed)
    spaces = [(list(s.writers) + list(s.readers), s.parameters, s.heads) for s in graph.spec.spaces]
    spaces += [(s["writers"] + s["readers"], s["parameters"], s["heads"]) for s in (traced or {}).get("spaces", [])]
    tensors = dict(graph.model.named_parameters()) | dict(graph.model.named_buffers())
    keys = dict.fromkeys(k for _, parameters, _ in spaces for k in parameters if k in tensors)
    layers_ = dict.fromkeys(m.module for members, _, heads in spaces if heads for m in members)
    for key in keys:
        tensors[key].copy_(torch.rand(tensors[key].shape, generator=gen, dtype=tensors[key].dtype) - 0.5)
    for name in layers_:
        weight = getattr(graph.modules.get(name), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            weight.copy_(torch.randn(weight.shape, generator=gen, dtype=weight.dtype) / weight.shape[1] ** 0.5)
    for name in dict.fromkeys(m.module for members, _, _ in spaces for m in members):
        weight = getattr(graph.modules.get(name), "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and not weight.any():
            fan_in = weight[0].numel()
            weight.copy_(torch.randn(weight.shape, generator=gen, dtype=weight.dtype) / fan_in ** 0.5)


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
