"""The options -> the point to merge at: what the options leave open is chosen on held-out images.

Where the options fix everything, the point is theirs. Otherwise each candidate setting is
assembled from the calibration's correlations, its BatchNorm reset on the calibration's BatchNorm
images, and scored against the sources on held-out images within the tuning budget
(``tuning.tune``); for ``auto``, zipit's best then meets permute (``tuning.MethodChoice``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .assembly import match, widths_of, zipped_state
from .bn import reset_batchnorm
from .calibration import HOLDOUT, MIN_HOLDOUT
from .measured import Calibration
from .methods import Match
from .options import AUTO, MergeOptions, MergePoint
from .sizing import allocate
from .tuning import MethodChoice, Setting, TuningResult, candidate_settings, tune


@dataclass
class Decision:
    """The point to merge at, and the evidence behind it (None where nothing was chosen)."""

    point: MergePoint
    tuning: TuningResult | None = None
    choice: MethodChoice | None = None      # auto's choice between zipit and permute
    seconds: float | None = None            # the time tuning took, where it scored anything


def candidate(cal: Calibration, stop: str, matches: dict[str, Match], bn_images: torch.Tensor | None):
    """A tuning candidate: its tensors zipped along ``matches``, BatchNorm reset on ``bn_images``,
    run through the stop's template in eval mode."""
    template = cal.template(stop, widths_of(cal, matches))
    template.load_state_dict(zipped_state(cal, stop, matches))
    if cal.options.reset_bn and bn_images is not None:
        reset_batchnorm(template, [bn_images], cal.options.device)
    state = {k: v.clone() for k, v in template.state_dict().items()}
    return lambda x, rows=None: torch.func.functional_call(template.eval(), state, (x,), {"rows": rows})


def reads(cal: Calibration, options: MergeOptions) -> str:
    """The method whose correlations the merge of ``options`` will read: the matching searched, but
    permute where auto must choose it before any image is read (no held-out image can be scored
    within the tuning budget, or none was held out), so that the calibration measures only what
    permute reads."""
    if options.method == AUTO and (cal.over_budget or not cal.held_files):
        return "permute"
    return options.matching


def decide(cal: Calibration, options: MergeOptions) -> Decision:
    """The point for ``options``: theirs where they fix everything; else the best setting within the
    tuning budget on held-out images, and for auto, zipit's best only if the held-out evidence that
    it beats permute exceeds its noise, else permute (the simpler)."""
    o, stop = options, options.stop or cal.spec.default_stop
    extra = tuple(sorted(o.params.items()))
    widths = dict(allocate(cal, stop, o.size).widths) if o.size is not None else {}    # one set for every candidate
    point = lambda setting, method: MergePoint(stop, method, setting, o.refit, o.dtype, extra,   # noqa: E731
                                               tuple(widths.items()), o.size)
    if not o.tunes:
        return Decision(point(o.fixed_setting, o.method))
    t = time.perf_counter()
    settings = candidate_settings(len(cal.sources), o.alpha, o.beta)
    plan = cal.tuning_plan(o, stop, available=HOLDOUT if cal.over_budget else len(cal.held_files), widths=widths)
    held = cal.held_out(plan.looks[0]) if plan.held else None      # the rest only if the comparison needs it
    more = lambda: cal.held_out(plan.held)                          # noqa: E731
    if held is not None and len(held.images) < plan.looks[0]:       # some were unreadable
        plan = cal.tuning_plan(o, stop, available=len(held.images), widths=widths)
        held = held.first(plan.held) if plan.held else None
        more = lambda: held                                          # noqa: E731
    if held is None and cal.held_files and plan.held:
        cal.report.warn(f"fewer than {MIN_HOLDOUT} held-out images could be read; using "
                        + ("permute" if o.method == AUTO else
                           f"alpha {o.fixed_setting.alpha:g}, beta {o.fixed_setting.beta:g}"))

    def prepare(setting: Setting):
        """(key of the setting's matching, builder of its candidate) for ``tuning.search``."""
        matches = match(cal, stop, o.matching, setting, extra, widths)
        return tuple(m.key() for m in matches.values()), lambda: candidate(cal, stop, matches, cal.bn_subset())

    permute = ((lambda: candidate(cal, stop, match(cal, stop, "permute", o.fixed_setting, (), widths),
                                  cal.bn_subset()))
               if o.method == AUTO else None)
    tuning = tune(prepare, held, settings, o.fixed_setting, plan, cal.report, permute, cal.ranks, more)
    seconds = time.perf_counter() - t if tuning.trials or tuning.choice else None
    if o.method != AUTO:
        return Decision(point(tuning.chosen, o.method), tuning, None, seconds)
    choice = tuning.choice or MethodChoice.without_evidence(tuning.chosen, tuning.reason)
    return Decision(point(tuning.chosen, choice.method), tuning, choice, seconds)
