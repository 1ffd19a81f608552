"""Coverage: every parameter belongs to exactly the feature spaces it should.

The permutation self-check cannot see a layer that is in no space at all (nothing
of it is permuted, so nothing changes), yet merging would then average channels
that are not aligned. Coverage compares a spec with the spaces that tracing
derives from the model: the same members, grouped the same way. Names, observe
points and stops are the spec's own choice and are not compared.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import layers
from .format import Member
from .graph import ModelGraph

Key = tuple[str, str]  # ("writer" | "reader" | "parameter", canonical member or state-dict key)


@dataclass
class Coverage:
    problems: list[str] = field(default_factory=list)
    tensors: int = 0              # parameter and buffer tensors of the model's layers
    in_spaces: int = 0            # of them, in at least one feature space
    outside: list[str] = field(default_factory=list)  # layers in no space (classifiers, input layers)


def _canonical(graph: ModelGraph, member: Member, role: str, size: int) -> str:
    """``conv@0`` that covers all of ``conv``'s channels is the same member as ``conv``."""
    if member.whole:
        return member.module
    m = graph.modules[member.module]
    width = layers.out_channels(m) if role == "writer" else layers.in_channels(m)
    if member.start == 0 and member.block == 1 and width == size:
        return member.module
    return str(member)


def _groups(graph: ModelGraph, spaces: list[tuple[str, list[Member], list[Member], list[str]]],
            sizes: dict[str, int]) -> dict[Key, str]:
    group = {}
    for name, writers, readers, parameters in spaces:
        for role, members in (("writer", writers), ("reader", readers)):
            for m in members:
                group[(role, _canonical(graph, m, role, sizes[name]))] = name
        for key in parameters:
            group[("parameter", key)] = name
    return group


def coverage(graph: ModelGraph, traced: dict) -> Coverage:
    """Compare ``graph``'s spec with ``traced`` (from ``tracing.trace_spaces`` on the same model)."""
    result = Coverage()
    spec_spaces = [(s.name, list(s.writers), list(s.readers), list(s.parameters)) for s in graph.spec.spaces]
    actual = _groups(graph, spec_spaces, graph.space_size)
    traced_spaces = [(s["name"], s["writers"], s["readers"], s.get("parameters", [])) for s in traced["spaces"]]
    traced_sizes = {s["name"]: _traced_size(graph, s) for s in traced["spaces"]}
    expected = _groups(graph, traced_spaces, traced_sizes)

    for key, where in expected.items():
        if key not in actual:
            result.problems.append(f"{key[1]} ({key[0]}) is in no space; tracing puts it in the space it names {where}")
    for key, where in actual.items():
        if key not in expected:
            result.problems.append(f"space {where} lists {key[1]} as a {key[0]}, which belongs to no feature "
                                   "space (a classifier output, the model input, or not this module's channels)")
    _check_observe(graph, traced, actual, expected, result)
    _check_heads(graph, traced, actual, expected, result)
    for mapping, other, verb in ((expected, actual, "splits"), (actual, expected, "joins")):
        members: dict[str, set[str]] = {}
        for key, group in mapping.items():
            if key in other:
                members.setdefault(group, set()).add(other[key])
        for group, others in members.items():
            if len(others) > 1:
                names = ", ".join(sorted(others)[:3])
                if verb == "splits":
                    result.problems.append(f"the spec splits one feature space (traced as {group}) into {names}")
                else:
                    result.problems.append(f"space {group} joins channels that tracing keeps apart "
                                           f"(traced as {names})")
    _count_tensors(graph, result)
    return result


def _check_heads(graph: ModelGraph, traced: dict, actual: dict[Key, str], expected: dict[Key, str],
                 result: Coverage) -> None:
    """Attention heads as tracing finds them: the same number, tied to the same query/key space."""
    matched = {}   # spec space -> traced space
    for key, group in actual.items():
        if key in expected:
            matched.setdefault(group, expected[key])
    traced_by_name = {s["name"]: s for s in traced["spaces"]}
    spec_of = {t: s for s, t in matched.items()}
    for space in graph.spec.spaces:
        t = traced_by_name.get(matched.get(space.name))
        if t is None:
            continue
        if space.heads != t.get("heads"):
            result.problems.append(f"space {space.name} has heads {space.heads}; tracing finds {t.get('heads')} "
                                   "attention heads")
        want = spec_of.get(t.get("heads_with"), t.get("heads_with"))
        if space.heads_with != want:
            result.problems.append(f"space {space.name} has heads_with {space.heads_with}; tracing ties its heads to "
                                   f"{want}")


def _check_observe(graph: ModelGraph, traced: dict, actual: dict[Key, str], expected: dict[Key, str],
                   result: Coverage) -> None:
    """Each space must be observed where its own channels are (not another space of the same width)."""
    for space in graph.spec.spaces:
        matches = {expected[k] for k, group in actual.items() if group == space.name and k in expected}
        if len(matches) != 1:
            continue  # reported as a membership problem
        target = next(iter(matches))
        table = traced["outputs"] if space.observe.output else traced["inputs"]
        seen = table.get(space.observe.module, [])   # [(traced space, member)] of its input (output)
        if space.observe.whole and space.observe.output:
            ok = any(name == target for name, _ in seen)
        elif space.observe.whole:
            ok = len(seen) == 1 and seen[0][0] == target
        else:
            ok = any(name == target and m.start == space.observe.start and m.block == space.observe.block
                     for name, m in seen)
        if not ok:
            held = ", ".join(str(name) for name, _ in seen) or "nothing the tracer follows"
            result.problems.append(f"space {space.name} is observed at {space.observe}, whose input holds other "
                                   f"channels (traced: {held}); observe a module that reads this space")


def _traced_size(graph: ModelGraph, space: dict) -> int:
    writer = next(m for m in space["writers"] if m.whole)
    return layers.out_channels(graph.modules[writer.module])


def _count_tensors(graph: ModelGraph, result: Coverage) -> None:
    for name, module in graph.modules.items():
        tensors = [t for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
                   if t.is_floating_point()]
        if not tensors:
            continue
        result.tensors += len(tensors)
        own = [key for key, _ in module.named_parameters(recurse=False)] + \
              [key for key, _ in module.named_buffers(recurse=False)]
        keys = {f"{name}.{k}" if name else k for k in own}
        if keys and keys <= set(graph.param_writes):   # tensors used in forward, each listed in a space
            result.in_spaces += len(tensors)
            continue
        if name in graph.writes or name in graph.reads:
            result.in_spaces += len(tensors)
        else:
            result.outside.append(name)
        if layers.kind_of(module) is None:
            result.problems.append(f"{name} ({type(module).__name__}) has parameters zipit does not know how "
                                   "to merge")
