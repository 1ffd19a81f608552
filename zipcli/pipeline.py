"""merge(): every stage of ZipIt! in order, as the paper describes it.

check inputs (before any image is read) -> stream calibration images through all
models and collect correlations -> (choose alpha and beta on held-out images) ->
match each feature space -> zip weights and build heads -> reset BatchNorm ->
metadata. Nothing here prints: progress and warnings go to an optional reporter,
so the CLI and library users share one code path.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import torch

from .bn import reset_batchnorm
from .calibration import HOLDOUT, MIN_HOLDOUT, ImageStream, list_images, sample_images, split_holdout
from .card import card_files
from .checkpoints import load_sources, run_layout
from .correlation import collect_correlations, sum_over_ranks
from .distributed import SINGLE, Ranks
from .errors import CalibrationError, ZipitError
from . import methods
from .methods import Match
from .merged import HeadInfo, MergedModel, merge_metadata, save_merged, skeleton
from .refit import REFITS, affordable_images, refit
from .report import LoggingReporter, Reporter
from .specs.format import OUTPUT_STOP, Spec
from .specs.graph import ModelGraph
from .macs import count_macs
from .tuning import (FALLBACK, HeldOut, MethodChoice, Setting, TuningPlan, TuningResult, candidate_settings,
                     BN_IMAGES, plan_tuning, screened_count, tune, tuning_budget)
from .zip import Zipper

AUTO = "auto"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class MergeOptions:
    """How to merge; defaults follow the paper and its data-usage appendix. Each field is also a
    ``zipit merge`` option of the same name (``num_calib`` is ``--num-calib``)."""

    method: str = "auto"         # auto: permute, unless zipit is better by more than the score's noise
    alpha: float | None = None   # zipit: weight of a merged feature's correlations (repeated matching); None: tune
    beta: float | None = None    # zipit: share of merges allowed within one model; None: tune
    stop: str | None = None      # None: the spec's default (everything but the classifiers)
    num_calib: int = 512         # calibration images (the paper: a few hundred suffice)
    seed: int = 0
    batch_size: int = 64
    augment: bool = False
    reset_bn: bool = True
    refit: str = "none"          # lsq: solve each merged layer's weights against the sources' outputs
    device: str = "cpu"
    dtype: str | None = None     # output dtype; None keeps the first checkpoint's
    classes: list[list[str]] | None = None  # per checkpoint, overrides sidecars

    @property
    def tunes(self) -> bool:
        """Something is chosen on held-out calibration images: the method (auto), or a tunable
        parameter of the method left open (zipit's alpha or beta)."""
        open_params = {"alpha": self.alpha, "beta": self.beta}
        return self.method == AUTO or any(open_params.get(p, 0) is None for p in methods.get(self.method).tunable)

    @property
    def matching(self) -> str:
        """The matching method of the settings searched: zipit's, for auto."""
        return "zipit" if self.method == AUTO else self.method

    @property
    def fixed_setting(self) -> Setting:
        """The given alpha and beta, the paper's values where one is left open."""
        return Setting(FALLBACK[0] if self.alpha is None else self.alpha,
                       FALLBACK[1] if self.beta is None else self.beta)

    def validate(self, n_models: int) -> None:
        if self.method not in (AUTO, *methods.REGISTRY):
            raise ZipitError(f"unknown method {self.method!r}",
                             f"valid methods (--method): {AUTO}, {', '.join(methods.REGISTRY)}")
        methods.get(self.matching).check({"alpha": self.alpha, "beta": self.beta}, n_models)
        for name, value in (("num_calib", self.num_calib), ("batch_size", self.batch_size)):
            if value < 1:
                raise ZipitError(f"{name} {value} must be at least 1", f"set {name} (--{name.replace('_', '-')}) to 1 or more")
        if self.refit not in REFITS:
            raise ZipitError(f"unknown refit {self.refit!r}", f"valid refits (--refit): {', '.join(REFITS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ZipitError(f"unknown dtype {self.dtype!r}", f"valid dtypes (--dtype): {', '.join(DTYPES)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ZipitError("device cuda was asked for but no CUDA device is available", "use device (--device) cpu")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ZipitError(f"unknown device {self.device!r}", "valid devices (--device): cpu, cuda, cuda:N")


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


def merge(checkpoints: list[str | Path], spec: Spec, calib: str | Path, options: MergeOptions | None = None,
          report: Reporter | None = None, ranks: Ranks = SINGLE) -> MergeResult:
    """Merge two or more checkpoints of one architecture into a multi-head model (no printing).
    Under torchrun, pass ``ranks=zipcli.distributed.ranks_from_env(device)``: every rank calls
    this and gets the same result; let rank 0 alone save it."""
    job = MergeJob(checkpoints, spec, calib, options, report, ranks=ranks)
    job.calibrate()
    return job.finish(*job.choose())


class MergeJob:
    """One merge, stage by stage: load and check -> calibrate -> (tune) -> match, zip, BN reset.

    ``merge()`` runs the stages in order. They are separate so that a tuning
    study can score many settings on one set of correlations.
    """

    def __init__(self, checkpoints: list[str | Path], spec: Spec, calib: str | Path,
                 options: MergeOptions | None = None, report: Reporter | None = None,
                 hold_out: bool | None = None, ranks: Ranks = SINGLE):
        """``hold_out``: keep held-out images for label-free scoring (default: when the options tune).
        ``ranks``: this process's place in a distributed merge (``distributed.ranks_from_env``)."""
        self.options = options = options or MergeOptions()
        self.report = report or LoggingReporter()
        self.ranks = ranks
        ranks.together(lambda: self._setup(checkpoints, spec, calib, hold_out))

    def _setup(self, checkpoints, spec: Spec, calib, hold_out: bool | None) -> None:
        options, report, ranks = self.options, self.report, self.ranks
        options.validate(len(checkpoints))
        t0 = time.perf_counter()
        self.spec, self.calib, self.timings = spec, calib, {}
        self.sources = load_sources(list(checkpoints), spec, options.classes, options.device)
        self.graph = ModelGraph(spec, self.sources[0].model)
        self._warn_unnamed_classes()
        self.use_stop(options.stop or spec.default_stop)
        all_files = list_images(calib)
        stream = ImageStream(sample_images(all_files, options.num_calib, options.seed), spec.input,
                             options.batch_size, options.augment, options.seed)
        if len(stream) < options.num_calib:
            report.warn(f"{calib} holds {len(stream)} images, fewer than the {options.num_calib} asked for "
                        "(num_calib, --num-calib): using all of them")
        self.held_files: list[Path] = []
        self._over_budget = False
        self._templates: dict[str, tuple[MergedModel, int]] = {}
        self.source_macs = sum(count_macs(s.model, spec.input.size) for s in self.sources)
        if options.tunes if hold_out is None else hold_out:
            limit = self.plan_tuning(len(stream)).held if hold_out is None else None   # what tuning can afford
            self._over_budget = limit == 0
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
        self.shard = stream.with_files(ranks.shard(stream.files, options.batch_size))   # what this rank reads
        batches = -(-len(stream) // options.batch_size)
        if ranks.many and batches < ranks.world:
            raise CalibrationError(f"{len(stream)} calibration images make {batches} batches of {options.batch_size}, "
                                   f"too few for {ranks.world} processes (each needs one)",
                                   "use fewer processes, or a smaller batch size (batch_size, --batch-size)")
        self._warned_skips = 0
        self.states = [{k: v.detach().cpu().contiguous() for k, v in s.model.state_dict().items()}
                       for s in self.sources]
        self.correlations: dict[str, np.ndarray] = {}
        self._held: HeldOut | None = None          # every held-out image read so far, in file order
        self._held_files_read = 0                  # held-out files read (or found unreadable) so far
        self._held_unreadable: set[Path] = set()
        self._bn_images: torch.Tensor | None = None
        self.images_read = False
        self.tuning: TuningResult | None = None
        self.choice: MethodChoice | None = None
        self.timings["load"] = time.perf_counter() - t0

    def use_stop(self, stop: str) -> None:
        """Cut the trunk after ``stop`` from now on. Correlations measured for a deeper stop serve a
        shallower one: a space's correlation does not depend on where the trunk is cut."""
        self.stop, self.plan = stop, self.graph.plan(stop)
        if stop == OUTPUT_STOP and any(s.classes != self.sources[0].classes for s in self.sources):
            raise ZipitError("stop 'output' merges the classifiers, which needs identical classes in every model",
                             f"use a stage stop ({', '.join(self.spec.stops)}) for models with different classes")
        self.heads = ([HeadInfo("merged", self.sources[0].classes, ",".join(s.checkpoint.name for s in self.sources))]
                      if stop == OUTPUT_STOP else
                      [HeadInfo(s.checkpoint.name, s.classes, s.checkpoint.path.name) for s in self.sources])

    def _warn_unnamed_classes(self) -> None:
        unnamed = [s.checkpoint.path.name for s in self.sources
                   if not self.options.classes and s.checkpoint.classes is None]
        if unnamed:
            self.report.warn(f"{', '.join(unnamed)}: no class names, heads get class_0, class_1, ... (zipit eval "
                             "matches class folders by name); name them with classes (--classes a,b,...) once per "
                             'checkpoint, or a JSON sidecar {"classes": [...]} beside each (a.pt -> a.json)')

    def _warn_skipped(self) -> None:
        """One warning per pass that found unreadable images."""
        skipped = self.shard.skipped
        if len(skipped) > self._warned_skips:
            first = skipped[self._warned_skips]
            self.report.warn(f"skipped {len(skipped) - self._warned_skips} unreadable image(s), "
                             f"e.g. {first[0]}: {first[1]}")
            self._warned_skips = len(skipped)

    def calibrate(self) -> None:
        """Stream the (fit) calibration images once through every model: one correlation per space.
        Plain averaging needs no correlations: its images are read by the BatchNorm reset only."""
        t = time.perf_counter()
        if methods.get(self.options.matching).needs_correlation:
            acc = self.ranks.together(lambda: collect_correlations(
                [s.model for s in self.sources], self.spec, self.plan, self.shard, self.options.device, self.report))
            sum_over_ranks(acc, self.plan.merged_spaces, self.ranks)
            self.correlations = {name: acc.pop(name).correlation().cpu().numpy() for name in self.plan.merged_spaces}
            self.images_read = True
            self._warn_skipped()
        self.timings["calibration"] = time.perf_counter() - t

    def match(self, setting: Setting, method: str | None = None) -> dict[str, Match]:
        """Match every merged space with ``method`` (default: the options') and ``setting``."""
        n, method = len(self.sources), method or self.options.matching
        if methods.get(method).needs_correlation:
            missing = [name for name in self.plan.merged_spaces if name not in self.correlations]
            if missing:     # a caller's mistake (no calibrate(), or a deeper stop than calibrated): never guess
                raise RuntimeError(f"space {missing[0]!r} has no correlation: calibrate() at stop {self.stop!r} "
                                   "(or a deeper one) before matching with a method that needs correlations")
        return {name: methods.match(method, self.correlations.get(name, np.eye(n * self.graph.space_size[name])),
                                    n, alpha=setting.alpha, beta=setting.beta)
                for name in self.plan.merged_spaces}

    def build(self, matches: dict[str, Match]) -> MergedModel:
        """Zip the sources into a new model along ``matches`` (no BN reset)."""
        model = skeleton(self.spec, self.stop, self.heads)
        model.load_state_dict(self.zipped_state(matches))
        return run_layout(model.to(self.options.device), self.options.device)

    def zipped_state(self, matches: dict[str, Match]) -> dict[str, torch.Tensor]:
        """The merged model's tensors along ``matches``, by their names in ``MergedModel``."""
        zipper = Zipper(self.graph, self.plan, matches)
        template = self.template()
        state = {f"trunk.{k}": v for k, v in zipper.trunk(list(template.trunk.state_dict()), self.states).items()}
        for i, head in enumerate(template.head_modules):
            state.update({f"head_modules.{i}.{k}": v
                          for k, v in zipper.head(list(head.state_dict()), self.states[i], i).items()})
        return state

    def template(self) -> MergedModel:
        """This stop's merged model, built once: tuning candidates are tensors run through it
        (building a model runs its initialisers, which costs more than scoring a candidate)."""
        if self.stop not in self._templates:
            model = run_layout(skeleton(self.spec, self.stop, self.heads).to(self.options.device), self.options.device)
            self._templates[self.stop] = model, count_macs(model, self.spec.input.size)
        return self._templates[self.stop][0]

    def merged_macs(self) -> int:
        """Multiply-accumulates of the merged model at this stop, per image."""
        self.template()
        return self._templates[self.stop][1]

    def scorer(self, matches: dict[str, Match], bn_images: torch.Tensor | None):
        """A tuning candidate: its tensors zipped along ``matches``, BatchNorm reset on ``bn_images``,
        run through the template in eval mode."""
        template = self.template()
        template.load_state_dict(self.zipped_state(matches))
        if self.options.reset_bn and bn_images is not None:
            reset_batchnorm(template, [bn_images], self.options.device)
        state = {k: v.clone() for k, v in template.state_dict().items()}
        return lambda x, rows=None: torch.func.functional_call(template.eval(), state, (x,), {"rows": rows})

    def bn_subset(self) -> torch.Tensor:
        """The fit images each tuning candidate's BatchNorm is reset on."""
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

    def plan_tuning(self, fit_images: int | None = None, available: int | None = None) -> TuningPlan:
        """What tuning may score at this stop, from multiply-accumulates: a budget that grows with
        the calibration pass, held-out images first (the evidence against permute), then search."""
        o = self.options
        fit = len(self.stream) if fit_images is None else fit_images
        return plan_tuning(tuning_budget(fit * self.source_macs), self.source_macs, self.merged_macs(),
                           HOLDOUT if available is None else available,
                           screened_count(candidate_settings(len(self.sources), o.alpha, o.beta)),
                           compare=o.method == AUTO)

    def prepare(self, setting: Setting):
        """(key of the setting's matching, builder of its candidate) for ``tuning.search``."""
        matches = self.match(setting)
        key = tuple(m.key() for m in matches.values())
        return key, lambda: self.scorer(matches, self.bn_subset())

    def choose(self) -> tuple[Setting, str]:
        """(setting, method) to merge with: the options', or where they leave something open, the best
        within the tuning budget on held-out images; for auto, zipit's best only if the held-out
        evidence that it beats permute exceeds its noise, else permute (the simpler)."""
        o = self.options
        self.timings.pop("tuning", None)          # an earlier point's tuning is not this one's
        if not o.tunes:
            return o.fixed_setting, o.method
        t = time.perf_counter()
        settings = candidate_settings(len(self.sources), o.alpha, o.beta)
        plan = self.plan_tuning(available=HOLDOUT if self._over_budget else len(self.held_files))
        held = self.held_out(plan.looks[0]) if plan.held else None     # the rest only if the comparison needs it
        more = lambda: self.held_out(plan.held)                        # noqa: E731
        if held is not None and len(held.images) < plan.looks[0]:      # some were unreadable
            plan = self.plan_tuning(available=len(held.images))
            held = held.first(plan.held) if plan.held else None
            more = lambda: held                                         # noqa: E731
        if held is None and self.held_files and plan.held:
            self.report.warn(f"fewer than {MIN_HOLDOUT} held-out images could be read; using "
                             + ("permute" if o.method == AUTO else
                                f"alpha {o.fixed_setting.alpha:g}, beta {o.fixed_setting.beta:g}"))
        permute = (lambda: self.scorer(self.match(o.fixed_setting, "permute"), self.bn_subset())) if o.method == AUTO else None
        self.tuning = tune(self.prepare, held, settings, o.fixed_setting, plan,
                           self.report, permute, self.ranks, more)
        if self.tuning.trials or self.tuning.choice:
            self.timings["tuning"] = time.perf_counter() - t
        if o.method != AUTO:
            return self.tuning.chosen, o.method
        self.choice = self.tuning.choice or MethodChoice.without_evidence(self.tuning.chosen, self.tuning.reason)
        return self.tuning.chosen, self.choice.method

    def finish(self, setting: Setting, method: str | None = None) -> MergeResult:
        """The final merge with ``method`` (default: the options') and ``setting``: match, zip,
        BatchNorm reset on every fit image, metadata."""
        o, report = self.options, self.report
        method = method or o.matching
        t = time.perf_counter()
        matches = self.match(setting, method)
        model = self.build(matches)
        spaces = [self._space_summary(name, matches[name]) for name in self.plan.merged_spaces]
        for s in spaces:
            if s["budget_lifted"]:
                report.warn(f"space {s['space']}: zipit could not finish within the beta budget and lifted it")
        self.timings["matching+zip"] = time.perf_counter() - t

        refitted = self._refit(model, matches) if o.refit != "none" else None

        t = time.perf_counter()
        if o.reset_bn:
            report.start("batchnorm reset", self.shard.readable)
            try:
                reset_batchnorm(model, self.shard.batches(), o.device, on_batch=report.advance, ranks=self.ranks)
            finally:
                report.done()
            self.images_read = True
            self._warn_skipped()
        self.timings["batchnorm"] = time.perf_counter() - t

        dtype = o.dtype or next(k for k, v in DTYPES.items() if v == self.sources[0].checkpoint.dtype)
        params: dict[str, object] = {p: getattr(setting, p) for p in methods.get(method).params if hasattr(setting, p)}
        if self.tuning is not None and methods.get(method).needs_correlation:
            params["tuning"] = self.tuning.to_metadata()
        if o.method == AUTO and self.choice is not None:
            params["choice"] = self.choice.to_metadata()
        if refitted is not None:
            params["refit"] = refitted
        readable, skipped = self.shard.readable, len(self.shard.skipped)
        if self.ranks.many:     # every rank read its own shard
            readable, skipped = map(int, self.ranks.sum(torch.tensor([readable, skipped])).tolist())
        calibration = {"folder": str(self.calib), "num_images": readable if self.images_read else 0,
                       "held_out": self.held_count, "requested": o.num_calib, "seed": o.seed,
                       "augment": o.augment, "batch_size": o.batch_size, "reset_bn": o.reset_bn,
                       "skipped": skipped}
        sources = [{"file": s.checkpoint.path.name, "sha256": s.checkpoint.sha256, "classes": s.classes}
                   for s in self.sources]
        if self.ranks.many:
            self.timings["collectives"] = self.ranks.waited
        model.metadata = merge_metadata(spec=self.spec, stop=self.stop, method=method, params=params,
                                        calibration=calibration, sources=sources, heads=self.heads, spaces=spaces,
                                        dtype=dtype)
        return MergeResult(model.eval(), model.metadata, dict(self.timings))   # a copy: later merges go on

    def _refit(self, model: MergedModel, matches: dict[str, Match]) -> dict:
        """The refit, in place, on as many fit images as its memory allows; its facts for the file."""
        o, t = self.options, time.perf_counter()
        most = affordable_images(self.sources[0].model, self.spec.input.size, len(self.sources))
        images = self.ranks.together(lambda: self.shard.first(most).to(o.device))
        facts = refit(model, [s.model for s in self.sources], self.graph, self.plan, matches, images,
                      o.reset_bn, o.seed, self.report, self.ranks)
        self.images_read = True
        self.timings["refit"] = time.perf_counter() - t
        return facts

    def _space_summary(self, name: str, m: Match) -> dict:
        """Per-space facts for the file: how well the merged features agree, how many merges stayed
        within one model, whether zipit had to lift its budget."""
        corr = self.correlations.get(name)
        mean_corr = None if corr is None else m.mean_merged_correlation(corr)
        return {"space": name, "size": self.graph.space_size[name],
                "mean_corr": None if mean_corr is None else round(mean_corr, 6),
                "within_share": round(m.within_merges / m.total_merges, 6) if m.total_merges else 0.0,
                "budget_lifted": m.budget_lifted}
