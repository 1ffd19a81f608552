"""Multiply-accumulates per image: what inspect and sweep report, and what tuning plans its budget in."""
from __future__ import annotations

import torch
import torch.nn as nn

from .specs import layers


@torch.no_grad()
def count_macs(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates, as the layer table counts them, for one input of ``shape`` (C, H, W)."""
    total = 0

    def hook(m, args, out):
        nonlocal total
        total += layers.macs(m, out)

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if (k := layers.kind_of(m)) is not None and k.macs is not None]
    try:
        device = next((t.device for t in model.parameters()), torch.device("cpu"))   # the model's, CUDA too
        model.eval()(torch.zeros(1, *shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return total
