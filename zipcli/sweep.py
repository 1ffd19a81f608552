"""Every stop, size and method of one merge from one calibration pass, scored side by side (``zipit sweep``).

A space's correlations depend on the source models and the images, not on where the trunk is cut,
and the deepest stop's spaces include every shallower stop's. So the images go through the sources
once; each point (stop, size, method) then costs only its matching and zip, its BatchNorm reset, its
tuning where alpha and beta are left open, and its scoring. Each point is the model that
``zipit merge`` with the same options writes. The points no other point beats on both cost (MACs)
and score form the frontier: where a user should pick.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

from .errors import ZipitError
from .evaluate import Ensemble, evaluate, labelled_batches, labelled_images
from .macs import count_macs
from .choosing import decide
from .measured import Calibration
from .pipeline import MergeOptions, merge_at
from .report import LoggingReporter, Reporter
from .sizing import full_zip, reaches
from .specs.format import OUTPUT_STOP, Spec
from .tuning import head_outputs, score

DEFAULT_METHODS = ("zipit", "permute")
CACHE_BYTES = 2**30     # labelled images are decoded once and kept when they fit in this; else per point


@dataclass
class SweepPoint:
    stop: str
    method: str
    params: dict                # the setting used (zipit: alpha and beta; the chosen ones when tuned)
    parameters: int             # of the merged model, all heads included
    macs: int                   # per image at the spec's input size
    accuracy: dict | None       # ``evaluate``'s result on the labelled folder, if one was given
    divergence: float | None    # label-free: the tuning criterion on held-out images (lower is better)
    size: float | None = None   # the size asked for (``merge --size``); None: the stop's plain merge
    frontier: bool = False      # no other point costs no more MACs and scores no worse (one strictly)


@dataclass
class SweepResult:
    spec: str
    points: list[SweepPoint]
    source_parameters: int      # the sources together: what running them side by side costs
    source_macs: int
    reference: dict | None      # the sources run separately (their ensemble) on the labelled folder
    data: str | None
    calibration: dict

    def to_dict(self) -> dict:
        """Every field; a sweep without sizes keeps its former shape (no size, no frontier)."""
        data = asdict(self)
        if all(p.size is None for p in self.points):
            for p in data["points"]:
                del p["size"], p["frontier"]
        return data


def sweep(checkpoints: Sequence[str | Path], spec: Spec, calib: str | Path,
          methods: Sequence[str] = DEFAULT_METHODS, stops: Sequence[str] | None = None,
          options: MergeOptions | None = None, data: str | Path | None = None, limit: int | None = None,
          report: Reporter | None = None, sizes: Sequence[float | None] = (None,)) -> SweepResult:
    """Merge at every stop (default: the spec's stage stops) and size (None: the stop's plain merge)
    with every method and score each merge: accuracy on ``data`` (a labelled folder, at most
    ``limit`` images per class) or, without it, the label-free divergence on held-out calibration
    images. A size below a stop's full zip is skipped there (said once). ``options.method``,
    ``options.stop`` and ``options.size`` are ignored; the other options apply to every point.

    With a labelled folder and no method left to tune, every point calibrates on the whole sample,
    as ``zipit merge`` does. Otherwise images are held out as for tuning; a folder without spare
    images beyond the sample gives up part of the sample, for every method alike.
    """
    base = options or MergeOptions()
    report = _PointReporter(report or LoggingReporter())
    methods, stops = list(dict.fromkeys(methods)), list(dict.fromkeys(stops or spec.stops))
    sizes = list(dict.fromkeys(sizes)) or [None]
    base = replace(base, size=None)
    if not methods:
        raise ZipitError("no method to sweep", "name one or more (methods, --method)")
    if OUTPUT_STOP in stops:
        raise ZipitError("sweep covers stage stops; stop 'output' merges the classifiers",
                         "merge at 'output' with zipit merge --stop output")
    for m in methods:
        for size in sizes:
            replace(base, method=m, size=size).validate(len(checkpoints), strict=False)
    for name in base.params:
        if not any(name in replace(base, method=m).given(replace(base, method=m).matching) for m in methods):
            raise ZipitError(f"no method swept has a parameter {name!r}", "check --param, or add the method that "
                             "takes it (--method)")
    tuned = any(replace(base, method=m).tunes for m in methods)
    labelled = _Labelled(data, limit, spec, base.batch_size) if data is not None else None
    first = next((m for m in methods if m != "average"), methods[0])
    cal = Calibration(checkpoints, spec, calib, replace(base, method=first, stop=stops[-1]), report,
                      hold_out=tuned or data is None)
    deepest = _deepest(cal, stops)
    held = None
    if data is None:
        held = cal.held_out() if cal.held_files else None
        if held is None:
            raise ZipitError(f"{calib}: too few spare calibration images to score merges without labels",
                             "give a labelled test folder (data, --data DIR), or more calibration images")
    if labelled is not None and not labelled.folders & {c for s in cal.sources for c in s.classes}:
        raise ZipitError(f"no class folder of {str(data)!r} matches a class of the checkpoints",
                         f"folders: {', '.join(sorted(labelled.folders)[:5])}...; name the checkpoints' classes "
                         "(--classes or a JSON sidecar) as the folders are named")

    cal.measure(deepest, first)
    source_models = [s.model for s in cal.sources]
    source_macs = sum(count_macs(m, spec.input.shape) for m in source_models)
    source_params = sum(sum(p.numel() for p in m.parameters()) for m in source_models)
    reference = None
    if labelled is not None:
        reference = labelled.score(Ensemble(source_models), [s.checkpoint.name for s in cal.sources],
                                   [s.classes for s in cal.sources], base.device, report, "ensemble")
    points = []
    for stop in stops:
        heads = cal.heads(stop)
        for size in sizes:
            if size is not None and not reaches(cal, stop, size):
                report.info(f"size {size:g} is below the full zip at stop {stop} ({full_zip(cal, stop):.3f}x one "
                            "model): skipped there")
                continue
            for method in methods:
                where = stop if size is None else f"{stop}@{size:g}"
                report.point = f"{where} {method}: "
                result = merge_at(cal, decide(cal, replace(base, method=method, stop=stop, size=size)))
                report.point = ""
                model = result.model
                accuracy = divergence = None
                if labelled is not None:
                    accuracy = labelled.score(model, [h.name for h in heads], [h.classes for h in heads], base.device,
                                              report, f"eval {where} {method}")
                else:
                    divergence = score(head_outputs(model, held.images, len(heads)), held.targets)
                points.append(SweepPoint(stop, method, result.metadata["params"],
                                         sum(p.numel() for p in model.parameters()),
                                         count_macs(model, spec.input.shape), accuracy, divergence, size))
    if not points:
        raise ZipitError(f"no size swept is within reach of a stop swept (the smallest full zip: "
                         f"{min(full_zip(cal, s) for s in stops):.3f}x one model)",
                         "sweep a larger size (sizes, --size) or a later stop")
    scores = [p.accuracy["avg_task"] if p.accuracy is not None else -p.divergence for p in points]
    for p, best in zip(points, frontier([p.macs for p in points], scores)):
        p.frontier = best
    return SweepResult(spec.name, points, source_params, source_macs, reference,
                       None if data is None else str(data), result.metadata["calibration"])


def frontier(costs: Sequence[float], scores: Sequence[float]) -> list[bool]:
    """Per point, whether no other point costs no more and scores no less, one of them strictly
    (higher scores are better): the points worth choosing from."""
    return [not any(c <= cost and s >= best and (c < cost or s > best) for c, s in zip(costs, scores))
            for cost, best in zip(costs, scores)]


def _deepest(cal: Calibration, stops: list[str]) -> str:
    """The stop whose merged spaces include every other stop's: its calibration serves them all."""
    spaces = {stop: set(cal.plan(stop).merged_spaces) for stop in stops}   # also checks that each exists
    deepest = max(stops, key=lambda s: len(spaces[s]))
    if any(not spaces[s] <= spaces[deepest] for s in stops):
        raise ZipitError(f"the stops {', '.join(stops)} do not nest: no single calibration pass serves them all",
                         "sweep the stops of one branch of the model at a time (stops, --stop)")
    return deepest


