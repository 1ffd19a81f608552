"""Checkpoint files -> checked state dicts with a name, a sha256 and class names -> source models.

Pickles are only ever read with ``weights_only=True``: a checkpoint that would
run code is refused, never loaded unsafely.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .errors import CheckpointError, ZipitError
from .specs.builders import build_model
from .specs.format import Spec

PREFIXES = ("module.", "_orig_mod.")
INFLATE_SLACK = 64 * 2**20      # what an archive may inflate beyond 4x its size (torch.save stores, never deflates)


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict[str, torch.Tensor]     # emptied once loaded into its model (``load_sources``)
    sha256: str
    classes: list[str] | None = None
    dtype: torch.dtype = torch.float32      # its first floating tensor's: the merged file's default dtype

    @property
    def name(self) -> str:
        return self.path.stem


WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)   # what a merge reads and writes


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: not a state dict of tensors",
                              "save the model with torch.save(model.state_dict(), path)")
    out = {}
    for key, value in obj.items():
        while any(key.startswith(p) for p in PREFIXES):     # in any order: _orig_mod.module. as module._orig_mod.
            key = key[len(next(p for p in PREFIXES if key.startswith(p))):]
        out[key] = value
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file", "check the path")
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # untrusted bytes
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})",
                                  "the file may be truncated or corrupt; download or export it again") from None
        return _unwrap(tensors, path)
    with open(path, "rb") as f:
        start = f.read(2)
    if start[:2] != b"PK" and start[:1] != b"\x80":   # torch.save writes a zip archive, or (legacy) a binary pickle
        raise CheckpointError(f"{path}: not a torch checkpoint (neither a torch archive nor a binary pickle)",
                              "pass a file written by torch.save, or a .safetensors file")
    _refuse_inflating(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on pickle protocols
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            if _pickles_a_module(path):
                raise CheckpointError(f"{path} holds a pickled model object, not a state_dict",
                                      "save model.state_dict() instead, where you trust the file: "
                                      "torch.save(model.state_dict(), 'model.pt')") from None
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            raise CheckpointError(
                f"{path}: refused, the pickle would import or run code"
                + (f" ({found.group(1)})" if found else ""),
                "zipit never loads such files; convert it where you trust it: "
                "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')") from None
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})",
                              "the file may be truncated or corrupt") from None
    except Exception as exc:  # untrusted bytes: torch.load raises many types (struct.error, EOFError, ...)
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc.__class__.__name__}: {str(exc)[:160]})",
                              "the file may be truncated or corrupt; save it again with torch.save") from None
    return _unwrap(obj, path)


def _refuse_inflating(path: Path) -> None:
    """torch.save stores its archive's members uncompressed: one whose members inflate far beyond the
    file's size (a zip bomb) is refused from its directory, before anything is read into memory."""
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return                      # not a zip archive: torch.load says what it is
    size = path.stat().st_size
    if inflated > 4 * size + INFLATE_SLACK:
        raise CheckpointError(f"{path}: its archive would inflate to {inflated / 2**30:.1f} GiB from "
                              f"{size / 2**20:.1f} MiB on disk", "torch.save writes archives that do not "
                              "inflate; save the state_dict again with torch.save, or as .safetensors")


def _pickles_a_module(path: Path) -> bool:
    """Whether a torch zip checkpoint holds a whole nn.Module (torch.save(model)): its pickle names
    the module attributes ``_parameters`` and ``_modules``. Read as bytes, never unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = b"".join(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
    except (OSError, zipfile.BadZipFile):
        return False
    return b"_parameters" in data and b"_modules" in data


def sidecar_classes(path: Path) -> list[str] | None:
    """Classes from a JSON sidecar with the checkpoint's stem (``a.pt`` -> ``a.json``)."""
    side = path.with_suffix(".json")
    if not side.is_file():
        return None
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{side}: sidecar is not valid JSON ({exc})", "fix or remove the sidecar") from None
    except RecursionError:
        raise CheckpointError(f"{side}: sidecar nests too deeply to be a class list", "fix or remove the sidecar") from None
    classes = data.get("classes") if isinstance(data, dict) else None
    if classes is None:
        return None
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise CheckpointError(f"{side}: 'classes' must be a list of names", "fix or remove the sidecar")
    check_unique(classes, str(side))
    return classes


def check_unique(names: list[str], where: str) -> None:
    """A head's classes are its labels: a name twice would make two outputs one label."""
    seen = set()
    for name in names:
        if name in seen:
            raise CheckpointError(f"{where}: class {name!r} is named twice", "give every class of a head its own name")
        seen.add(name)


