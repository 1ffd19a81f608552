"""``zipit specs check``: everything that can be verified about a spec without data.

The permutation self-check (wrong members change the outputs), coverage against
tracing (missing or misplaced members), and the observe points (each must see
its space's channels). A spec that passes all three merges what it claims to.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SpecError
from .builders import build, check_num_classes_arg
from .coverage import coverage
from .format import Spec
from .graph import ModelGraph, observed_channels
from .selfcheck import randomize_per_channel, randomize_spec_tensors, self_check
from .tracing import build_and_trace

SELF_CHECK_TOLERANCE = 1e-4   # relative change of the outputs; float32 rounding is about 1e-6


@dataclass
class SpecCheck:
    spec: str
    builder: str
    size: int
    spaces: int
    self_check: float                      # largest relative change of the outputs under permutation
    problems: list[str] = field(default_factory=list)
    tensors: int = 0
    in_spaces: int = 0
    outside: list[str] = field(default_factory=list)        # layers with tensors in no feature space ...
    outside_why: dict[str, str] = field(default_factory=dict)  # ... and why that is fine (or not)

    @property
    def passed(self) -> bool:
        return self.self_check <= SELF_CHECK_TOLERANCE and not self.problems


def check_spec(spec: Spec, builder: str | None = None, kwargs: dict | None = None, size: int | None = None,
               seed: int = 0) -> SpecCheck:
    """Build the model (the spec's builder, or another one), then self-check, cover and observe."""
    builder = builder or spec.builder
    kwargs = {**spec.kwargs, **(kwargs or {})}
    size = size or spec.input.size
    shape = (spec.input.shape[0], size, size)
    torch.manual_seed(seed)
    model = build(builder, kwargs)
    check_num_classes_arg(builder, spec.num_classes_arg)
    randomize_per_channel(model, seed)
    graph = ModelGraph(spec, model)
    try:
        _, traced = build_and_trace(builder, kwargs, shape)
    except SpecError as exc:
        raise SpecError(f"coverage cannot be checked: {exc.message}", exc.hint) from None
    randomize_spec_tensors(graph, traced, seed)
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    observe_problems = _check_observe_points(graph, example)
    error = self_check(graph, example, seed)
    cov = coverage(graph, traced)
    problems = observe_problems + cov.problems
    if error > SELF_CHECK_TOLERANCE:
        problems.insert(0, f"permuting every space changes the outputs by {error:.2g} (relative): some member is "
                           "in the wrong space or missing")
    return SpecCheck(spec.name, builder, size, len(spec.spaces), error, problems, cov.tensors, cov.in_spaces,
                     cov.outside, {m: _why_outside(graph, m) for m in cov.outside})


@torch.no_grad()
def _check_observe_points(graph: ModelGraph, example: torch.Tensor) -> list[str]:
    """Run the model once; each observe point's input (or output) must hold its space's channels."""
    problems, handles = [], []
    modules = graph.modules
    for space in graph.spec.spaces:
        def check(x, space=space):
            if observed_channels(x, space.observe, graph.space_size[space.name], space.observe_axis) is None:
                problems.append(f"space {space.name} is observed at {space.observe}, whose "
                                f"{'output' if space.observe.output else 'input'} {tuple(x.shape)} does not hold "
                                f"its {graph.space_size[space.name]} channels on axis {space.observe_axis}")
        module = modules[space.observe.module]
        if space.observe.output:
            handles.append(module.register_forward_hook(lambda _m, _args, out, check=check: check(out)))
        else:
            handles.append(module.register_forward_pre_hook(lambda _m, args, check=check: check(args[0])))
    try:
        graph.model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return problems


def _why_outside(graph: ModelGraph, module: str) -> str:
    """Why a layer's tensors belong to no feature space: fine for classifiers (kept per model) and for
    layers the forward pass never calls (auxiliary heads used only in training, which merge drops)."""
    if module in graph.spec.classifiers:
        return "classifier, kept per model"
    if module not in graph.calls:
        return "not called by the model's forward pass (e.g. a training-only auxiliary head)"
    return "in no feature space"
