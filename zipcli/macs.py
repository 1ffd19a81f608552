"""Multiply-accumulates per image: what inspect and sweep report, and what tuning plans its budget in."""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def count_macs(model: nn.Module, size: int) -> int:
    """Multiply-accumulates of convolutions and linear layers for one ``3 x size x size`` input."""
    total = 0

    def hook(m, args, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        device = next((t.device for t in model.parameters()), torch.device("cpu"))   # the model's, CUDA too
        model.eval()(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
    return total