def parse_classes(value: str) -> list[str]:
    """``--classes``: a comma-separated list, or a text file with one class per line."""
    path = Path(value)
    if path.is_file():
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        names = [c.strip() for c in value.split(",") if c.strip()]
    if not names:
        raise CheckpointError(f"--classes {value!r} holds no class names",
                              "give a comma-separated list or a file with one class per line")
    check_unique(names, f"--classes {value!r}")
    return names


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{str(path)!r}: the file name is not valid UTF-8, which the merged file's "
                              "metadata must be", "rename the file") from None
    sd = read_state_dict(path)
    meta = next((k for k, t in sd.items() if t.is_meta), None)
    if meta is not None:
        raise CheckpointError(f"{path}: tensor {meta!r} has no data (a meta tensor)",
                              "save the checkpoint from a model whose weights are loaded")
    floats = [t.dtype for t in sd.values() if t.is_floating_point()]
    if not floats:
        raise CheckpointError(f"{path}: holds no floating-point tensors, so no weights to merge",
                              "pass the model's state_dict (its weights), not another file")
    for key, t in sd.items():
        if t.is_floating_point() and t.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} is {str(t.dtype).replace('torch.', '')}, which zipit "
                                  "does not merge", "convert the checkpoint to float32, float16 or bfloat16")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{path}: tensor {key!r} contains NaN or Inf", "the checkpoint is damaged")
    return Checkpoint(path=path, state_dict=sd, sha256=sha256_of(path), classes=sidecar_classes(path),
                      dtype=floats[0])


def check_against(ckpt: Checkpoint, expected: dict[str, torch.Tensor]) -> None:
    """Report every missing, unexpected and mis-shaped tensor at once."""
    sd = ckpt.state_dict
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k} {list(sd[k].shape)} (expected {list(expected[k].shape)})"
              for k in expected if k in sd and sd[k].shape != expected[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            problems.append(f"{label}: {', '.join(items[:5])}{more}")
    if problems:
        raise CheckpointError(f"{ckpt.path}: does not match the architecture; " + "; ".join(problems),
                              "check --arch/--spec (width, depth) against the checkpoint")


def run_layout(model: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """The model in the memory layout zipit runs it in: channels-last on the CPU, where oneDNN's
    convolutions are 1.4-1.8x faster (ResNet-50 at 224 px, ResNet-20 at 32 px; bench/floor.py), the
    same values up to float rounding. Other devices keep the default layout."""
    return model.to(memory_format=torch.channels_last) if torch.device(device).type == "cpu" else model


@dataclass
class Source:
    """One checkpoint loaded into its model (float32, eval mode), with its class names."""

    checkpoint: Checkpoint
    classes: list[str]
    model: torch.nn.Module


def load_sources(paths: list[str | Path], spec: Spec, classes: list[list[str]] | None = None,
                 device: str = "cpu", min_models: int = 2) -> list[Source]:
    """Read every checkpoint and check it against the architecture before any image is read.

    ``classes`` (one list per checkpoint) overrides the sidecars; without either, a
    head's classes are ``class_0, class_1, ...``.
    """
    if len(paths) < min_models:
        raise ZipitError(f"merging needs at least two checkpoints, got {len(paths)}", "pass two or more files")
    if classes is not None and len(classes) != len(paths):
        given, n = len(classes), len(paths)
        raise ZipitError(f"classes (--classes) were given {'once' if given == 1 else f'{given} times'} for {n} "
                         f"checkpoint{'' if n == 1 else 's'}", "give one list per checkpoint, in order, or none")
    sources = []
    for i, path in enumerate(paths):
        ckpt = load_checkpoint(path)
        key = f"{spec.classifiers[0]}.weight"
        if key not in ckpt.state_dict or ckpt.state_dict[key].dim() < 2:
            raise ZipitError(f"{ckpt.path}: has no classifier weight {key!r}",
                             f"check the architecture (--arch/--spec); this checkpoint does not look like {spec.name}")
        k = ckpt.state_dict[key].shape[0]
        if k == 0:
            raise ZipitError(f"{ckpt.path}: its classifier {key!r} has 0 outputs", "merge models with 1 or more classes")
        model = build_model(spec, k)
        translate = getattr(model, "translate_state_dict", None)     # a checkpoint of the model it stands for
        if callable(translate):
            ckpt.state_dict = translate(ckpt.state_dict)
        check_against(ckpt, model.state_dict())
        names = (classes[i] if classes else None) or ckpt.classes or [f"class_{c}" for c in range(k)]
        if len(names) != k:
            raise ZipitError(f"{ckpt.path}: {len(names)} class names for a classifier with {k} outputs",
                             "fix the class names (--classes) or the JSON sidecar")
        check_unique(list(names), str(ckpt.path))
        model.load_state_dict({n: t.float() if t.is_floating_point() else t for n, t in ckpt.state_dict.items()})
        ckpt.state_dict = {}            # the model holds the weights now; keep one copy, not two
        sources.append(Source(ckpt, list(names), run_layout(model.float().eval().to(device), device)))
    names = [s.checkpoint.name for s in sources]
    if len(set(names)) != len(names):
        raise ZipitError("two checkpoints have the same file name", "rename them: heads are named after files")
    return sources
