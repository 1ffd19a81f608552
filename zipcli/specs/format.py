"""Architecture specs: YAML text -> validated ``Spec`` objects.

A spec is data, not code: how to build the model, how to preprocess its input,
where it may be cut for partial zipping, which layers are the per-task
classifiers, and its feature spaces (see ``specs/README.md``). Validation is
strict: unknown keys are errors, and every message names the YAML path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

import yaml

from ..errors import SpecError
from .trust import check_builder_trusted, check_kwargs

FORMAT_VERSION = 2     # written when a spec uses what format 1 cannot say (heads, parameters, observe axes)
FORMATS = (1, 2)       # read
FORMAT_2_KEYS = ("parameters", "heads", "heads_with", "observe_axis")

OUTPUT_STOP = "output"


@dataclass(frozen=True)
class Preprocess:
    """Input preprocessing: resize shorter side, centre crop, scale to [0,1], normalise."""

    size: int
    resize: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def shape(self) -> tuple[int, int, int]:
        """One input image as (channels, height, width): a channel per mean and std value."""
        return len(self.mean), self.size, self.size


_MEMBER = re.compile(r"^([^@\s]+)(?:@(\d+)(?:\*(\d+))?)?$")


@dataclass(frozen=True)
class Member:
    """One module's channel axis in a space: all of it (``conv1``), or, where the axis is a
    concatenation, the space's channels from ``offset`` on (``norm1@64``). After a flatten each
    channel is a run of ``block`` consecutive values (``fc1@0*49``: a 7x7 map per channel). An
    observe point may be a module's output (``attn.q>``): attention's queries have no layer reading them."""

    module: str
    offset: int | None = None      # None: the whole axis is this space
    block: int = 1
    output: bool = False           # observe the module's output, not its input

    @property
    def start(self) -> int:
        return self.offset or 0

    @property
    def whole(self) -> bool:
        return self.offset is None

    def __str__(self) -> str:
        tail = ">" if self.output else ""
        if self.offset is None:
            return self.module + tail
        return f"{self.module}@{self.offset}" + (f"*{self.block}" if self.block != 1 else "") + tail


def parse_member(text: str) -> Member | None:
    """``MODULE``, ``MODULE@OFFSET`` or ``MODULE@OFFSET*BLOCK``; None if it is none of them."""
    m = _MEMBER.match(text)
    if m is None or (m.group(3) is not None and int(m.group(3)) < 1):
        return None
    return Member(m.group(1), None if m.group(2) is None else int(m.group(2)), int(m.group(3) or 1))


@dataclass(frozen=True)
class Space:
    """A group of channel-coupled tensors that is permuted or merged as one.

    ``writers`` produce the channels (their output axis and per-channel
    parameters), ``readers`` consume them (their input axis), and the space's
    activations are observed at the input of module ``observe`` (channels on ``observe_axis``).
    ``parameters`` are tensors used directly in forward (a class token, position embeddings) whose
    last axis is the space. A space of attention heads (``heads``) is permuted in whole heads;
    ``heads_with`` names the query/key space whose head order a value space shares.
    """

    name: str
    observe: Member
    writers: tuple[Member, ...]
    readers: tuple[Member, ...]
    parameters: tuple[str, ...] = ()
    heads: int | None = None
    heads_with: str | None = None
    observe_axis: int = 1


@dataclass(frozen=True)
class Spec:
    name: str
    description: str
    builder: str
    kwargs: dict
    num_classes_arg: str
    input: Preprocess
    classifiers: tuple[str, ...]
    stops: tuple[str, ...]
    default_stop: str
    spaces: tuple[Space, ...]
    text: str = field(repr=False, compare=False, default="")

    def space(self, name: str) -> Space:
        for s in self.spaces:
            if s.name == name:
                return s
        raise KeyError(name)


_TOP_KEYS = {
    "format": True, "name": True, "description": False, "builder": True, "kwargs": False,
    "num_classes_arg": False, "input": True, "classifiers": True, "stops": True,
    "default_stop": False, "spaces": True,
}
_INPUT_KEYS = {"size": True, "resize": False, "mean": True, "std": True}
_SPACE_KEYS = {"name": True, "observe": True, "writers": True, "readers": False, "parameters": False,
               "heads": False, "heads_with": False, "observe_axis": False}


def _check_keys(obj, allowed: dict, where: str, origin: str) -> None:
    if not isinstance(obj, dict):
        raise SpecError(f"{origin}: {where or 'the document'} must be a mapping, got {type(obj).__name__}",
                        "see specs/README.md for the format")
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise SpecError(f"{origin}: unknown key(s) {', '.join(unknown)} at {where or 'top level'}",
                        f"valid keys: {', '.join(allowed)}")
    missing = [k for k, required in allowed.items() if required and k not in obj]
    if missing:
        raise SpecError(f"{origin}: missing key(s) {', '.join(missing)} at {where or 'top level'}",
                        "see specs/README.md for the format")


def _str(value, where: str, origin: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{origin}: {where} must be a non-empty string, got {value!r}")
    return value


def _str_list(value, where: str, origin: str, allow_empty: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise SpecError(f"{origin}: {where} must be a {'' if allow_empty else 'non-empty '}list of strings")
    return tuple(_str(v, f"{where}[{i}]", origin) for i, v in enumerate(value))


def _member(value, where: str, origin: str) -> Member:
    member = parse_member(_str(value, where, origin))
    if member is None:
        raise SpecError(f"{origin}: {where} {value!r} is not a module name",
                        "write MODULE, MODULE@OFFSET (a slice of a concatenation) or MODULE@OFFSET*BLOCK")
    return member


def _observe(value, where: str, origin: str) -> Member:
    """An observe point: a member, or ``MODULE>`` for the module's output."""
    text = _str(value, where, origin)
    member = _member(text[:-1] if text.endswith(">") else text, where, origin)
    return Member(member.module, member.offset, member.block, output=True) if text.endswith(">") else member


