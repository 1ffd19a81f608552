"""From a calibration to a merged model at one stop: match every merged space, zip the sources'
tensors along the matches, and load them into a model (no BatchNorm reset, no refit).

Both the default's choice (each tuning candidate) and the final merge assemble models this way.
"""
from __future__ import annotations

import numpy as np
import torch

from . import methods
from .checkpoints import run_layout
from .heads import match_heads
from .measured import Calibration
from .merged import MergedModel, skeleton
from .methods import Match
from .tuning import Setting
from .errors import ZipitError
from .zip import Zipper, check_width


def match(cal: Calibration, stop: str, method: str, setting: Setting,
          params: tuple[tuple[str, float], ...] = (), widths: dict[str, int] | None = None) -> dict[str, Match]:
    """Match every space merged at ``stop`` with ``method``, ``setting`` (zipit's alpha and beta)
    and ``params`` (the method's other parameters; those it does not take are not passed), each
    space of ``widths`` at that merged width (the others at one model's)."""
    widths = widths or {}
    n, plan = len(cal.sources), cal.plan(stop)
    if methods.get(method).needs_correlation:
        missing = [name for name in plan.merged_spaces if name not in cal.correlations]
        if missing:     # a caller's mistake (nothing measured, or a deeper stop than measured): never guess
            raise RuntimeError(f"space {missing[0]!r} has no correlation: measure the calibration at stop "
                               f"{stop!r} (or a deeper one) before matching with a method that needs correlations")
    unknown = sorted(set(widths) - set(plan.merged_spaces))
    if unknown:
        raise ZipitError(f"space {unknown[0]!r} is not merged at stop {stop!r}",
                         f"merged spaces: {', '.join(plan.merged_spaces)}")
    cut = [s for s in widths if s in plan.cut_spaces and widths[s] != cal.graph.space_size[s]]
    if cut:
        raise ZipitError(f"stop {stop!r} lies inside space {cut[0]!r}: merging it at a size is not supported yet",
                         f"merge without --size, or at a stop after the last block ({cal.spec.stops[-1]})")
    for name, width in widths.items():
        check_width(cal.graph, name, width, n)
    values = {"alpha": setting.alpha, "beta": setting.beta, **dict(params)}
    corr = {name: cal.correlations.get(name, np.eye(n * cal.graph.space_size[name])) for name in plan.merged_spaces}
    tied: dict[str, list[str]] = {}     # attention: a query/key space and the value space that shares its heads
    for name in plan.merged_spaces:
        space = cal.spec.space(name)
        if space.heads is not None:
            tied.setdefault(space.heads_with or name, []).append(name)
    found = {}
    for names in tied.values():
        heads = cal.spec.space(names[0]).heads
        found.update(zip(names, match_heads([corr[s] for s in names], n, heads, method, **values)))
    return {name: found[name] if name in found else methods.match(method, corr[name], n, widths.get(name), **values)
            for name in plan.merged_spaces}


def widths_of(cal: Calibration, matches: dict[str, Match]) -> dict[str, int]:
    """The merged spaces wider than one model's, and their widths (empty for a full zip)."""
    return {s: m.size for s, m in matches.items() if m.size != cal.graph.space_size[s]}


def zipped_state(cal: Calibration, stop: str, matches: dict[str, Match]) -> dict[str, torch.Tensor]:
    """The merged model's tensors along ``matches``, by their names in ``MergedModel``."""
    zipper = Zipper(cal.graph, cal.plan(stop), matches)
    template = cal.template(stop, widths_of(cal, matches))
    state = {f"trunk.{k}": v for k, v in zipper.trunk(list(template.trunk.state_dict()), cal.states).items()}
    for i, head in enumerate(template.head_modules):
        state.update({f"head_modules.{i}.{k}": v
                      for k, v in zipper.head(list(head.state_dict()), cal.states[i], i).items()})
    return state


def build(cal: Calibration, stop: str, matches: dict[str, Match]) -> MergedModel:
    """A new model at ``stop`` with the sources zipped along ``matches`` (no BatchNorm reset)."""
    device = cal.options.device
    model = skeleton(cal.spec, stop, cal.heads(stop), widths_of(cal, matches))
    model.load_state_dict(zipped_state(cal, stop, matches))
    return run_layout(model.to(device), device)
