"""Run a traced model over many chunks of images one segment of its nodes at a time, holding what
later segments need in a store bounded in memory.

The refit solves each layer from every image before the next layer's input can be computed, so the
activations of all images must survive from one layer to the next. Held in memory they bounded the
images a refit could use (13 for two ResNet-50s at 224 px in 256 MiB). Here they live in memory up
to a budget and beyond it in files of a temporary folder, read back bit for bit: memory stays fixed
however many images there are, and where a value lived never changes a result.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable

import torch
import torch.fx as fx

from .errors import ZipitError

SMALL = 1 << 16           # bytes: a tensor this small always stays in memory (shapes, scalars)


@dataclass(frozen=True)
class _Spilled:
    """Where a tensor went: its file, and what it takes to rebuild it."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device
    nbytes: int


class SpillStore:
    """Values by key: in memory up to ``budget`` bytes of tensors (no limit: None), in files beyond it."""

    def __init__(self, budget: int | None):
        self.budget, self.used, self.spilled = budget, 0, 0
        self._values: dict[Hashable, object] = {}
        self._folder: Path | None = None
        self._files = 0

    def __enter__(self) -> "SpillStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._values.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def put(self, key: Hashable, value) -> None:
        self._values[key] = self._keep(value)

    def get(self, key: Hashable):
        return self._load(self._values[key])

    def pop(self, key: Hashable):
        kept = self._values.pop(key)
        value = self._load(kept)
        self._free(kept)
        return value

    def drop(self, key: Hashable) -> None:
        self._free(self._values.pop(key))

    def _keep(self, value):
        if isinstance(value, torch.Tensor):
            size = value.nelement() * value.element_size()
            if size <= SMALL or self.budget is None or self.used + size <= self.budget:
                self.used += size
                return value
            return self._write(value, size)
        if type(value) in (tuple, list) and any(isinstance(v, torch.Tensor) for v in value):
            return type(value)(self._keep(v) for v in value)
        return value

    def _load(self, kept):
        if isinstance(kept, _Spilled):
            raw = torch.from_file(str(kept.path), shared=False, size=kept.nbytes, dtype=torch.uint8)
            return raw.view(kept.dtype).reshape(kept.shape).to(kept.device)
        if type(kept) in (tuple, list):
            return type(kept)(self._load(v) for v in kept)
        return kept

    def _free(self, kept) -> None:
        if isinstance(kept, _Spilled):
            kept.path.unlink(missing_ok=True)
        elif isinstance(kept, torch.Tensor):
            self.used -= kept.nelement() * kept.element_size()
        elif type(kept) in (tuple, list):
            for v in kept:
                self._free(v)

    def _write(self, value: torch.Tensor, size: int) -> _Spilled:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="zipit-refit-"))
        path = self._folder / f"{self._files}.bin"
        self._files += 1
        flat = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        try:
            flat.numpy().tofile(path)
        except OSError as exc:
            raise ZipitError(f"the refit could not keep its activations in {self._folder}: {exc.strerror}",
                             "free space there, point TMPDIR at a larger disk, or use --refit none") from None
        self.spilled += size
        return _Spilled(path, value.dtype, tuple(value.shape), value.device, size)


class SegmentRunner:
    """A traced model run over ``chunks`` chunks of inputs, a segment of nodes at a time: every
    chunk runs the segment before the next segment starts, so a layer's weights may change between
    segments. What a later segment still needs goes into ``store`` under ``(tag, chunk, node)``."""

    def __init__(self, gm: fx.GraphModule, inputs: Callable[[int], tuple], store: SpillStore, tag: str):
        self.gm, self.nodes = gm, list(gm.graph.nodes)
        self.modules = dict(gm.named_modules())
        self.inputs, self.store, self.tag = inputs, store, tag
        self.last: dict[fx.Node, int] = {}              # each value's last use
        for i, node in enumerate(self.nodes):
            for used in node.all_input_nodes:
                self.last[used] = i
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.placeholder = {n: k for k, n in enumerate(placeholders)}
        self.pos = 0

    def call_of(self, name: str) -> int:
        """The index of the next call of module ``name``."""
        for i in range(self.pos, len(self.nodes)):
            node = self.nodes[i]
            if node.op == "call_module" and node.target == name:
                return i
        raise ValueError(f"{name} is not called after node {self.pos}")

    def input_of(self, c: int, end: int):
        """Run chunk ``c`` up to (not through) node ``end``; that node's first argument."""
        arg = self.nodes[end].args[0]
        return self._run(c, end, arg)

    def output_of(self, c: int, end: int):
        """Run chunk ``c`` through node ``end``; that node's value."""
        return self._run(c, end + 1, self.nodes[end])

    def finish(self, c: int):
        """Run chunk ``c`` to the end; the model's output."""
        return self._run(c, len(self.nodes), self.nodes[-1])

    def advance(self, end: int) -> None:
        """Every chunk has run up to ``end``: the next segment starts there."""
        self.pos = end

    def _run(self, c: int, end: int, want):
        fresh: dict[fx.Node, object] = {}
        loaded: dict[fx.Node, object] = {}
        inputs = None

        def load(node: fx.Node):
            if node in fresh:
                return fresh[node]
            if node not in loaded:
                loaded[node] = self.store.get((self.tag, c, node.name))
            return loaded[node]

        for i in range(self.pos, end):
            node = self.nodes[i]
            if node.op == "placeholder":
                inputs = self.inputs(c) if inputs is None else inputs
                fresh[node] = inputs[self.placeholder[node]]
            else:
                fresh[node] = self._compute(node, load)
            for used in node.all_input_nodes:        # a value dies at its last use
                if self.last[used] == i and used is not want:
                    if used in fresh:
                        del fresh[used]
                    else:
                        loaded.pop(used, None)
                        self.store.drop((self.tag, c, used.name))
        result = load(want) if isinstance(want, fx.Node) else want
        for node, value in fresh.items():
            if self.last.get(node, -1) >= end:
                self.store.put((self.tag, c, node.name), value)
        return result

    def _compute(self, node: fx.Node, load):
        args, kwargs = fx.node.map_arg(node.args, load), fx.node.map_arg(node.kwargs, load)
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "get_attr":
            value = self.gm
            for part in node.target.split("."):
                value = getattr(value, part)
            return value
        return args[0]                            # output
