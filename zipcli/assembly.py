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
from .zip import Zipper


def match(cal: Calibration, stop: str, method: str, setting: Setting,
          params: tuple[tuple[str, float], ...] = ()) -> dict[str, Match]:
    """Match every space merged at ``stop`` with ``method``, ``setting`` (zipit's alpha and beta)
    and ``params`` (the method's other parameters; those it does not take are not passed)."""
    n, plan = len(cal.sources), cal.plan(stop)
    if methods.get(method).needs_correlation:
        missing = [name for name in plan.merged_spaces if name not in cal.correlations]
        if missing:     # a caller's mistake (nothing measured, or a deeper stop than measured): never guess
            raise RuntimeError(f"space {missing[0]!r} has no correlation: measure the calibration at stop "
                               f"{stop!r} (or a deeper one) before matching with a method that needs correlations")
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
    return {name: found[name] if name in found else methods.match(method, corr[name], n, **values)
            for name in plan.merged_spaces}


def zipped_state(cal: Calibration, stop: str, matches: dict[str, Match]) -> dict[str, torch.Tensor]:
    """The merged model's tensors along ``matches``, by their names in ``MergedModel``."""
    zipper = Zipper(cal.graph, cal.plan(stop), matches)
    template = cal.template(stop)
    state = {f"trunk.{k}": v for k, v in zipper.trunk(list(template.trunk.state_dict()), cal.states).items()}
    for i, head in enumerate(template.head_modules):
        state.update({f"head_modules.{i}.{k}": v
                      for k, v in zipper.head(list(head.state_dict()), cal.states[i], i).items()})
    return state


def build(cal: Calibration, stop: str, matches: dict[str, Match]) -> MergedModel:
    """A new model at ``stop`` with the sources zipped along ``matches`` (no BatchNorm reset)."""
    device = cal.options.device
    model = skeleton(cal.spec, stop, cal.heads(stop))
    model.load_state_dict(zipped_state(cal, stop, matches))
    return run_layout(model.to(device), device)
