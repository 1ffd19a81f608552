"""A merged file -> a program that runs without zipit: a torch.export archive (.pt2) or ONNX.

The exported program takes a batch of preprocessed images (any batch size) and
returns one logits tensor per head, in head order. Before anything is written
it is run on inputs of several batch sizes and must give the merged model's
outputs (float rounding aside); otherwise nothing is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from .errors import ExportError
from .merged import MergedModel, check_output_paths, load_merged, write_atomic

FORMATS = ("pt2", "onnx")
CHECK_BATCHES = (1, 3, 8)     # batch sizes the exported program is checked on
TOLERANCE = 1e-4              # largest relative difference allowed (float32 rounding is about 1e-6)


def _relative_gap(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    if len(got) != len(want):
        return float("inf")
    gaps = [float((g - w).abs().max() / w.abs().max().clamp_min(1e-12)) for g, w in zip(got, want)]
    if any(not torch.isfinite(t).all() for t in (*got, *want)):
        return float("inf")             # NaN compares false with everything: a NaN output never passes
    return max(gaps)


@torch.no_grad()
def check_outputs(run, model: MergedModel, shape: tuple[int, ...], seed: int = 0) -> float:
    """Largest relative gap between ``run(x)`` and the model's outputs over ``CHECK_BATCHES``."""
    gen = torch.Generator().manual_seed(seed)
    gap = 0.0
    for n in CHECK_BATCHES:
        x = torch.randn(n, *shape, generator=gen)
        gap = max(gap, _relative_gap([torch.as_tensor(t) for t in run(x)], model(x)))
    return gap


def _exported_program(model: MergedModel, shape: tuple[int, ...]):
    example = torch.randn(2, *shape)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as exc:  # torch.export raises many types for graphs it cannot capture
        raise ExportError(f"torch.export cannot capture this model: {exc.__class__.__name__}: {str(exc)[:200]}",
                          "please report it with the merged file's architecture") from None


def _write_pt2(model: MergedModel, output: Path, force: bool) -> float:
    program = _exported_program(model, model.spec.input.shape)
    gap = check_outputs(program.module(), model, model.spec.input.shape)
    if gap > TOLERANCE:
        raise ExportError(f"the exported program differs from the merged model by {gap:.2g} (relative)",
                          "nothing was written; please report it")
    write_atomic(output, lambda tmp: torch.export.save(program, tmp), force, suffix=".tmp.pt2")
    return gap


def _write_onnx(model: MergedModel, output: Path, force: bool) -> float:
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime", 'pip install onnx onnxscript onnxruntime') from None
    shape = model.spec.input.shape
    names = [f"head{i}" for i in range(len(model.heads))]
    gaps = []

    def write(tmp: str) -> None:
        try:
            torch.onnx.export(model, (torch.randn(2, *shape),), tmp, dynamo=True, input_names=["images"],
                              output_names=names, dynamic_shapes=({0: torch.export.Dim("batch")},),
                              external_data=False, verbose=False)   # one file: weights inside
        except Exception as exc:
            raise ExportError(f"ONNX export failed: {exc.__class__.__name__}: {str(exc)[:200]}",
                              "try --format pt2") from None
        session = onnxruntime.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        gaps.append(check_outputs(lambda x: session.run(None, {"images": x.numpy()}), model, shape))
        if gaps[-1] > TOLERANCE:
            raise ExportError(f"the ONNX program differs from the merged model by {gaps[-1]:.2g} (relative)",
                              "nothing was written; try --format pt2")

    write_atomic(output, write, force, suffix=".tmp.onnx")
    return gaps[-1]


def export_merged(path: str | Path, output: str | Path, fmt: str = "pt2", force: bool = False,
                  trust_builders: Iterable[str] = ()) -> dict:
    """Export a merged file; returns what was written and how closely it reproduces the model."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}", f"valid formats (--format): {', '.join(FORMATS)}")
    check_output_paths([output], [path], force)
    model = load_merged(path, trust_builders=trust_builders)
    writer = _write_pt2 if fmt == "pt2" else _write_onnx
    gap = writer(model, Path(output), force)
    return {"input": str(path), "output": str(output), "format": fmt, "heads": [h.name for h in model.heads],
            "input_size": model.spec.input.size, "checked_batches": list(CHECK_BATCHES), "max_relative_gap": gap}