def _member_list(value, where: str, origin: str, allow_empty: bool = False) -> tuple[Member, ...]:
    members = tuple(_member(v, f"{where}[{i}]", origin)
                    for i, v in enumerate(_str_list(value, where, origin, allow_empty)))
    seen = set()
    for m in members:
        if m.module in seen:
            raise SpecError(f"{origin}: {where} names module {m.module!r} twice", "list each module once per space")
        seen.add(m.module)
    return members


def _check_axis_owners(spaces: list[Space], role: str, origin: str) -> None:
    """A module's axis belongs to one space, unless each space has its own slice of it (a concatenation)."""
    owners: dict[str, list[tuple[str, Member]]] = {}
    for space in spaces:
        for m in getattr(space, role):
            owners.setdefault(m.module, []).append((space.name, m))
    for module, entries in owners.items():
        if len(entries) > 1 and any(m.whole for _, m in entries):
            names = " and ".join(name for name, _ in entries[:2])
            axis = "output" if role == "writers" else "input"
            raise SpecError(f"{origin}: module {module!r} is in the {role} of two spaces ({names})",
                            f"a module's {axis} channels belong to one space, or give each space its slice "
                            "as MODULE@OFFSET")
        offsets = [m.start for _, m in entries]
        if len(set(offsets)) != len(offsets):
            raise SpecError(f"{origin}: module {module!r} has two {role[:-1]} slices at the same offset",
                            "slices of one module must not overlap")


