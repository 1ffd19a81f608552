"""merge(): every stage of ZipIt! in order, as the paper describes it.

check inputs (before any image is read) -> stream calibration images through all models and
collect correlations (``measured.Calibration``) -> choose what the options leave open on held-out
images (``choosing.decide``) -> match each feature space, zip weights and build heads, refit,
reset BatchNorm, metadata (``merge_at``). Nothing here prints: progress and warnings go to an
optional reporter, so the CLI and library users share one code path.

What is measured once (a ``Calibration``) is kept apart from what is chosen per merge (a
``MergePoint``): a sweep, a tuning study or a benchmark measures once and merges at many points,
each ``merge_at`` returning a fresh result.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import methods
from .assembly import build, match
from .bn import BatchStatistics, reset_batchnorm
from .card import card_files
from .choosing import Decision, decide, reads
from .distributed import SINGLE, Ranks
from .measured import Calibration
from .merged import MergedModel, merge_metadata, save_merged
from .methods import Match
from .options import AUTO, DTYPES, MergeOptions, MergePoint
from .refit import CHUNK, refit
from .report import Reporter
from .sizing import allocate, record
from .wording import decision_lines

__all__ = ["AUTO", "DTYPES", "Calibration", "MergeOptions", "MergePoint", "MergeResult", "merge", "merge_at"]


@dataclass
class MergeResult:
    model: MergedModel
    metadata: dict[str, object]
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | Path, force: bool = False, card: bool = True, command: str | None = None) -> None:
        """Write the merged file and, with ``card``, its model card and config beside it (``merged.md``,
        ``merged.config.json``), all or none; the model in memory is left as it is. ``command`` is
        the command line that reproduces the merge, for the card."""
        beside = card_files(self.metadata, self.model.spec.input, path, command) if card else None
        save_merged(self.model, self.metadata, Path(path), force=force, dtype=DTYPES[self.metadata["dtype"]],
                    beside=beside)


def merge(checkpoints: list[str | Path], spec, calib: str | Path, options: MergeOptions | None = None,
          report: Reporter | None = None, ranks: Ranks = SINGLE) -> MergeResult:
    """Merge two or more checkpoints of one architecture into a multi-head model (no printing).
    Under torchrun, pass ``ranks=zipcli.distributed.ranks_from_env(device)``: every rank calls
    this and gets the same result; let rank 0 alone save it."""
    options = options or MergeOptions()
    cal = Calibration(checkpoints, spec, calib, options, report, ranks=ranks)
    cal.measure(options.stop or spec.default_stop, reads(cal, options))
    result = merge_at(cal, decide(cal, options))
    for line in decision_lines(result.metadata["params"]):
        cal.report.info(line)
    return result


def merge_at(cal: Calibration, decision: Decision | MergePoint) -> MergeResult:
    """The merge of ``cal`` at a point (with the evidence that chose it, if any): match, zip, refit,
    BatchNorm reset on every fit image, metadata. A fresh result each time; ``cal`` only caches."""
    decision = decision if isinstance(decision, Decision) else Decision(decision)
    if decision.point.size is not None and not decision.point.widths:     # a size without its widths
        sized = allocate(cal, decision.point.stop, decision.point.size)
        decision = replace(decision, point=replace(decision.point, widths=sized.widths))
    point, report, reset_bn = decision.point, cal.report, cal.options.reset_bn
    timings = dict(cal.timings)
    if decision.seconds is not None:
        timings["tuning"] = decision.seconds
    t = time.perf_counter()
    matches = match(cal, point.stop, point.method, point.setting, point.params, dict(point.widths))
    model = build(cal, point.stop, matches)
    spaces = [_space_summary(cal, name, matches[name], bool(point.widths) or point.size is not None)
              for name in cal.plan(point.stop).merged_spaces]
    for s in spaces:
        if s["budget_lifted"]:
            report.warn(f"space {s['space']}: zipit could not finish within the beta budget and lifted it")
    timings["matching+zip"] = time.perf_counter() - t

    statistics = BatchStatistics(model) if reset_bn and point.refit != "none" else None
    try:
        refitted = _refit(cal, point, model, matches, timings, statistics) if point.refit != "none" else None
    finally:
        if statistics is not None:
            statistics.close()

    t = time.perf_counter()
    if reset_bn and not (statistics and statistics.measured):
        report.start("batchnorm reset", cal.shard.readable)
        try:
            reset_batchnorm(model, cal.shard.chunks(CHUNK), cal.options.device, on_batch=report.advance,
                            ranks=cal.ranks)
        finally:
            report.done()
        cal.images_read = True
        cal.warn_skipped()
    timings["batchnorm"] = time.perf_counter() - t
    if cal.ranks.many:
        timings["collectives"] = cal.ranks.waited
    model.metadata = _metadata(cal, decision, refitted, spaces, model)
    return MergeResult(model.eval(), model.metadata, timings)


def _metadata(cal: Calibration, decision: Decision, refitted: dict | None, spaces: list[dict],
              model: MergedModel) -> dict:
    """What the merged file records: the point, the evidence behind it, the images, the sources."""
    point, o = decision.point, cal.options
    dtype = point.dtype or next(k for k, v in DTYPES.items() if v == cal.sources[0].checkpoint.dtype)
    method = methods.get(point.method)
    params: dict[str, object] = method.values({"alpha": point.setting.alpha, "beta": point.setting.beta,
                                               **dict(point.params)})
    if decision.tuning is not None and method.needs_correlation:
        params["tuning"] = decision.tuning.to_metadata()
    if decision.choice is not None:
        params["choice"] = decision.choice.to_metadata()
    if refitted is not None:
        params["refit"] = refitted
    if point.size is not None:
        params["size"] = record(cal, point.stop, point.size, dict(point.widths),
                                sum(p.numel() for p in model.parameters()))
    readable, skipped = cal.shard.readable, len(cal.shard.skipped)
    if cal.ranks.many:     # every rank read its own shard
        readable, skipped = map(int, cal.ranks.sum(torch.tensor([readable, skipped])).tolist())
    calibration = {"folder": str(cal.calib), "num_images": readable if cal.images_read else 0,
                   "held_out": cal.held_count, "requested": o.num_calib, "seed": o.seed,
                   "augment": o.augment, "batch_size": o.batch_size, "reset_bn": o.reset_bn,
                   "skipped": skipped}
    sources = [{"file": s.checkpoint.path.name, "sha256": s.checkpoint.sha256, "classes": s.classes}
               for s in cal.sources]
    return merge_metadata(spec=cal.spec, stop=point.stop, method=point.method, params=params,
                          calibration=calibration, sources=sources, heads=cal.heads(point.stop), spaces=spaces,
                          dtype=dtype)


def _refit(cal: Calibration, point: MergePoint, model: MergedModel, matches: dict[str, Match],
           timings: dict, statistics: BatchStatistics | None) -> dict:
    """The refit, in place, on every fit image of this process's shard; its facts for the file."""
    o, t = cal.options, time.perf_counter()
    images = (chunk.to(o.device) for chunk in cal.shard.chunks(CHUNK))
    facts = refit(model, [s.model for s in cal.sources], cal.graph, cal.plan(point.stop), matches, images,
                  o.reset_bn, o.seed, cal.report, cal.ranks, statistics=statistics)
    cal.images_read = True
    cal.warn_skipped()
    timings["refit"] = time.perf_counter() - t
    return facts


def _space_summary(cal: Calibration, name: str, m: Match, sized: bool) -> dict:
    """Per-space facts for the file: how well the merged features agree, how many merges stayed
    within one model, whether zipit had to lift its budget; for a merge at a size, the merged width
    (only then: a full zip's file stays as it was)."""
    corr = cal.correlations.get(name)
    mean_corr = None if corr is None else m.mean_merged_correlation(corr)
    if sized and mean_corr is not None and not math.isfinite(mean_corr):    # every feature kept apart: no pair
        mean_corr = None
    summary = {"space": name, "size": cal.graph.space_size[name],
               "mean_corr": None if mean_corr is None else round(mean_corr, 6),
               "within_share": round(m.within_merges / m.total_merges, 6) if m.total_merges else 0.0,
               "budget_lifted": m.budget_lifted}
    if sized:
        summary["width"] = m.size
    return summary
