"""What zipit knows about each layer type, in one table.

A layer is either *weighted* (a convolution or linear layer: it reads one
feature space on the input axis of its weight and writes a new one on the
output axis) or *per-channel* (a norm or a depthwise convolution: its output
channels are its input channels, each transformed on its own, so it belongs to
the space it reads, as a writer). The graph checker, the tracer, the zip, the
permutation self-check and coverage all ask this table; supporting a new layer
type is one entry in ``KINDS``. The refit (how a layer reads as rows of a linear
map), the MAC count and the BatchNorm reset (which layers keep batch statistics)
ask it too, and so does the size dial (``resize``: the same layer with other channel counts).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ZipitError

Range = tuple[float, float]


@dataclass(frozen=True)
class Rows:
    """How the refit reads a weighted layer as one linear map applied at every output position:
    ``outputs`` is its output as (batch, positions, out channels), ``patches`` its input at some of
    those positions as (batch, positions, unknowns), in the order of ``weight.flatten(1)``."""

    unknowns: Callable[[nn.Module], int]                                       # inputs per output row, bias aside
    outputs: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    patches: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Size], torch.Tensor]  # (m, x, where, out shape)
    fits: Callable[[nn.Module], bool] = lambda m: True                         # its output is linear in its input


@dataclass(frozen=True)
class LayerKind:
    """One layer type: its channel axes, when it cannot be merged, and how the self-check tests it."""

    out_channels: Callable[[nn.Module], int]                 # axis 0 of its parameters
    in_channels: Callable[[nn.Module], int] | None = None    # axis 1 of its weight; None: per-channel only
    per_channel: Callable[[nn.Module], bool] = lambda m: True  # writes the space it reads (no input axis)
    problem: Callable[[nn.Module], str | None] = lambda m: None  # why its channels cannot be merged, or None
    # why it cannot be merged on an input of this shape (None: the shape is unknown), or None
    input_problem: Callable[[nn.Module, tuple | None], str | None] = lambda m, shape: None
    # which axis of an input of this shape holds its channels (tokens [B, N, D]: the last)
    channel_axis: Callable[[nn.Module, tuple], int] = lambda m, shape: 1
    # per-channel tensors the self-check fills with distinct values (a fresh norm is all ones and
    # zeros, so a norm left out of its space would go unnoticed), and the range each is drawn from
    random_ranges: dict[str, Range] = field(default_factory=dict)
    macs: Callable[[nn.Module, torch.Tensor], int] | None = None  # multiply-accumulates of a call, from its output
    rows: Rows | None = None                  # how the refit solves it; None: the refit leaves it alone
    batch_statistics: bool = False            # keeps running statistics that the BatchNorm reset recomputes
    # the same layer with ``out`` channels on axis 0 and ``inp`` on axis 1 (None: unchanged), its
    # tensors empty (zeros); None: a merge at a size cannot widen it
    resize: Callable[[nn.Module, int | None, int | None], nn.Module] | None = None


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


def _conv_patches(conv: nn.Conv2d, x: torch.Tensor, where: torch.Tensor, out: torch.Size) -> torch.Tensor:
    """The unfolded input of ``conv`` at output positions ``where`` only (a full unfold would copy
    the input kh*kw times to keep a few positions)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    padded = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    pixels = padded.permute(0, 2, 3, 1)                # (B, H, W, C): gathers whole channel vectors
    top, left = (where // out[-1]) * sh, (where % out[-1]) * sw
    taps = [pixels[:, top + i * dh, left + j * dw] for i in range(kh) for j in range(kw)]
    return torch.stack(taps, 3).flatten(2)             # channel-major, as weight.flatten(1)


def _conv_fits(m: nn.Conv2d) -> bool:
    return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


CONV_ROWS = Rows(unknowns=lambda m: m.in_channels * m.kernel_size[0] * m.kernel_size[1],
                 outputs=lambda m, y: y.permute(0, 2, 3, 1).reshape(y.shape[0], -1, y.shape[1]),
                 patches=_conv_patches, fits=_conv_fits)
# a linear layer on [B, features] or on tokens [B, ..., features]: each token is a position
LINEAR_ROWS = Rows(unknowns=lambda m: m.weight.shape[1],
                   outputs=lambda m, y: y.reshape(y.shape[0], -1, y.shape[-1]),
                   patches=lambda m, x, where, out: x.reshape(x.shape[0], -1, x.shape[-1])[:, where])


def _conv_macs(m: nn.Conv2d, out: torch.Tensor) -> int:
    return out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]


def _layer_norm_input_problem(m: nn.LayerNorm, shape: tuple | None) -> str | None:
    if shape is None or len(m.normalized_shape) >= len(shape):
        return f"a LayerNorm over {tuple(m.normalized_shape)} that does not start at the channel axis"
    return None


def _resized(m: nn.Module, out: int | None, inp: int | None, **attrs) -> nn.Module:
    """A shallow copy of ``m`` (its class and forward kept) whose own tensors are zeros of the new
    widths: axis 0 ``out``, axis 1 of a weight with an input axis ``inp``; then ``attrs`` set."""
    new = copy.copy(m)
    new._parameters, new._buffers = dict(m._parameters), dict(m._buffers)
    for table in (new._parameters, new._buffers):
        for name, t in table.items():
            if t is None or t.dim() == 0:
                continue
            shape = list(t.shape)
            if out is not None:
                shape[0] = out
            if inp is not None and t.dim() >= 2:
                shape[1] = inp
            fresh = torch.zeros(shape, dtype=t.dtype, device=t.device)
            table[name] = nn.Parameter(fresh, t.requires_grad) if isinstance(t, nn.Parameter) else fresh
    for name, value in attrs.items():
        setattr(new, name, value)
    return new