class _PointReporter:
    """Passes every report on, with the point being merged before each phase's label, so that the
    tuning, refit and reset bars of one point tell which (stop, method) they belong to."""

    def __init__(self, inner: Reporter):
        self.inner, self.point = inner, ""

    def start(self, phase: str, total: int | None = None) -> None:
        self.inner.start(self.point + phase, total)

    def advance(self, n: int = 1) -> None:
        self.inner.advance(n)

    def done(self) -> None:
        self.inner.done()

    def warn(self, message: str) -> None:
        self.inner.warn(self.point + message)

    def info(self, message: str) -> None:
        self.inner.info(self.point + message)


class _Labelled:
    """A labelled test folder, decoded once when it fits in ``CACHE_BYTES``."""

    def __init__(self, data, limit, spec: Spec, batch_size: int):
        self.items = labelled_images(data, limit)
        self.folders = {label for _, label in self.items}
        self.pre, self.batch_size = spec.input, batch_size
        self.keep = len(self.items) * math.prod(spec.input.shape) * 4 <= CACHE_BYTES
        self.cache = None

    def score(self, model, names, classes, device, report, label) -> dict:
        if self.keep and self.cache is None:
            self.cache = list(labelled_batches(self.items, self.pre, self.batch_size))
        batches = self.cache if self.cache is not None else labelled_batches(self.items, self.pre, self.batch_size)
        report.start(label, len(self.items))
        try:
            return evaluate(model, batches, names, classes, device, on_batch=report.advance)
        finally:
            report.done()
