"""What is measured once and shared by every merge made from it: a ``Calibration``.

The sources and their graph, the calibration images (the fit sample, this process's shard of it,
the held-out files), the correlations of the spaces measured so far, and the caches that tuning
reads (the held-out images with the sources' outputs, the BatchNorm images, one template model per
stop). Nothing here decides how to merge: a ``MergePoint`` does, and ``pipeline.merge_at`` merges a
calibration at a point into a fresh result, as often as asked.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from . import methods
from .calibration import HOLDOUT, MIN_HOLDOUT, ImageStream, list_images, sample_images, split_holdout
from .checkpoints import load_sources, run_layout
from .correlation import collect_correlations, sum_over_ranks
from .distributed import SINGLE, Ranks
from .errors import CalibrationError, ZipitError
from .macs import count_macs
from .merged import HeadInfo, MergedModel, skeleton
from .options import AUTO, MergeOptions
from .report import LoggingReporter, Reporter
from .specs.format import OUTPUT_STOP, Spec
from .specs.graph import ModelGraph, StopPlan
from .tuning import BN_IMAGES, HeldOut, TuningPlan, candidate_settings, plan_tuning, screened_count, tuning_budget


class Calibration:
    """The sources and what their calibration images measured, for merges at any point.

    ``options`` are the merge's options: their sampling fields (num_calib, seed, batch_size,
    augment, device, reset_bn, classes) shape what is measured; their method and stop decide only
    whether images are held out for tuning and how many (``hold_out``: force it either way).
    """

    def __init__(self, checkpoints: list[str | Path], spec: Spec, calib: str | Path,
                 options: MergeOptions | None = None, report: Reporter | None = None,
                 hold_out: bool | None = None, ranks: Ranks = SINGLE):
        self.options = options or MergeOptions()
        self.report = report or LoggingReporter()
        self.ranks = ranks
        ranks.together(lambda: self._setup(checkpoints, spec, calib, hold_out))

    def _setup(self, checkpoints, spec: Spec, calib, hold_out: bool | None) -> None:
        options = self.options
        options.validate(len(checkpoints))
        t0 = time.perf_counter()
        self.spec, self.calib, self.timings = spec, calib, {}
        self.sources = load_sources(list(checkpoints), spec, options.classes, options.device)
        self.graph = ModelGraph(spec, self.sources[0].model)
        self._warn_unnamed_classes()
        self.plan(options.stop or spec.default_stop)        # checks the stop before any image is read
        self.states = [{k: v.detach().cpu().contiguous() for k, v in s.model.state_dict().items()}
                       for s in self.sources]
        self.source_macs = sum(count_macs(s.model, spec.input.shape) for s in self.sources)
        self._templates: dict[tuple, tuple[MergedModel, int]] = {}   # by (stop, widths)
        self.correlations: dict[str, np.ndarray] = {}
        self._between_only: set[str] = set()       # spaces whose correlations within a model were not measured
        self._split_images(list_images(calib), hold_out)
        self._warned_skips = 0
        self._held: HeldOut | None = None          # every held-out image read so far, in file order
        self._held_files_read = 0                  # held-out files read (or found unreadable) so far
        self._held_unreadable: set[Path] = set()
        self._bn_images: torch.Tensor | None = None
        self.derived: dict[tuple, object] = {}     # what later stages compute from the correlations once (sizing)
        self.images_read = False
        self.timings["load"] = time.perf_counter() - t0

    def _split_images(self, all_files: list[Path], hold_out: bool | None) -> None:
        """The fit sample (``stream``), this rank's shard of it, and the held-out files for tuning."""
        options, report, calib = self.options, self.report, self.calib
        stream = ImageStream(sample_images(all_files, options.num_calib, options.seed), self.spec.input,
                             options.batch_size, options.augment, options.seed)
        if len(stream) < options.num_calib:
            report.warn(f"{calib} holds {len(stream)} images, fewer than the {options.num_calib} asked for "
                        "(num_calib, --num-calib): using all of them")
        self.held_files: list[Path] = []
        self.over_budget = False
        if options.tunes if hold_out is None else hold_out:
            stop = options.stop or self.spec.default_stop
            limit = self.tuning_plan(options, stop, len(stream)).held if hold_out is None else None
            self.over_budget = limit == 0
            fit_files, self.held_files = split_holdout(all_files, stream.files, options.seed, limit)
            stream = stream.with_files(fit_files)
            if not self.held_files and options.tunes and limit != 0:
                fixed = options.fixed_setting
                using = ("permute (the default needs held-out images to prefer zipit)" if options.method == AUTO
                         else f"alpha {fixed.alpha:g}, beta {fixed.beta:g}")
                report.warn(f"only {len(stream)} calibration images: too few to hold any out for tuning; using "
                            f"{using} (tuning needs {MIN_HOLDOUT} images beyond the sample, or a sample of "
                            f"{4 * MIN_HOLDOUT} or more: num_calib, --num-calib)")
        self.stream = stream                                    # every fit image
        self.shard = stream.with_files(self.ranks.shard(stream.files, options.batch_size))   # what this rank reads
        batches = -(-len(stream) // options.batch_size)
        if self.ranks.many and batches < self.ranks.world:
            raise CalibrationError(f"{len(stream)} calibration images make {batches} batches of {options.batch_size}, "
                                   f"too few for {self.ranks.world} processes (each needs one)",
                                   "use fewer processes, or a smaller batch size (batch_size, --batch-size)")

    # --- stops

    def plan(self, stop: str) -> StopPlan:
        """Which spaces a trunk cut after ``stop`` merges (checks that the stop exists and fits)."""
        plan = self.graph.plan(stop)
        if stop == OUTPUT_STOP and any(s.classes != self.sources[0].classes for s in self.sources):
            raise ZipitError("stop 'output' merges the classifiers, which needs identical classes in every model",
                             f"use a stage stop ({', '.join(self.spec.stops)}) for models with different classes")
        return plan

    def heads(self, stop: str) -> list[HeadInfo]:
        if stop == OUTPUT_STOP:
            return [HeadInfo("merged", self.sources[0].classes, ",".join(s.checkpoint.name for s in self.sources))]
        return [HeadInfo(s.checkpoint.name, s.classes, s.checkpoint.path.name) for s in self.sources]

    def template(self, stop: str, widths: dict[str, int] | None = None) -> MergedModel:
        """This stop's merged model (its spaces of ``widths`` widened), built once: tuning candidates
        are tensors run through it (building a model runs its initialisers, which costs more than
        scoring a candidate)."""
        key = (stop, tuple(sorted((widths or {}).items())))
        if key not in self._templates:
            device = self.options.device
            model = run_layout(skeleton(self.spec, stop, self.heads(stop), widths).to(device), device)
            self._templates[key] = model, count_macs(model, self.spec.input.shape)
        return self._templates[key][0]

    def merged_macs(self, stop: str, widths: dict[str, int] | None = None) -> int:
        """Multiply-accumulates of the merged model at ``stop`` (``widths``: see ``template``), per image."""
        self.template(stop, widths)
        return self._templates[(stop, tuple(sorted((widths or {}).items())))][1]

    # --- measuring

    def measure(self, stop: str, method: str = "zipit") -> None:
        """Stream the (fit) calibration images once through every model: one correlation per space
        merged at ``stop``, if ``method`` needs them (plain averaging does not: its images are read
        by the BatchNorm reset only), and within each model only if it reads them (permute does not).
        Correlations measured for a deeper stop serve a shallower one: a space's correlation does
        not depend on where the trunk is cut."""
        plan, wanted = self.plan(stop), methods.get(method)
        t = time.perf_counter()
        within = wanted.reads_within
        if not wanted.needs_correlation or all(n in self.correlations and not (within and n in self._between_only)
                                               for n in plan.merged_spaces):
            self.timings.setdefault("calibration", time.perf_counter() - t)
            return
        acc = self.ranks.together(lambda: collect_correlations(
            [s.model for s in self.sources], self.spec, plan, self.shard, self.options.device, self.report, within))
        sum_over_ranks(acc, plan.merged_spaces, self.ranks)
        self.correlations.update({name: acc.pop(name).correlation().cpu().numpy() for name in plan.merged_spaces})
        if within:
            self._between_only -= set(plan.merged_spaces)
        else:
            self._between_only |= set(plan.merged_spaces)
        self.images_read = True
        self.warn_skipped()
        self.timings["calibration"] = self.timings.get("calibration", 0.0) + time.perf_counter() - t

    def warn_skipped(self) -> None:
        """One warning per pass that found unreadable images."""
        skipped = self.shard.skipped
        if len(skipped) > self._warned_skips:
            first = skipped[self._warned_skips]
            self.report.warn(f"skipped {len(skipped) - self._warned_skips} unreadable image(s), "
                             f"e.g. {first[0]}: {first[1]}")
            self._warned_skips = len(skipped)

    def _warn_unnamed_classes(self) -> None:
        unnamed = [s.checkpoint.path.name for s in self.sources
                   if not self.options.classes and s.checkpoint.classes is None]
        if unnamed:
            self.report.warn(f"{', '.join(unnamed)}: no class names, heads get class_0, class_1, ... (zipit eval "
                             "matches class folders by name); name them with classes (--classes a,b,...) once per "
                             'checkpoint, or a JSON sidecar {"classes": [...]} beside each (a.pt -> a.json)')

    # --- what tuning reads

    def bn_subset(self) -> torch.Tensor:
        """The fit images each tuning candidate's BatchNorm is reset on (a random draw: the sample's
        order is the draw's)."""
        if self._bn_images is None:
            self._bn_images = self.stream.first(BN_IMAGES).to(self.options.device)
        return self._bn_images

    def held_out(self, n: int | None = None) -> HeldOut | None:
        """The held-out images of the first ``n`` held-out files (default: all), never used for
        correlations, and the source models' logits on them; None if fewer than ``MIN_HOLDOUT``
        could be read. Each file is read once: asking for more reads only the new ones."""
        want = len(self.held_files) if n is None else min(n, len(self.held_files))
        if want > self._held_files_read:
            stream = self.stream.with_files(self.held_files[self._held_files_read:want], augment=False)
            batches = list(stream.batches())
            if batches:
                new = HeldOut.from_sources(torch.cat(batches).to(self.options.device), [s.model for s in self.sources])
                self._held = new if self._held is None else self._held.joined(new)
            self._held_unreadable |= {path for path, _ in stream.skipped}
            self._held_files_read = want
        count = want - len(self._held_unreadable.intersection(self.held_files[:want]))
        return self._held.first(count) if self._held is not None and count >= MIN_HOLDOUT else None

    @property
    def held_count(self) -> int:
        """Held-out images read (and scored) so far."""
        return 0 if self._held is None else len(self._held.images)

    def tuning_plan(self, options: MergeOptions, stop: str, fit_images: int | None = None,
                    available: int | None = None, widths: dict[str, int] | None = None) -> TuningPlan:
        """What tuning may score at ``stop`` (its spaces of ``widths`` widened: each candidate costs
        the sized model's forward), from multiply-accumulates: a budget that grows with the
        calibration pass, held-out images first (the evidence against permute), then search."""
        fit = len(self.stream) if fit_images is None else fit_images
        return plan_tuning(tuning_budget(fit * self.source_macs), self.source_macs, self.merged_macs(stop, widths),
                           HOLDOUT if available is None else available,
                           screened_count(candidate_settings(len(self.sources), options.alpha, options.beta)),
                           compare=options.method == AUTO)