def _resize_conv(m: nn.Conv2d, out: int | None, inp: int | None) -> nn.Conv2d:
    if is_depthwise(m):            # per-channel: one width for its input, output and groups
        width = out or inp
        return _resized(m, width, None, out_channels=width, in_channels=width, groups=width)
    return _resized(m, out, inp, out_channels=out or m.out_channels, in_channels=inp or m.in_channels)


def _resize_linear(m: nn.Linear, out: int | None, inp: int | None) -> nn.Linear:
    return _resized(m, out, inp, out_features=out or m.out_features, in_features=inp or m.in_features)


def _resize_batch_norm(m: nn.modules.batchnorm._BatchNorm, out: int | None, inp: int | None):
    return _resized(m, out, None, num_features=out or m.num_features)


def _resize_layer_norm(m: nn.LayerNorm, out: int | None, inp: int | None) -> nn.LayerNorm:
    shape = ((out,) + tuple(m.normalized_shape[1:])) if out else tuple(m.normalized_shape)
    return _resized(m, out, None, normalized_shape=shape)


def _resize_group_norm(m: nn.GroupNorm, out: int | None, inp: int | None) -> nn.GroupNorm:
    width = out or m.num_channels
    return _resized(m, out, None, num_channels=width, num_groups=1 if m.num_groups == 1 else width)


_BIAS = {"bias": (-0.5, 0.5)}
_NORM = {"weight": (0.5, 1.5), "bias": (-0.5, 0.5), "running_mean": (-1.0, 1.0), "running_var": (0.5, 2.0)}

KINDS: dict[type, LayerKind] = {
    nn.Conv2d: LayerKind(out_channels=lambda m: m.out_channels, in_channels=lambda m: m.in_channels,
                         per_channel=is_depthwise, problem=_conv_problem, random_ranges=_BIAS,
                         macs=_conv_macs, rows=CONV_ROWS, resize=_resize_conv),
    nn.Linear: LayerKind(out_channels=lambda m: m.out_features, in_channels=lambda m: m.in_features,
                         per_channel=lambda m: False, random_ranges=_BIAS,
                         channel_axis=lambda m, shape: len(shape) - 1,
                         macs=lambda m, out: out.numel() * m.in_features, rows=LINEAR_ROWS,
                         resize=_resize_linear),
    nn.BatchNorm1d: LayerKind(out_channels=lambda m: m.num_features, random_ranges=_NORM, batch_statistics=True,
                              resize=_resize_batch_norm),
    nn.BatchNorm2d: LayerKind(out_channels=lambda m: m.num_features, random_ranges=_NORM, batch_statistics=True,
                              resize=_resize_batch_norm),
    nn.LayerNorm: LayerKind(out_channels=lambda m: m.normalized_shape[0], random_ranges=_NORM,
                            input_problem=_layer_norm_input_problem,
                            channel_axis=lambda m, shape: len(shape) - len(m.normalized_shape),
                            resize=_resize_layer_norm),
    nn.GroupNorm: LayerKind(out_channels=lambda m: m.num_channels, problem=_group_norm_problem,
                            random_ranges=_NORM, resize=_resize_group_norm),
}


def known_types() -> tuple[type, ...]:
    return tuple(KINDS)


def weighted_types() -> tuple[type, ...]:
    """The types with an input axis (convolutions, linear layers): asked when needed, so that an
    entry added to ``KINDS`` later counts."""
    return tuple(t for t, k in KINDS.items() if k.in_channels is not None)

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


def refit_rows(m: nn.Module) -> Rows | None:
    """How the refit solves ``m``: a weighted layer whose output is a linear map of its input (a dense
    convolution with zero padding, a linear layer), or None."""
    k = kind_of(m)
    return k.rows if k is not None and k.rows is not None and is_weighted(m) and k.rows.fits(m) else None


def keeps_batch_statistics(m: nn.Module) -> bool:
    """A norm whose running statistics the BatchNorm reset (and the refit) recompute."""
    k = kind_of(m)
    return k is not None and k.batch_statistics and getattr(m, "track_running_stats", False)


def macs(m: nn.Module, out: torch.Tensor) -> int:
    """Multiply-accumulates of one call of ``m`` that gave ``out`` (0 for a layer the table does not count)."""
    k = kind_of(m)
    return 0 if k is None or k.macs is None else k.macs(m, out)


def input_problem(m: nn.Module, shape: tuple | None) -> str | None:
    """Why a known layer cannot be merged on an input of ``shape`` (a linear layer on tokens, ...), or None."""
    k = kind_of(m)
    return None if k is None else k.input_problem(m, shape)


def resize(m: nn.Module, out: int | None, inp: int | None) -> nn.Module:
    """``m`` with ``out`` output and ``inp`` input channels (None: unchanged), its tensors zeros."""
    k = kind_of(m)
    if k is None or k.resize is None:
        raise ZipitError(f"a {type(m).__name__} cannot change width", "merge without a size")
    return k.resize(m, out, inp)


def channel_axis(m: nn.Module, shape: tuple) -> int:
    """The axis of an input of ``shape`` that a known layer treats as channels."""
    return kind_of(m).channel_axis(m, shape)


def out_channels(m: nn.Module) -> int:
    return kind_of(m).out_channels(m)


def in_channels(m: nn.Module) -> int:
    return kind_of(m).in_channels(m)


def problem(m: nn.Module) -> str | None:
    """Why a known layer's channels cannot be merged (a grouped convolution, ...), or None."""
    k = kind_of(m)
    return None if k is None else k.problem(m)
