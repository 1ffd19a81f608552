"""The merged multi-head model, and its safetensors file (tensors + JSON metadata), written and read here.

The model is rebuilt from the spec text stored in the file, traced, and split at
the stop point into a shared trunk and one head per task, so a merged file is
self-describing: ``load_merged(path)`` needs nothing else.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from . import __version__
from .errors import MergedFileError, OutputError, ZipitError
from .specs import layers
from .specs.builders import build_model
from .specs.fxgraph import trace
from .specs.graph import ModelGraph, StopPlan, split
from .safetensors_io import save_deterministic
from .specs.format import OUTPUT_STOP, Spec, parse_spec

FORMAT = "zipit-merged/1"
SIZED_FORMAT = "zipit-merged/2"     # some merged space is wider than one model's (the size dial): an older
                                   # zipit says "not a zipit merge" rather than "damaged"
MAX_HEADS = 256            # far more models than anyone merges; bounds the work a damaged file can ask for


@dataclass(frozen=True)
class HeadInfo:
    name: str
    classes: list[str]
    source: str


class MergedModel(nn.Module):
    """Shared trunk computed once, then one head per task; forward returns a list of logits.

    ``widths``: merged spaces wider than one model's (the size dial), by name; ``graph`` (needed
    with widths) says which modules write and read them."""

    def __init__(self, spec: Spec, plan: StopPlan, heads: list[HeadInfo], widths: dict[str, int] | None = None,
                 graph: ModelGraph | None = None):
        super().__init__()
        self.spec, self.plan, self.heads = spec, plan, list(heads)
        self.widths = dict(widths or {})
        trunk = None
        modules = []
        for info in ([heads[0]] if plan.stop == OUTPUT_STOP else heads):
            gm = trace(build_model(spec, len(info.classes)))
            t, h = split(gm, plan.trunk_nodes)
            if self.widths:
                if trunk is None:
                    _resize(t, graph, self.widths, writers=True)
                _resize(h, graph, {s: w for s, w in self.widths.items() if s not in plan.cut_spaces}, writers=False)
            if plan.unmerges:
                _add_unmerges(h, plan, self.widths)
            trunk = trunk or t
            modules.append(h)
        self.trunk = trunk
        self.head_modules = nn.ModuleList(modules)
        if self.widths:
            self._check_forward()

    def _check_forward(self) -> None:
        """One forward of one blank image in eval mode: a forward that fixes a channel count (a
        reshape to 512*7*7, a padded shortcut) cannot run at other widths, and is refused here. A real
        batch of one costs milliseconds; the meta device's first forward costs a second of set-up."""
        training = self.training
        x = torch.zeros(1, *self.spec.input.shape)
        try:
            with torch.no_grad():
                self.eval()(x)
        except (RuntimeError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ZipitError(f"spec {self.spec.name} fixes a channel count in its forward ({first}): it cannot be "
                             "merged at a size", "merge without a size") from None
        finally:
            self.train(training)

    def forward(self, x: torch.Tensor, rows: list[torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        """Each head's logits on ``x``; with ``rows``, head i's on the images ``rows[i]`` only (None
        where that is empty): tuning scores each head on the images its source claims, and runs
        no head on the others."""
        shared = self.trunk(x)
        if rows is None:
            return [head(*shared) for head in self.head_modules]
        return [head(*[_select(s, r, len(x)) for s in shared]) if len(r) else None
                for head, r in zip(self.head_modules, rows)]


class Unmerge(nn.Module):
    """U_i where the stop cuts a space that the head writes too (a transformer's residual stream):
    the head's own layers after the stop add to its model's channels, and the skip path has no
    weight to fold U_i into, so the merged channels are taken back to them here, explicitly.
    ``matrix`` is (model channels, merged channels); a grouping's is 0/1, exact in any float type."""

    def __init__(self, size: int, width: int, axis: int):
        super().__init__()
        self.axis = axis
        self.register_buffer("matrix", torch.zeros(size, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.movedim(self.axis, -1) @ self.matrix.T).movedim(-1, self.axis)


UNMERGE = "unmerge"          # a head's Unmerge modules: ``unmerge.<j>`` for the plan's j-th unmerge


def _add_unmerges(head: fx.GraphModule, plan: StopPlan, widths: dict[str, int]) -> None:
    """Put an ``Unmerge`` in front of every use of each trunk output that holds a cut space."""
    if hasattr(head, UNMERGE):
        raise ZipitError(f"the model has a module named {UNMERGE!r}, which zipit needs in the heads of a stop "
                         f"inside a space (stop {plan.stop})", "choose a stop at a stage boundary")
    head.add_module(UNMERGE, nn.ModuleList(
        Unmerge(plan.sizes[space], widths.get(space, plan.sizes[space]), axis) for _, space, axis in plan.unmerges))
    inputs = {n.name: n for n in head.graph.nodes if n.op == "placeholder"}
    last = list(inputs.values())[-1]
    for j, (name, _, _) in enumerate(plan.unmerges):
        with head.graph.inserting_after(last):
            last = head.graph.call_module(f"{UNMERGE}.{j}", (inputs[name],))
        inputs[name].replace_all_uses_with(last, delete_user_cb=lambda user, node=last: user is not node)
    head.recompile()


def _select(value, rows: torch.Tensor, batch: int):
    """``value``'s rows ``rows`` if it holds one row per image (its first dimension is the batch), else
    ``value`` as it is (a size, a constant)."""
    return value[rows] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch else value


def _resize(gm: nn.Module, graph: ModelGraph, widths: dict[str, int], writers: bool) -> None:
    """Replace, in place, every module of ``gm`` that writes (with ``writers``) or reads a space of
    ``widths`` by one of the new width (fx made each parent a plain module of ``gm`` alone)."""
    for name, module in list(gm.named_modules()):
        out = next((widths[s] for s, _ in graph.writes.get(name, []) if s in widths), None) if writers else None
        inp = next((widths[s] * m.block for s, m in graph.reads.get(name, []) if s in widths), None)
        if out is None and inp is None:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(parent), attr, layers.resize(module, out, inp))


def skeleton(spec: Spec, stop: str, heads: list[HeadInfo], widths: dict[str, int] | None = None) -> MergedModel:
    """The merged model's modules at ``stop``, untouched tensors (its spaces of ``widths`` widened)."""
    graph = ModelGraph(spec, build_model(spec, len(heads[0].classes)))
    return MergedModel(spec, graph.plan(stop), heads, widths, graph).eval()


def _named_state(model: MergedModel) -> dict[str, torch.Tensor]:
    """The file's tensor names: ``trunk.*`` and ``heads.<i>.*``."""
    out = {f"trunk.{k}": v for k, v in model.trunk.state_dict().items()}
    for i, head in enumerate(model.head_modules):
        out.update({f"heads.{i}.{k}": v for k, v in head.state_dict().items()})
    return out


def flat_state(model: MergedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in _named_state(model).items()}


def check_output_paths(outputs: Iterable[str | Path], inputs: Iterable[str | Path], force: bool) -> None:
    """Before any work: each output's folder exists, an existing output is replaced only with
    ``force``, and no output is one of the inputs (links followed), ``force`` or not."""
    inputs = [Path(p) for p in inputs]
    for out in map(Path, outputs):
        for given in inputs:
            if os.path.realpath(out) == os.path.realpath(given) or (
                    out.exists() and given.exists() and os.path.samefile(out, given)):
                raise OutputError(f"output {str(out)!r} is the input {str(given)!r}",
                                  "write to another file: --force replaces an old output, never an input")
        if out.exists() and not force:
            raise OutputError(f"output {str(out)!r} already exists", "pass --force to overwrite it")
        folder = out.parent if str(out.parent) else Path(".")
        if not folder.is_dir():
            raise OutputError(f"output folder {str(folder)!r} does not exist", "create it first")


def write_atomic(path: Path, write, force: bool, suffix: str = ".tmp") -> None:
    """Write via a temporary file in the destination folder, renamed into place when complete."""
    write_all_atomic([(Path(path), write, suffix)], force)


def write_all_atomic(items: list[tuple[Path, object, str]], force: bool) -> None:
    """Write a set of files (``(path, write(tmp), temp suffix)``) via temporaries beside them; nothing is
    renamed into place until every one is complete. The first (the model) is renamed first: if that
    fails, nothing changed; if a later one (its card) fails, the old files it would have replaced are
    removed, so that no card ever describes another model than the one beside it."""
    for path, _, _ in items:
        if path.exists() and not force:
            raise OutputError(f"output {str(path)!r} already exists",
                              "pass --force (Python: force=True) to overwrite it")
        if path.is_dir():
            raise OutputError(f"output {str(path)!r} is a folder", "give a file name, e.g. merged.safetensors")
        folder = path.parent if str(path.parent) else Path(".")
        if not folder.is_dir():
            raise OutputError(f"output folder {str(folder)!r} does not exist", "create it first")
    temps: list[tuple[str, Path]] = []
    placed = 0
    try:
        for path, write, suffix in items:
            folder = path.parent if str(path.parent) else Path(".")
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=folder)
            except OSError as exc:
                raise OutputError(f"cannot write in {str(folder)!r}: {exc.strerror}",
                                  "choose a writable folder") from None
            os.close(fd)
            temps.append((tmp, path))
            write(tmp)
            os.chmod(tmp, 0o644)
        for tmp, path in temps:
            try:
                os.replace(tmp, path)
            except OSError:
                if placed:      # the model is new: a stale card beside it would describe the old one
                    for _, stale in temps[placed:]:
                        stale.unlink(missing_ok=True)
                raise
            placed += 1
    except BaseException as exc:
        for tmp, _ in temps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError) and placed:
            raise OutputError(f"wrote {str(items[0][0])!r} but not {str(temps[placed][1])!r}: "
                              f"{exc.strerror or exc}", "the old one was removed so that it cannot describe the "
                              "new model; fix the folder and merge again for a card") from None
        if isinstance(exc, OSError):   # a full disk, a vanished folder: nothing was written
            raise OutputError(f"cannot write {str(items[0][0])!r}: {exc.strerror or exc}",
                              "free some space or choose another folder; nothing was written") from None
        raise


# the records in a file's params; every other key is a method's parameter
RECORDS = ("tuning", "choice", "refit", "size")


def merge_metadata(*, spec: Spec, stop: str, method: str, params: dict, calibration: dict, sources: list[dict],
                   heads: list[HeadInfo], spaces: list[dict], dtype: str) -> dict[str, object]:
    """The metadata of a merged file: what ``load_merged`` and ``zipit inspect`` read back."""
    sized = any("width" in s for s in spaces)
    return {"format": SIZED_FORMAT if sized else FORMAT, "zipit_version": __version__, "spec_name": spec.name, "spec": spec.text, "stop": stop,
            "method": method, "params": params, "calibration": calibration, "sources": sources,
            "heads": [asdict(h) for h in heads], "spaces": spaces, "dtype": dtype}


def save_merged(model: MergedModel, metadata: dict[str, object], path: Path, force: bool = False,
                dtype: torch.dtype | None = None, beside: dict[Path, str] | None = None) -> None:
    """Write the model's tensors (cast to ``dtype``; the model itself is left as it is) and metadata,
    and the text files ``beside`` it (model card, config) as one set: all of them or none."""
    meta = {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}
    tensors = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
               for k, v in flat_state(model).items()}
    items = [(Path(path), lambda tmp: save_deterministic(tensors, tmp, meta), ".tmp")]
    items += [(p, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"), ".tmp")
              for p, text in (beside or {}).items()]
    write_all_atomic(items, force)


def read_metadata(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise MergedFileError(f"{str(path)!r} does not exist or is not a file", "check the path")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MergedFileError(f"{path}: not a readable safetensors file ({exc})",
                              "the file may be truncated or is not a safetensors file") from None


def _json(meta: dict, key: str, path: Path):
    try:
        return json.loads(meta[key])
    except KeyError:
        raise MergedFileError(f"{path}: metadata key {key!r} is missing", "the file was not written by zipit merge") from None
    except (ValueError, TypeError, RecursionError):
        raise MergedFileError(f"{path}: metadata key {key!r} is not valid JSON", "the file is damaged") from None


def parse_heads(meta: dict, path: Path) -> list[HeadInfo]:
    heads = _json(meta, "heads", path)
    ok = isinstance(heads, list) and heads and all(
        isinstance(h, dict) and isinstance(h.get("name"), str) and isinstance(h.get("classes"), list)
        and h["classes"] and all(isinstance(c, str) for c in h["classes"]) for h in heads)
    if not ok:
        raise MergedFileError(f"{path}: metadata 'heads' is malformed", "the file is damaged")
    return [HeadInfo(h["name"], list(h["classes"]), str(h.get("source", ""))) for h in heads]


def is_merged_file(meta: dict) -> bool:
    return meta.get("format") in (FORMAT, SIZED_FORMAT)


def stored_widths(meta: dict, path: Path, graph: ModelGraph) -> dict[str, int]:
    """The merged spaces' widths a sized file records (only those wider than one model's); each
    must be an integer between one model's width and the sum of the sources'."""
    if meta.get("format") != SIZED_FORMAT:
        return {}
    spaces, sources = _json(meta, "spaces", path), _json(meta, "sources", path)
    n = len(sources) if isinstance(sources, list) else 0
    widths = {}
    for s in spaces if isinstance(spaces, list) else [None]:
        name = s.get("space") if isinstance(s, dict) else None
        width = s.get("width") if isinstance(s, dict) else None
        o = graph.space_size.get(name) if isinstance(name, str) else None
        if o is None or type(width) is not int or not o <= width <= n * o:
            raise MergedFileError(f"{path}: metadata 'spaces' holds a bad merged width ({s!r:.80})",
                                  "the file is damaged")
        if width != o:
            widths[name] = width
    return widths


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the file's header, without reading any tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MergedFileError(f"{path}: not a readable safetensors file ({exc})",
                              "the file may be truncated or is not a safetensors file") from None


def _refuse_checkpoints(path: Path) -> None:
    """A torch checkpoint (a zip or a bare pickle) is not a merged file: say so, not "header too large"."""
    try:
        with open(path, "rb") as f:
            start = f.read(9)
    except OSError:
        return                       # read_metadata says what is wrong with the path
    if start[8:9] != b"{" and (start[:2] == b"PK" or start[:1] == b"\x80"):   # safetensors: u64 length, then '{'
        raise MergedFileError(f"{path}: a torch checkpoint, not a merged file",
                              "merged files are the .safetensors that zipit merge writes; 'zipit inspect' reads "
                              "checkpoints too")


def load_merged(path: str | Path, device: str | torch.device = "cpu", trust_builders: Iterable[str] = ()) -> MergedModel:
    """Load a merged file as a multi-head model in eval mode.

    Nothing in the file is trusted: its spec's builder must be one zipit trusts or in a module of
    ``trust_builders``, and the model is first built on the meta device (no memory) and checked
    against the file's tensor shapes before it is built for real and the tensors are read.
    """
    path = Path(path)
    _refuse_checkpoints(path)
    meta = read_metadata(path)
    if not is_merged_file(meta):
        raise MergedFileError(f"{path}: not a zipit merge (metadata 'format' is {meta.get('format')!r})",
                              "use 'zipit inspect' to look at a plain checkpoint")
    if not isinstance(meta.get("spec"), str) or not isinstance(meta.get("stop"), str):
        raise MergedFileError(f"{path}: metadata 'spec' or 'stop' is missing", "the file is damaged")
    spec = parse_spec(meta["spec"], origin=f"{path} (stored spec)", trust_builders=trust_builders)
    heads = parse_heads(meta, path)
    if len(heads) > MAX_HEADS:
        raise MergedFileError(f"{path}: metadata names {len(heads)} heads, more than zipit merges ({MAX_HEADS})",
                              "the file is damaged")
    shapes = _header_shapes(path)
    head_indices = {k.split(".")[1] for k in shapes if k.startswith("heads.")}
    expected_heads = 1 if meta["stop"] == OUTPUT_STOP else len(heads)
    if head_indices != {str(i) for i in range(expected_heads)}:
        raise MergedFileError(f"{path}: metadata names {len(heads)} heads, the tensors hold {len(head_indices)}",
                              "the file is damaged")
    with torch.device("meta"):
        widths = stored_widths(meta, path, ModelGraph(spec, build_model(spec, len(heads[0].classes))))
        expected = {k: tuple(v.shape) for k, v in _named_state(skeleton(spec, meta["stop"], heads, widths)).items()}
    bad = sorted(set(expected) ^ set(shapes)) + sorted(k for k in expected if k in shapes and expected[k] != shapes[k])
    if bad:
        raise MergedFileError(f"{path}: tensors do not match the stored spec ({', '.join(bad[:4])})",
                              "the file is damaged")
    model = skeleton(spec, meta["stop"], heads, widths)
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    broken = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:
        raise MergedFileError(f"{path}: tensor {broken!r} contains NaN or Inf", "the file is damaged; merge again")
    model.trunk.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("trunk.")})
    for i, head in enumerate(model.head_modules):
        prefix = f"heads.{i}."
        head.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    model.metadata = meta
    return model.to(device).eval()