def _axis(value, where: str, origin: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value == 0:
        raise SpecError(f"{origin}: {where} must be a tensor axis other than the batch axis (1, 2, ..., or -1), "
                        f"got {value!r}")
    return value


def _check_heads(spaces: list[Space], origin: str) -> None:
    """A value space shares the head order of a query/key space with as many heads; members of no
    two spaces name the same parameter."""
    by_name = {s.name: s for s in spaces}
    owner: dict[str, str] = {}
    for s in spaces:
        for key in s.parameters:
            if key in owner:
                raise SpecError(f"{origin}: parameter {key!r} is in two spaces ({owner[key]} and {s.name})",
                                "a parameter's channels belong to one space")
            owner[key] = s.name
        if s.heads_with is None:
            continue
        partner = by_name.get(s.heads_with)
        if s.heads is None or partner is None or partner.heads != s.heads or partner.heads_with is not None:
            raise SpecError(f"{origin}: space {s.name} has heads_with {s.heads_with!r}, which is not a space "
                            f"with the same heads ({s.heads}) of its own",
                            "heads_with names the query/key space of the same attention")


def _number_triple(value, where: str, origin: str, positive: bool) -> tuple[float, float, float]:
    ok = isinstance(value, list) and len(value) == 3 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not ok or (positive and min(value) <= 0):
        raise SpecError(f"{origin}: {where} must be a list of 3 {'positive ' if positive else ''}numbers, got {value!r}")
    return tuple(float(v) for v in value)


def _int(value, where: str, origin: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise SpecError(f"{origin}: {where} must be a positive integer, got {value!r}")
    return value


MAX_SPEC_CHARS = 4_000_000   # the largest built-in (DenseNet-121) is 76 kB


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases: a few aliases can stand for a document of billions of
    nodes, and a spec never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(problem="aliases (*name) are not allowed in a spec",
                                       problem_mark=event.start_mark)
        return super().compose_node(parent, index)


def parse_spec(text: str, origin: str = "<spec>", trust_builders: Iterable[str] = ()) -> Spec:
    """Parse and validate spec YAML; raise ``SpecError`` naming the YAML path.

    The builder must be one zipit trusts, or in a module of ``trust_builders``
    (see ``trust.py``); this is checked on its name, before anything is imported.
    """
    if not isinstance(text, str) or len(text) > MAX_SPEC_CHARS:
        raise SpecError(f"{origin}: a spec of {len(text) if isinstance(text, str) else '?'} characters is too large",
                        f"specs are at most {MAX_SPEC_CHARS:,} characters")
    try:
        doc = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise SpecError(f"{origin}: {problem}{where}", "fix the YAML syntax") from None
    except (ValueError, RecursionError, TypeError) as exc:  # pathological documents
        raise SpecError(f"{origin}: cannot be read as YAML ({exc.__class__.__name__})") from None
    _check_keys(doc, _TOP_KEYS, "", origin)
    if doc["format"] not in FORMATS:
        raise SpecError(f"{origin}: format is {doc['format']!r}; this zipit reads formats "
                        f"{' and '.join(map(str, FORMATS))}",
                        "regenerate the spec with 'zipit specs trace' or upgrade zipit")
    kwargs = doc.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and k.isidentifier() for k in kwargs):
        raise SpecError(f"{origin}: kwargs must be a mapping of argument names to values")
    check_kwargs(kwargs, origin)
    builder = _str(doc["builder"], "builder", origin)
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", builder):
        raise SpecError(f"{origin}: builder {builder!r} is not of the form 'module:function'",
                        "write e.g. 'torchvision.models:resnet50' or 'mypkg.models:build'")
    check_builder_trusted(builder, trust_builders, origin)
    num_classes_arg = _str(doc.get("num_classes_arg", "num_classes"), "num_classes_arg", origin)
    if not num_classes_arg.isidentifier() or num_classes_arg in kwargs:
        raise SpecError(f"{origin}: num_classes_arg {num_classes_arg!r} must be an argument name not in kwargs")
    inp = doc["input"]
    _check_keys(inp, _INPUT_KEYS, "input", origin)
    resize = inp.get("resize")
    preprocess = Preprocess(
        size=_int(inp["size"], "input.size", origin),
        resize=None if resize is None else _int(resize, "input.resize", origin),
        mean=_number_triple(inp["mean"], "input.mean", origin, positive=False),
        std=_number_triple(inp["std"], "input.std", origin, positive=True),
    )
    spaces_doc = doc["spaces"]
    if not isinstance(spaces_doc, list) or not spaces_doc:
        raise SpecError(f"{origin}: spaces must be a non-empty list")
    spaces, seen = [], set()
    for i, s in enumerate(spaces_doc):
        where = f"spaces[{i}]"
        _check_keys(s, _SPACE_KEYS, where, origin)
        newer = [k for k in FORMAT_2_KEYS if k in s]
        if newer and doc["format"] < 2:
            raise SpecError(f"{origin}: {where}.{newer[0]} needs format 2", "write 'format: 2' at the top")
        space = Space(
            name=_str(s["name"], f"{where}.name", origin),
            observe=_observe(s["observe"], f"{where}.observe", origin),
            writers=_member_list(s["writers"], f"{where}.writers", origin),
            readers=_member_list(s.get("readers", []), f"{where}.readers", origin, allow_empty=True),
            parameters=_str_list(s.get("parameters", []), f"{where}.parameters", origin, allow_empty=True),
            heads=None if s.get("heads") is None else _int(s["heads"], f"{where}.heads", origin),
            heads_with=None if s.get("heads_with") is None else _str(s["heads_with"], f"{where}.heads_with", origin),
            observe_axis=_axis(s.get("observe_axis", 1), f"{where}.observe_axis", origin),
        )
        if space.name in seen or space.name == OUTPUT_STOP:
            raise SpecError(f"{origin}: {where}.name {space.name!r} is used twice or reserved",
                            "give each space a unique name")
        seen.add(space.name)
        spaces.append(space)
    _check_axis_owners(spaces, "writers", origin)
    _check_axis_owners(spaces, "readers", origin)
    _check_heads(spaces, origin)
    stops = _str_list(doc["stops"], "stops", origin)
    if OUTPUT_STOP in stops or len(set(stops)) != len(stops):
        raise SpecError(f"{origin}: stops must be unique and must not name {OUTPUT_STOP!r} (it is implicit)")
    default_stop = doc.get("default_stop", stops[-1])
    if default_stop not in stops:
        raise SpecError(f"{origin}: default_stop {default_stop!r} is not one of the stops",
                        f"valid: {', '.join(stops)}")
    return Spec(
        name=_str(doc["name"], "name", origin),
        description=str(doc.get("description") or ""),
        builder=builder,
        kwargs=dict(kwargs),
        num_classes_arg=num_classes_arg,
        input=preprocess,
        classifiers=_str_list(doc["classifiers"], "classifiers", origin),
        stops=stops,
        default_stop=default_stop,
        spaces=tuple(spaces),
        text=text,
    )
