"""Facts about a file, as one JSON-ready dict: a merged model or a plain checkpoint.

Works without any image data: parameter counts from tensors, multiply-accumulates
from one forward pass of a zero input of the spec's size.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from .checkpoints import read_state_dict, sha256_of
from .macs import count_macs
from .errors import ZipitError
from .merged import is_merged_file, load_merged, read_metadata
from .specs import builtin_spec_names, load_spec
from .specs.builders import build_model


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def inspect_merged(path: Path, trust_builders: Iterable[str] = ()) -> dict:
    model = load_merged(path, trust_builders=trust_builders)
    meta = model.metadata

    def js(key):
        try:
            return json.loads(meta[key])
        except (KeyError, ValueError, RecursionError):
            raise ZipitError(f"{path}: metadata {key!r} is missing, not JSON or nested too deeply",
                             "the file is damaged") from None

    size = model.spec.input.size
    sources = js("sources")
    source_macs = sum(count_macs(build_model(model.spec, len(s["classes"])), model.spec.input.shape) for s in sources)
    source_params = sum(_params(build_model(model.spec, len(s["classes"]))) for s in sources)
    heads = [{"name": h.name, "classes": h.classes, "num_classes": len(h.classes), "source": h.source,
              "params": _params(m)} for h, m in zip(model.heads, model.head_modules)]
    trunk_params = _params(model.trunk)
    return {
        "kind": "merged", "file": str(path), "format": meta.get("format"),
        "zipit_version": meta.get("zipit_version"), "spec": meta.get("spec_name"), "stop": meta.get("stop"),
        "method": meta.get("method"), "params": js("params"), "calibration": js("calibration"),
        "sources": sources, "heads": heads, "dtype": meta.get("dtype"),
        "parameters": {"trunk": trunk_params, "heads": sum(h["params"] for h in heads),
                       "total": trunk_params + sum(h["params"] for h in heads), "sources_total": source_params},
        "macs": {"merged": count_macs(model, model.spec.input.shape), "sources_total": source_macs, "input_size": size},
        "spaces": js("spaces"),
    }


def matching_specs(state: dict[str, torch.Tensor]) -> list[str]:
    """Built-in specs whose model has exactly these tensor names and shapes (any class count)."""
    found = []
    for name in builtin_spec_names():
        spec = load_spec(name)
        key = f"{spec.classifiers[0]}.weight"
        if key not in state or state[key].dim() != 2:
            continue
        with torch.device("meta"):  # shapes only: no memory or initialisation for the big built-ins
            expected = build_model(spec, state[key].shape[0]).state_dict()
        if expected.keys() == state.keys() and all(expected[k].shape == state[k].shape for k in state):
            found.append(name)
    return found


def inspect_checkpoint(path: Path) -> dict:
    state = read_state_dict(path)
    return {
        "kind": "checkpoint", "file": str(path), "sha256": sha256_of(path),
        "tensors": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")}
                    for k, v in state.items()],
        "parameters": sum(v.numel() for k, v in state.items()
                          if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))),
        "matching_specs": matching_specs(state),
    }


def inspect_file(path: str | Path, trust_builders: Iterable[str] = ()) -> dict:
    path = Path(path)
    if path.suffix == ".safetensors" and is_merged_file(read_metadata(path)):
        return inspect_merged(path, trust_builders)
    return inspect_checkpoint(path)
