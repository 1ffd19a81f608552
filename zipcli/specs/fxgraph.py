"""torch.fx tracing with every layer type of the table kept as one call: the graph that both the
spec tracer (``tracing``) and the merge's structure (``graph``) read."""
from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from ..errors import SpecError
from . import layers


class _LeafTracer(fx.Tracer):
    """fx's tracer, keeping every layer type of the table as one call (a type added to the table
    need not live in torch.nn, where fx stops by default)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m) in layers.KINDS or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, origin: str = "model") -> fx.GraphModule:
    try:
        return fx.GraphModule(model, _LeafTracer().trace(model), model.__class__.__name__)
    except Exception as exc:  # fx raises many types for untraceable code
        raise SpecError(f"{origin} cannot be traced with torch.fx: {exc.__class__.__name__}: {exc}",
                        "zipit needs a model whose forward has no data-dependent control flow") from None
