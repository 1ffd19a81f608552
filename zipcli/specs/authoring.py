"""Spec authoring: a traced model -> a complete spec document (stops chosen) -> YAML text."""
from __future__ import annotations

import torch.nn as nn
import yaml

from ..errors import SpecError
from .builders import check_num_classes_arg
from .format import FORMAT_2_KEYS, parse_spec
from .graph import ModelGraph
from .tracing import build_and_trace


def suggest_stops(graph: ModelGraph) -> list[str]:
    """Stage boundaries: top-level modules and the children of top-level containers after which
    the graph can be cut (no feature space is split). Of the candidates that share the same layers,
    the last one with parameters is named (``layer4`` rather than ``avgpool``). In a transformer
    the children of top-level containers (its blocks) may also cut the residual stream, which each
    head then takes back to its own model's channels (``ModelGraph.cuts_inside_spaces``)."""
    model = graph.model
    candidates = []
    for name, child in model.named_children():
        candidates.append(name)
        if isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            candidates += [f"{name}.{sub}" for sub, _ in child.named_children()]
    nodes = list(graph.gm.graph.nodes)
    ends = {}
    for c in candidates:
        inside = [i for i, n in enumerate(nodes) if graph.node_in_module(n, c)]
        if inside and graph.call_count.get(c, 1) == 1:
            ends[c] = max(inside)
    ordered = sorted(ends, key=lambda c: (ends[c], -c.count(".")))
    runs: list[tuple[tuple[frozenset, frozenset], list[str]]] = []   # (merged, cut spaces), candidates
    for c in ordered:
        try:
            plan = graph.cut(c, inside=graph.cuts_inside_spaces and "." in c)
        except SpecError:
            continue
        if not plan.merged_spaces:
            continue
        key = (frozenset(plan.merged_spaces), frozenset(plan.cut_spaces))
        if runs and runs[-1][0] == key:
            runs[-1][1].append(c)
        else:
            runs.append((key, [c]))
    stops = []
    for _, run in runs:
        with_params = [c for c in run if any(True for _ in graph.modules[c].parameters())]
        stops.append((with_params or run)[-1])
    return stops


def spec_document(name: str, builder: str, kwargs: dict, preprocess: dict, *, description: str = "",
                  num_classes_arg: str = "num_classes", stops: list[str] | None = None,
                  default_stop: str | None = None) -> dict:
    """Build the model, trace it and return a complete spec document (a YAML-ready dict).

    Without ``stops``, the stage boundaries found by ``suggest_stops`` are used. ``kwargs`` may
    hold the number of classes for building; the spec leaves it out (merge sets it per checkpoint).
    """
    model, traced = build_and_trace(builder, kwargs, (len(preprocess["mean"]), preprocess["size"], preprocess["size"]))
    check_num_classes_arg(builder, num_classes_arg)
    if not traced["classifiers"]:
        raise SpecError(f"cannot derive a spec for {name!r}: no convolution or linear layer writes the outputs",
                        "zipit needs a classifier layer at the end of the model")
    doc = {"format": 1, "name": name, "description": description, "builder": builder,
           "kwargs": {k: v for k, v in kwargs.items() if k != num_classes_arg}, "num_classes_arg": num_classes_arg,
           "input": dict(preprocess),
           "classifiers": traced["classifiers"], "stops": None, "default_stop": None,  # chosen on the graph below
           "spaces": [_space_document(s) for s in traced["spaces"]]}
    if any(key in s for s in doc["spaces"] for key in FORMAT_2_KEYS):
        doc["format"] = 2
    first = traced["classifiers"][0]  # a placeholder stop, to parse the spec before its stops are known
    graph = ModelGraph(parse_spec(dump_spec({**doc, "stops": [first], "default_stop": first}), origin=name,
                                  trust_builders=[builder.partition(":")[0]]), model)
    if stops:
        for stop in stops:
            try:
                graph.cut(stop)
            except SpecError as exc:
                valid_stops = ", ".join(suggest_stops(graph)) or "none"
                raise SpecError(exc.message, f"valid stops of {name}: {valid_stops}") from None
        valid = list(stops)
    else:
        valid = suggest_stops(graph)
    if not valid:
        raise SpecError(f"no stop point found for {name!r}: every cut would split a feature space",
                        "see 'Stops' in specs/README.md (installed as zipcli/specs/README.md)")
    doc["stops"] = valid
    doc["default_stop"] = default_stop or valid[-1]
    return doc


def _space_document(s: dict) -> dict:
    """A traced space as YAML; what format 1 cannot say only where a space needs it (CNN specs stay format 1)."""
    doc = {"name": s["name"], "observe": str(s["observe"])}
    if s.get("observe_axis", 1) != 1:
        doc["observe_axis"] = s["observe_axis"]
    doc["writers"] = [str(m) for m in s["writers"]]
    doc["readers"] = [str(m) for m in s["readers"]]
    for key in ("parameters", "heads", "heads_with"):
        if s.get(key):
            doc[key] = s[key]
    return doc


def dump_spec(doc: dict) -> str:
    header = (f"# zipit architecture spec (format {doc['format']}), generated by tracing the model.\n"
              "# Regenerate instead of editing by hand; see specs/README.md.\n")
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
