"""Per-task and joint accuracy of a multi-head model on a labelled image folder.

Per task: each head on the images of its own classes, restricted to its own
classes (task known at run time). Joint: softmax per head, concatenated, argmax
over every class of every head (the paper's protocol).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.nn as nn

from .calibration import DECODE_ERRORS, IMAGE_SUFFIXES, decode
from .checkpoints import load_sources, run_layout
from .errors import CalibrationError, ZipitError
from .merged import is_merged_file, load_merged, read_metadata
from .report import SilentReporter
from .specs.format import Preprocess


def labelled_images(root: str | Path, limit: int | None = None) -> list[tuple[Path, str]]:
    """``root/<class>/*`` -> (path, class name), sorted; at most ``limit`` per class, drawn at random
    (seed 0) rather than the first names, which may not be typical of the class."""
    root = Path(root)
    if not root.is_dir():
        raise CalibrationError(f"data folder {str(root)!r} does not exist or is not a folder", "check the path")
    items = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if limit is not None and limit < len(files):
            files = sorted(random.Random(0).sample(files, limit))
        items += [(p, folder.name) for p in files]
    if not items:
        raise CalibrationError(f"data folder {str(root)!r} holds no labelled images",
                               "lay it out as DIR/<class name>/<images>")
    return items


def labelled_batches(items: list[tuple[Path, str]], pre: Preprocess, batch_size: int,
                     skipped: list | None = None) -> Iterator[tuple[torch.Tensor, list[str]]]:
    xs, ys = [], []
    for path, label in items:
        try:
            xs.append(decode(path, pre))
        except DECODE_ERRORS as exc:
            if skipped is not None:
                skipped.append((path, f"{exc.__class__.__name__}: {exc}"[:200]))
            continue
        ys.append(label)
        if len(xs) == batch_size:
            yield torch.stack(xs), ys
            xs, ys = [], []
    if xs:
        yield torch.stack(xs), ys


class Ensemble(nn.Module):
    """Source models run separately, scored like the heads of a merged model (the upper bound)."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        self.models = nn.ModuleList(models)

    def forward(self, x):
        return [m(x) for m in self.models]


@dataclass
class Scorer:
    head_names: list[str]
    head_classes: list[list[str]]
    correct: list[int] = field(default_factory=list)
    seen: list[int] = field(default_factory=list)
    joint_correct: int = 0
    joint_seen: int = 0
    unknown: int = 0

    def __post_init__(self):
        self.correct = [0] * len(self.head_classes)
        self.seen = [0] * len(self.head_classes)
        self.all_classes = [c for cs in self.head_classes for c in cs]
        self.index = [{c: i for i, c in enumerate(cs)} for cs in self.head_classes]

    def update(self, logits: list[torch.Tensor], labels: list[str]) -> None:
        logits = [l.float().cpu() for l in logits]
        for h, (lg, index) in enumerate(zip(logits, self.index)):
            rows = [r for r, y in enumerate(labels) if y in index]
            if rows:
                pred = lg[rows].argmax(1)
                target = torch.tensor([index[labels[r]] for r in rows])
                self.correct[h] += int((pred == target).sum())
                self.seen[h] += len(rows)
        joint = torch.cat([l.softmax(1) for l in logits], dim=1).argmax(1)
        known = set(self.all_classes)
        for r, y in enumerate(labels):
            if y in known:
                self.joint_seen += 1
                self.joint_correct += int(self.all_classes[int(joint[r])] == y)
            else:
                self.unknown += 1

    def result(self) -> dict:
        heads = [{"name": n, "images": s, "correct": c, "accuracy": (c / s) if s else None}
                 for n, s, c in zip(self.head_names, self.seen, self.correct)]
        scored = [h["accuracy"] for h in heads if h["accuracy"] is not None]
        return {"heads": heads,
                "avg_task": sum(scored) / len(scored) if scored else None,
                "joint": self.joint_correct / self.joint_seen if self.joint_seen else None,
                "joint_images": self.joint_seen, "unknown_class_images": self.unknown}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, list[str]]], head_names: list[str],
             head_classes: list[list[str]], device="cpu", on_batch=None) -> dict:
    model.eval()
    scorer = Scorer(head_names, head_classes)
    for x, labels in batches:
        scorer.update(model(x.to(device)), labels)
        if on_batch:
            on_batch(len(labels))
    return scorer.result()


def evaluate_files(files: list, data: str | Path, spec=None, classes: list[list[str]] | None = None,
                   limit: int | None = None, batch_size: int = 256, device: str = "cpu", report=None,
                   trust_builders: Iterable[str] = ()) -> dict:
    """Score merged files side by side (each under its file name), and plain checkpoints (each alone,
    and their ensemble if several: the reference a merge is measured against)."""
    report = report or SilentReporter()
    files = [Path(f) for f in files]
    merged = [f for f in files if f.suffix == ".safetensors" and f.is_file() and is_merged_file(read_metadata(f))]
    plain = [f for f in files if f not in merged]
    runs = []   # (label, kind, model, head names, head classes, preprocessing, file)
    for f in merged:
        model = run_layout(load_merged(f, device, trust_builders), device)
        label = f.name if [g.name for g in merged].count(f.name) == 1 else str(f)
        runs.append((label, "merged", model, [h.name for h in model.heads], [h.classes for h in model.heads],
                     model.spec.input, str(f)))
    if plain:
        if spec is None:
            raise ZipitError(f"plain checkpoint {str(plain[0])!r} needs an architecture (--arch or --spec)",
                             "e.g. --arch resnet20; a merged file carries its own")
        sources = load_sources(plain, spec, classes, device, min_models=1)
        runs += [(s.checkpoint.name, "source", Ensemble([s.model]), [s.checkpoint.name], [s.classes], spec.input,
                  str(s.checkpoint.path)) for s in sources]
        if len(sources) > 1:
            runs.append(("ensemble", "ensemble", Ensemble([s.model for s in sources]),
                         [s.checkpoint.name for s in sources], [s.classes for s in sources], spec.input, None))
    items = labelled_images(data, limit)
    folders = sorted({label for _, label in items})
    known = {c for run in runs for group in run[4] for c in group}
    if not known & set(folders):
        raise ZipitError(f"no class folder of {str(data)!r} matches a class of the model(s)",
                         f"folders: {', '.join(folders[:5])}...; classes: {', '.join(sorted(known)[:5])}...")
    skipped: list = []
    results = []
    for label, kind, model, names, head_classes, pre, file in runs:
        report.start(f"eval {label}", len(items))
        try:
            r = evaluate(model, labelled_batches(items, pre, batch_size, skipped), names, head_classes, device,
                         on_batch=report.advance)
        finally:
            report.done()
        results.append({"model": label, "kind": kind, "file": file, **r})
    return {"data": str(data), "images": len(items), "skipped_images": len({p for p, _ in skipped}),
            "unknown_class_folders": sorted(set(folders) - known), "results": results}
