"""merge(): every stage of ZipIt! in order, as the paper describes it.

check inputs (before any image is read) -> stream calibration images through all
models and collect correlations -> match each feature space -> zip weights and
build heads -> reset BatchNorm -> metadata. Nothing here prints: progress goes
to an optional reporter, so the CLI and library users share one code path.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from . import __version__
from .bn import reset_batchnorm
from .calibration import ImageStream, list_images, sample_images
from .checkpoints import Checkpoint, check_against, load_checkpoint
from .correlation import CorrelationAccumulator
from .errors import CalibrationError, MergeError, ZipitError
from .graph import ModelGraph, StopPlan, observed_channels
from .matching import METHODS, Match, match
from .merged import FORMAT, HeadInfo, MergedModel, build_model, save_merged, skeleton
from .specs import OUTPUT_STOP, Space, Spec
from .tuning import (FALLBACK, MAX_BN_IMAGES, MIN_HOLDOUT, HeldOut, Setting, TuningResult, candidate_settings,
                     search, split_holdout)
from .zip import Zipper

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class Reporter(Protocol):
    def start(self, phase: str, total: int | None = None) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def done(self) -> None: ...
    def warn(self, message: str) -> None: ...
    def info(self, message: str) -> None: ...


class SilentReporter:
    def start(self, phase, total=None): pass
    def advance(self, n=1): pass
    def done(self): pass
    def warn(self, message): pass
    def info(self, message): pass


@dataclass
class MergeOptions:
    """How to merge; defaults follow the paper and its data-usage appendix."""

    method: str = "zipit"
    alpha: float | None = None   # zipit: weight of a merged feature's correlations (repeated matching); None: tune
    beta: float | None = None    # zipit: share of merges allowed within one model; None: tune
    stop: str | None = None      # None: the spec's default (everything but the classifiers)
    num_calib: int = 512         # calibration images (the paper: a few hundred suffice)
    seed: int = 0
    batch_size: int = 64
    augment: bool = False
    reset_bn: bool = True
    device: str = "cpu"
    dtype: str | None = None     # output dtype; None keeps the first checkpoint's
    classes: list[list[str]] | None = None  # per checkpoint, overrides sidecars

    @property
    def tunes(self) -> bool:
        """zipit with alpha or beta left open: chosen on held-out calibration images."""
        return self.method == "zipit" and (self.alpha is None or self.beta is None)

    @property
    def alpha_or_fallback(self) -> float:
        return FALLBACK[0] if self.alpha is None else self.alpha

    @property
    def beta_or_fallback(self) -> float:
        return FALLBACK[1] if self.beta is None else self.beta

    def validate(self, n_models: int) -> None:
        if self.method not in METHODS:
            raise ZipitError(f"unknown --method {self.method!r}", f"valid: {', '.join(METHODS)}")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise ZipitError(f"--alpha {self.alpha} is out of range", "alpha must lie in [0, 1]")
        if self.beta is not None and not 0 <= self.beta <= 1:
            raise ZipitError(f"--beta {self.beta} is out of range", "beta must lie in [0, 1]")
        if self.method == "zipit" and self.alpha == 0 and n_models > 2:
            raise ZipitError("--alpha 0 cannot merge more than two models", "use an alpha in (0, 1], e.g. 0.3")
        if self.num_calib < 1:
            raise ZipitError(f"--num-calib {self.num_calib} must be at least 1")
        if self.batch_size < 1:
            raise ZipitError(f"--batch-size {self.batch_size} must be at least 1")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ZipitError(f"unknown --dtype {self.dtype!r}", f"valid: {', '.join(DTYPES)}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ZipitError("--device cuda was asked for but no CUDA device is available", "use --device cpu")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ZipitError(f"unknown --device {self.device!r}", "valid: cpu, cuda, cuda:N")


@dataclass
class MergeResult:
    model: MergedModel
    metadata: dict[str, object]
    timings: dict[str, float] = field(default_factory=dict)
    space_stats: list[dict] = field(default_factory=list)
    skipped_images: list[tuple[str, str]] = field(default_factory=list)

    def save(self, path: str | Path, force: bool = False) -> None:
        dtype = DTYPES[self.metadata["dtype"]]
        save_merged(self.model.to("cpu").to(dtype), self.metadata, Path(path), force=force)


@dataclass
class Source:
    checkpoint: Checkpoint
    classes: list[str]
    model: torch.nn.Module


def load_sources(paths: list[str | Path], spec: Spec, options: MergeOptions, min_models: int = 2) -> list[Source]:
    """Read every checkpoint and check it against the architecture before any image is read."""
    if len(paths) < min_models:
        raise ZipitError(f"merging needs at least two checkpoints, got {len(paths)}", "pass two or more files")
    if options.classes is not None and len(options.classes) != len(paths):
        given, n = len(options.classes), len(paths)
        raise ZipitError(f"--classes was given {'once' if given == 1 else f'{given} times'} for {n} "
                         f"checkpoint{'' if n == 1 else 's'}", "give it once per checkpoint, in order, or not at all")
    sources = []
    for i, path in enumerate(paths):
        ckpt = load_checkpoint(path)
        key = f"{spec.classifiers[0]}.weight"
        if key not in ckpt.state_dict or ckpt.state_dict[key].dim() < 2:
            raise ZipitError(f"{ckpt.path}: has no classifier weight {key!r}",
                             f"check --arch/--spec; this checkpoint does not look like {spec.name}")
        k = ckpt.state_dict[key].shape[0]
        model = build_model(spec, k)
        check_against(ckpt, model.state_dict())
        classes = (options.classes[i] if options.classes else None) or ckpt.classes or [f"class_{c}" for c in range(k)]
        if len(classes) != k:
            raise ZipitError(f"{ckpt.path}: {len(classes)} class names for a classifier with {k} outputs",
                             "fix --classes or the JSON sidecar")
        model.load_state_dict({n: t.float() if t.is_floating_point() else t for n, t in ckpt.state_dict.items()})
        sources.append(Source(ckpt, list(classes), model.float().eval().to(options.device)))
    names = [s.checkpoint.name for s in sources]
    if len(set(names)) != len(names):
        raise ZipitError("two checkpoints have the same file name", "rename them: heads are named after files")
    return sources


class _Enough(Exception):
    """Raised from a hook once every observed activation of a forward pass is in hand."""


CHUNK_BYTES = 256 * 2**20   # bound on the activations held for one chunk of images (all spaces, all models)


@torch.no_grad()
def collect_correlations(sources: list[Source], spec: Spec, plan: StopPlan, stream: ImageStream,
                         device: str, report: Reporter) -> dict[str, CorrelationAccumulator]:
    """Stream the images once through all models; one accumulator per merged space.

    Each batch is cut into chunks small enough that the observed activations of
    every space fit in ``CHUNK_BYTES``, so memory does not grow with the batch
    size or the number of images. Each model stops as soon as its last observed
    activation is in hand.
    """
    spaces = [spec.space(s) for s in plan.merged_spaces]
    observe: dict[str, list[Space]] = {}
    for s in spaces:
        observe.setdefault(s.observe.module, []).append(s)
    acc: dict[str, CorrelationAccumulator] = {}
    state = {"model": 0, "captured": 0, "chunk": 0}

    def hook_for(module_name):
        def hook(_module, args):
            for space in observe[module_name]:
                x = observed_channels(args[0], space.observe, plan.sizes[space.name])
                if x is None:
                    raise MergeError(f"space {space.name!r} is observed at {space.observe}, whose input "
                                     f"{tuple(args[0].shape)} does not hold its {plan.sizes[space.name]} channels",
                                     "fix the spec's observe point ('zipit specs check' tests it)")
                if space.name not in acc:
                    acc[space.name] = CorrelationAccumulator([x.shape[1]] * len(sources), device=device)
                if state["model"] == 0:
                    acc[space.name].begin(x.numel() // x.shape[1])
                acc[space.name].add_model(state["model"], x)
            state["captured"] += 1
            if state["captured"] == len(observe):
                raise _Enough
        return hook

    handles = []
    for src in sources:
        modules = dict(src.model.named_modules())
        handles += [modules[m].register_forward_pre_hook(hook_for(m)) for m in observe]
    chunk = None
    report.start("calibration", len(stream))
    try:
        for batch in stream.batches():
            batch = batch.to(device)
            start = 0
            while start < batch.shape[0]:
                size = chunk or 1
                x = batch[start:start + size]
                for i, src in enumerate(sources):
                    state["model"], state["captured"] = i, 0
                    try:
                        src.model(x)
                    except _Enough:
                        pass
                for name, a in acc.items():
                    if not a.end():
                        raise MergeError(f"activations of feature space {name!r} became NaN or Inf during "
                                         "calibration", "the checkpoints or images produce non-finite values; "
                                         "check their dtype and range")
                if chunk is None:  # size the chunks from what one image costs
                    per_image = sum(a.buffer.numel() * 4 for a in acc.values())
                    chunk = max(1, min(stream.batch_size, CHUNK_BYTES // max(per_image, 1)))
                start += size
                report.advance(x.shape[0])
    finally:
        for h in handles:
            h.remove()
        report.done()
    if not acc and spaces:
        raise CalibrationError(f"none of the {len(stream)} calibration images could be read",
                               "check the image files (see the warnings above)")
    return acc


def merge(checkpoints: list[str | Path], spec: Spec, calib: str | Path, options: MergeOptions | None = None,
          report: Reporter | None = None) -> MergeResult:
    """Merge two or more checkpoints of one architecture into a multi-head model (no printing)."""
    job = MergeJob(checkpoints, spec, calib, options, report)
    job.calibrate()
    return job.finish(job.choose_setting())


class MergeJob:
    """One merge, stage by stage: load and check -> calibrate -> (tune) -> match, zip, BN reset.

    ``merge()`` runs the stages in order. They are separate so that a tuning
    study can score many settings on one set of correlations.
    """

    def __init__(self, checkpoints: list[str | Path], spec: Spec, calib: str | Path,
                 options: MergeOptions | None = None, report: Reporter | None = None):
        self.options = options = options or MergeOptions()
        self.report = report = report or SilentReporter()
        options.validate(len(checkpoints))
        t0 = time.perf_counter()
        self.spec, self.calib, self.timings = spec, calib, {}
        self.sources = load_sources(list(checkpoints), spec, options)
        self.graph = ModelGraph(spec, self.sources[0].model)
        self.stop = options.stop or spec.default_stop
        self.plan = self.graph.plan(self.stop)
        unnamed = [s.checkpoint.path.name for s in self.sources if not options.classes and s.checkpoint.classes is None]
        if unnamed:
            report.warn(f"{', '.join(unnamed)}: no class names, heads get class_0, class_1, ... (zipit eval "
                        "matches class folders by name); name them with --classes a,b,... once per checkpoint, or "
                        'a JSON sidecar {"classes": [...]} beside each (a.pt -> a.json)')
        if self.stop == OUTPUT_STOP and any(s.classes != self.sources[0].classes for s in self.sources):
            raise ZipitError("--stop output merges the classifiers, which needs identical classes in every model",
                             f"use a stage stop ({', '.join(spec.stops)}) for models with different classes")
        all_files = list_images(calib)
        stream = ImageStream(sample_images(all_files, options.num_calib, options.seed), spec.input,
                             options.batch_size, options.augment, options.seed)
        if len(stream) < options.num_calib:
            report.warn(f"{calib} holds {len(stream)} images, fewer than --num-calib {options.num_calib}: "
                        "using all of them")
        self.held_files: list[Path] = []
        if options.tunes:
            fit_files, self.held_files = split_holdout(all_files, stream.files, options.seed)
            stream = _with_files(stream, fit_files)
            if not self.held_files:
                report.warn(f"only {len(stream)} calibration images: too few to hold any out for --alpha/--beta "
                            f"auto; using alpha {options.alpha_or_fallback:g}, beta {options.beta_or_fallback:g} "
                            f"(tuning needs {MIN_HOLDOUT} images beyond the sample, or --num-calib "
                            f"{4 * MIN_HOLDOUT} or more)")
        self.stream = stream
        self.heads = ([HeadInfo("merged", self.sources[0].classes, ",".join(s.checkpoint.name for s in self.sources))]
                      if self.stop == OUTPUT_STOP else
                      [HeadInfo(s.checkpoint.name, s.classes, s.checkpoint.path.name) for s in self.sources])
        self.states = [{k: v.detach().cpu() for k, v in s.model.state_dict().items()} for s in self.sources]
        self.correlations: dict[str, np.ndarray] = {}
        self.tuning: TuningResult | None = None
        self.timings["load"] = time.perf_counter() - t0

    def calibrate(self) -> None:
        """Stream the (fit) calibration images once through every model: one correlation per space."""
        t = time.perf_counter()
        if self.options.method != "average":
            acc = collect_correlations(self.sources, self.spec, self.plan, self.stream, self.options.device,
                                       self.report)
            self.correlations = {name: acc.pop(name).correlation().cpu().numpy() for name in self.plan.merged_spaces}
        if self.stream.skipped:
            first = self.stream.skipped[0]
            self.report.warn(f"skipped {len(self.stream.skipped)} unreadable image(s), e.g. {first[0]}: {first[1]}")
        self.timings["calibration"] = time.perf_counter() - t

    def match(self, setting: Setting) -> dict[str, Match]:
        """Match every merged space with ``setting``."""
        n = len(self.sources)
        return {name: match(self.options.method, self.correlations.get(name, np.eye(n * self.graph.space_size[name])),
                            n, setting.alpha, setting.beta)
                for name in self.plan.merged_spaces}

    def build(self, matches: dict[str, Match]) -> MergedModel:
        """Zip the sources into a new model along ``matches`` (no BN reset)."""
        model = skeleton(self.spec, self.stop, self.heads)
        zipper = Zipper(self.graph, self.plan, matches)
        model.trunk.load_state_dict(zipper.trunk(list(model.trunk.state_dict()), self.states))
        for i, head in enumerate(model.head_modules):
            head.load_state_dict(zipper.head(list(head.state_dict()), self.states[i], i))
        return model.to(self.options.device)

    def held_out(self) -> HeldOut | None:
        """The held-out images (never used for correlations) and the source models' logits on them;
        None if fewer than ``MIN_HOLDOUT`` of them could be read."""
        batches = list(_with_files(self.stream, self.held_files, augment=False).batches())
        if sum(len(b) for b in batches) < MIN_HOLDOUT:
            return None
        return HeldOut.from_sources(torch.cat(batches).to(self.options.device), [s.model for s in self.sources])

    def candidate(self, matches: dict[str, Match], bn_images: torch.Tensor | None) -> MergedModel:
        """A tuning candidate: built, with BatchNorm reset on a bounded subset of the fit images."""
        model = self.build(matches)
        if self.options.reset_bn and bn_images is not None:
            reset_batchnorm(model, [bn_images], self.options.device)
        return model

    def prepare(self, setting: Setting, bn_images: torch.Tensor | None):
        """(key of the setting's matching, builder of its candidate) for ``tuning.search``."""
        matches = self.match(setting)
        key = tuple(m.assign.tobytes() for m in matches.values())
        return key, lambda: self.candidate(matches, bn_images)

    def bn_subset(self) -> torch.Tensor:
        return _first_images(_augment_free(self.stream), MAX_BN_IMAGES).to(self.options.device)

    def choose_setting(self) -> Setting:
        """The options' alpha and beta, or, where left open, the best candidate on held-out images."""
        o = self.options
        fixed = Setting(o.alpha_or_fallback, o.beta_or_fallback)
        if not o.tunes:
            return fixed
        t = time.perf_counter()
        held = self.held_out() if self.held_files else None
        if held is None:
            if self.held_files:
                self.report.warn(f"fewer than {MIN_HOLDOUT} held-out images could be read; using alpha "
                                 f"{fixed.alpha:g}, beta {fixed.beta:g}")
            self.tuning = TuningResult([], fixed, 0, reason=f"too few readable calibration images to hold out "
                                       f"{MIN_HOLDOUT}")
            return fixed
        bn_images = self.bn_subset()
        settings = candidate_settings(len(self.sources), o.alpha, o.beta)
        self.report.start("tuning alpha/beta", len(settings))

        def show(trial):
            self.report.advance()
            self.report.info(f"  alpha {trial.setting.alpha:<5g} beta {trial.setting.beta:<7g} "
                             f"divergence {trial.score:.4f} ({trial.images} images)")

        try:
            self.tuning = search(lambda s: self.prepare(s, bn_images), held, settings, on_trial=show)
        finally:
            self.report.done()
        chosen = self.tuning.chosen
        for trial in self.tuning.trials:
            if trial.images == len(held.images) and trial.images > min(t.images for t in self.tuning.trials):
                self.report.info(f"  finalist alpha {trial.setting.alpha:<5g} beta {trial.setting.beta:<7g} "
                                 f"divergence {trial.score:.4f} ({trial.images} images)")
        self.report.info(f"chose alpha {chosen.alpha:g}, beta {chosen.beta:g} "
                         f"(lowest divergence from the sources on {len(held.images)} held-out calibration images)")
        self.timings["tuning"] = time.perf_counter() - t
        return chosen

    def finish(self, setting: Setting) -> MergeResult:
        """The final merge with ``setting``: match, zip, BatchNorm reset on every fit image, metadata."""
        o, report = self.options, self.report
        t = time.perf_counter()
        matches = self.match(setting)
        model = self.build(matches)
        stats = []
        for name in self.plan.merged_spaces:
            m, corr = matches[name], self.correlations.get(name)
            stats.append({"space": name, "size": self.graph.space_size[name],
                          "mean_corr": None if corr is None else round(m.mean_merged_correlation(corr), 6),
                          "within_share": round(m.within_merges / m.total_merges, 6) if m.total_merges else 0.0,
                          "budget_lifted": m.budget_lifted})
            if m.budget_lifted:
                report.warn(f"space {name}: zipit could not finish within the beta budget and lifted it")
        self.timings["matching+zip"] = time.perf_counter() - t

        t = time.perf_counter()
        stream = self.stream
        if o.reset_bn:
            report.start("batchnorm reset", len(stream) - len(stream.skipped))
            try:
                reset_batchnorm(model, _augment_free(stream).batches(), o.device, on_batch=report.advance)
            except ValueError:
                raise CalibrationError("no calibration image could be read for the BatchNorm reset",
                                       "check the image files") from None
            finally:
                report.done()
        self.timings["batchnorm"] = time.perf_counter() - t

        first_dtype = next(v.dtype for v in self.sources[0].checkpoint.state_dict.values() if v.is_floating_point())
        dtype = o.dtype or next(k for k, v in DTYPES.items() if v == first_dtype)
        params: dict[str, object] = {}
        if o.method == "zipit":
            params = {"alpha": setting.alpha, "beta": setting.beta}
            if self.tuning is not None:
                params["tuning"] = self.tuning.to_metadata()
        metadata = {
            "format": FORMAT,
            "zipit_version": __version__,
            "spec_name": self.spec.name,
            "spec": self.spec.text,
            "stop": self.stop,
            "method": o.method,
            "params": params,
            "calibration": {"folder": str(self.calib), "num_images": len(stream) - len(stream.skipped),
                            "held_out": len(self.held_files), "requested": o.num_calib, "seed": o.seed,
                            "augment": o.augment, "batch_size": o.batch_size, "reset_bn": o.reset_bn,
                            "skipped": len(stream.skipped)},
            "sources": [{"file": s.checkpoint.path.name, "sha256": s.checkpoint.sha256, "classes": s.classes}
                        for s in self.sources],
            "heads": [asdict(h) for h in self.heads],
            "spaces": stats,
            "dtype": dtype,
        }
        model.metadata = metadata
        return MergeResult(model.eval(), metadata, self.timings, stats,
                           [(str(p), why) for p, why in stream.skipped])


def _first_images(stream: ImageStream, n: int) -> torch.Tensor:
    taken = []
    for batch in stream.batches():
        taken.append(batch[: n - sum(len(b) for b in taken)])
        if sum(len(b) for b in taken) >= n:
            break
    return torch.cat(taken)


def _with_files(stream: ImageStream, files: list[Path], augment: bool | None = None) -> ImageStream:
    return ImageStream(list(files), stream.preprocess, stream.batch_size,
                       stream.augment if augment is None else augment, stream.seed, list(stream.skipped))


def _augment_free(stream: ImageStream) -> ImageStream:
    """BN statistics are measured on the same images, augmented the same way as calibration."""
    return ImageStream(stream.files, stream.preprocess, stream.batch_size, stream.augment, stream.seed,
                       list(stream.skipped))
