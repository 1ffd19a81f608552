"""What zipit knows about each layer type, in one table.

A layer is either *weighted* (a convolution or linear layer: it reads one
feature space on the input axis of its weight and writes a new one on the
output axis) or *per-channel* (a norm or a depthwise convolution: its output
channels are its input channels, each transformed on its own, so it belongs to
the space it reads, as a writer). The graph checker, the tracer, the zip, the
permutation self-check and coverage all ask this table; supporting a new layer
type is one entry in ``KINDS``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

Range = tuple[float, float]


@dataclass(frozen=True)
class LayerKind:
    """One layer type: its channel axes, when it cannot be merged, and how the self-check tests it."""

    out_channels: Callable[[nn.Module], int]                 # axis 0 of its parameters
    in_channels: Callable[[nn.Module], int] | None = None    # axis 1 of its weight; None: per-channel only
    per_channel: Callable[[nn.Module], bool] = lambda m: True  # writes the space it reads (no input axis)
    problem: Callable[[nn.Module], str | None] = lambda m: None  # why its channels cannot be merged, or None
    # per-channel tensors the self-check fills with distinct values (a fresh norm is all ones and
    # zeros, so a norm left out of its space would go unnoticed), and the range each is drawn from
    random_ranges: dict[str, Range] = field(default_factory=dict)


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _conv_problem(m: nn.Conv2d) -> str | None:
    if m.groups != 1 and not is_depthwise(m):
        return f"a grouped convolution (groups={m.groups}) whose groups must stay intact"
    return None


def _group_norm_problem(m: nn.GroupNorm) -> str | None:
    if m.num_groups not in (1, m.num_channels):
        return (f"a GroupNorm with {m.num_groups} groups of {m.num_channels // m.num_groups} channels "
                "(channels may not move between groups)")
    return None


_BIAS = {"bias": (-0.5, 0.5)}
_NORM = {"weight": (0.5, 1.5), "bias": (-0.5, 0.5), "running_mean": (-1.0, 1.0), "running_var": (0.5, 2.0)}

KINDS: dict[type, LayerKind] = {
    nn.Conv2d: LayerKind(out_channels=lambda m: m.out_channels, in_channels=lambda m: m.in_channels,
                         per_channel=is_depthwise, problem=_conv_problem, random_ranges=_BIAS),
    nn.Linear: LayerKind(out_channels=lambda m: m.out_features, in_channels=lambda m: m.in_features,
                         per_channel=lambda m: False, random_ranges=_BIAS),
    nn.BatchNorm1d: LayerKind(out_channels=lambda m: m.num_features, random_ranges=_NORM),
    nn.BatchNorm2d: LayerKind(out_channels=lambda m: m.num_features, random_ranges=_NORM),
    nn.LayerNorm: LayerKind(out_channels=lambda m: m.normalized_shape[0], random_ranges=_NORM),
    nn.GroupNorm: LayerKind(out_channels=lambda m: m.num_channels, problem=_group_norm_problem,
                            random_ranges=_NORM),
}
WEIGHTED = tuple(t for t, k in KINDS.items() if k.in_channels is not None)   # (Conv2d, Linear)
NORMS = tuple(t for t, k in KINDS.items() if k.in_channels is None)

VARIANCE_BUFFERS = ("running_var",)          # merged on their square root, a standard deviation
NON_CHANNEL_BUFFERS = ("num_batches_tracked",)  # counters: copied, never merged


def kind_of(m: nn.Module) -> LayerKind | None:
    """The table's entry for ``m`` (subclasses included), or None for a layer zipit does not know."""
    for t in type(m).__mro__:
        if t in KINDS:
            return KINDS[t]
    return None


def is_weighted(m: nn.Module) -> bool:
    """Reads one space and writes another (a convolution that is not depthwise, or a linear layer)."""
    k = kind_of(m)
    return k is not None and k.in_channels is not None and not k.per_channel(m)


def is_per_channel(m: nn.Module) -> bool:
    """Belongs, as a writer, to the space it reads (a norm or a depthwise convolution)."""
    k = kind_of(m)
    return k is not None and k.per_channel(m)


def out_channels(m: nn.Module) -> int:
    return kind_of(m).out_channels(m)


def in_channels(m: nn.Module) -> int:
    return kind_of(m).in_channels(m)


def problem(m: nn.Module) -> str | None:
    """Why a known layer's channels cannot be merged (a grouped convolution, ...), or None."""
    k = kind_of(m)
    return None if k is None else k.problem(m)
