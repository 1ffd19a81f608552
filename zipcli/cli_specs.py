"""``zipit specs``: trace a model into a spec, check a spec, list the built-ins (parse, call, render)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .console import (DEBUG, HELP_SETTINGS, TRUST, err, out, print_json, shown, user_errors)
from .errors import SpecError, ZipitError

specs_app = typer.Typer(
    help="Architecture specs: trace your own model into one, check one, list the built-ins.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings=HELP_SETTINGS,
)

KWARGS = typer.Option(None, "--kw", metavar="NAME=VALUE",
                      help="A keyword argument for the builder, repeatable: --kw width=2 --kw dropout=0.1. "
                           "Values are read as int, float, true/false or none where they look like one, "
                           "else as text.")


def parse_kwargs(items: list[str] | None) -> dict:
    """``["width=2", "pretrained=false"]`` -> ``{"width": 2, "pretrained": False}``."""
    kwargs = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        if not sep or not name.strip().isidentifier():
            raise ZipitError(f"--kw {item!r} is not NAME=VALUE", "write e.g. --kw width=2")
        kwargs[name.strip()] = _value(text.strip())
    from .specs.trust import check_kwargs
    check_kwargs(kwargs, "--kw")     # the rules a spec file's kwargs obey: plain data, no downloads
    return kwargs


def _value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


TRACE_HELP = (
    "Trace a model into a spec (YAML) that merge --spec reads.\n\n"
    "Builds the model (random weights; nothing is downloaded), traces it with torch.fx, unifies the channel "
    "axes of its layers into feature spaces and writes them with where each is observed, the stop points "
    "(stage boundaries) and the classifiers. Operations the tracer cannot reason about (grouped convolutions, "
    "squeeze-and-excitation gates, attention, ...) are refused with the operation and the layer named.\n\n"
    "Example: zipit specs trace torchvision.models.resnet34 -o resnet34.yaml"
)
CHECK_HELP = (
    "Check a spec against its model: self-check, coverage and observe points.\n\n"
    "Needs no data. Permuting every declared feature space at random must leave the model's outputs "
    "unchanged (self-check); every layer's channels must belong to exactly the spaces that tracing derives "
    "(coverage); every space must be observed where its own channels are. Exit code 0 if all hold, 2 "
    "otherwise, with each problem named.\n\n"
    "Example: zipit specs check my_model.yaml"
)
LIST_HELP = (
    "The built-in architectures and their stop points.\n\n"
    "Use one with merge --arch NAME and --stop STOP; the default stop is marked with *.\n\n"
    "Example: zipit specs list"
)


@specs_app.command("trace", help=TRACE_HELP)
def trace_cmd(
    builder: str = typer.Argument(..., show_default=False, metavar="BUILDER",
                                  help="What builds the model: a torchvision name (resnet34, "
                                       "torchvision.models.resnet34) or your own module:function, "
                                       "importable from PYTHONPATH (mymodels:small_cnn)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="FILE", help="Spec file to write (YAML). "
                                          "Default: print it on stdout."),
    kw: Optional[List[str]] = KWARGS,
    name: Optional[str] = typer.Option(None, "--name", metavar="NAME", help="The spec's name. Default: the builder's function name."),
    preset: str = typer.Option("imagenet", "--input", metavar="imagenet|cifar", help="Input preprocessing: imagenet (224 px crop of a "
                               "256 px resize, ImageNet mean/std) or cifar (32 px, CIFAR mean/std; a 32-px "
                               "model needs it). To change it, trace again."),
    size: Optional[int] = typer.Option(None, "--size", metavar="PIXELS", help="Crop size in pixels, overriding the preset's."),
    num_classes_arg: str = typer.Option("num_classes", "--num-classes-arg", metavar="NAME", help="The builder's argument for the "
                                        "number of classes, which it must accept (merge sets it from each "
                                        "checkpoint)."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", metavar="STOP", help="Stop points to offer, repeatable (module names). "
                                             "Default: every stage boundary the tracer finds."),
    force: bool = typer.Option(False, "--force", "-f", metavar="", help="Overwrite the output file if it exists."),
    debug: bool = DEBUG,
):
    """Parse, call spec_document, write atomically (the help text is TRACE_HELP)."""
    from .merged import write_atomic
    from .specs.authoring import dump_spec, spec_document
    from .specs.builders import canonical_builder
    from .specs.recipes import PRESETS

    with user_errors(debug):
        if output is not None and output.is_dir():
            raise ZipitError(f"output {str(output)!r} is a folder", "give a file name, e.g. -o my_model.yaml")
        if output is not None and output.exists() and not force:
            raise ZipitError(f"output {str(output)!r} already exists", "pass --force to overwrite it")
        if preset not in PRESETS:
            raise ZipitError(f"unknown --input {preset!r}", f"valid: {', '.join(PRESETS)}")
        if size is not None and size < 8:
            raise ZipitError(f"--size {size} is too small", "give the crop size in pixels, e.g. 224")
        kwargs = parse_kwargs(kw)
        canonical = canonical_builder(builder)
        preprocess = dict(PRESETS[preset])
        if size is not None:
            preprocess["size"] = size
            preprocess["resize"] = None if preprocess["resize"] is None else round(size * 256 / 224)
        doc = spec_document(name or canonical.split(":")[1], canonical, kwargs, preprocess,
                            description=f"traced from {canonical}", num_classes_arg=num_classes_arg,
                            stops=stop or None)
        text = dump_spec(doc)
        if output is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            write_atomic(output, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), force)
        where = f"wrote {shown(str(output))}" if output else "spec on stdout"
        err.print(f"[green]traced[/] {shown(canonical)}: {len(doc['spaces'])} feature spaces, classifier "
                  f"{shown(', '.join(doc['classifiers']))}, stops {shown(', '.join(doc['stops']))} "
                  f"(default {shown(doc['default_stop'])}); {where}", soft_wrap=not err.is_terminal)
        if num_classes_arg in kwargs:
            err.print(f"  note: --kw {num_classes_arg}= is for tracing only; merge takes the number of classes "
                      "from each checkpoint", soft_wrap=not err.is_terminal)
        if output:
            err.print(f"  next: zipit specs check {shown(str(output))}", soft_wrap=not err.is_terminal)


def _load(spec_arg: str, trust_builders):
    from .specs import builtin_spec_names, load_spec

    if Path(spec_arg).is_file():
        return load_spec(path=spec_arg, trust_builders=trust_builders)
    if spec_arg in builtin_spec_names():
        return load_spec(arch=spec_arg)
    raise SpecError(f"{spec_arg!r} is neither a spec file nor a built-in architecture",
                    f"built-ins: {', '.join(builtin_spec_names())}")


@specs_app.command("check", help=CHECK_HELP)
def check_cmd(
    spec: str = typer.Argument(..., show_default=False, metavar="SPEC", help="A spec file, or the name of a built-in."),
    builder: Optional[str] = typer.Option(None, "--builder", metavar="BUILDER", help="Build the model with this builder instead of "
                                          "the spec's (same syntax as for trace)."),
    kw: Optional[List[str]] = KWARGS,
    size: Optional[int] = typer.Option(None, "--size", metavar="PIXELS", help="Input size for the check (default: the spec's); "
                                       "a smaller one is faster."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print the result as JSON on stdout."),
    trust_builder: Optional[List[str]] = TRUST,
    debug: bool = DEBUG,
):
    """Parse, call check_spec, render (the help text is CHECK_HELP)."""
    from .specs.builders import canonical_builder
    from .specs.check import SELF_CHECK_TOLERANCE, check_spec
    from .specs.trust import ANY

    with user_errors(debug):
        if size is not None and size < 8:
            raise ZipitError(f"--size {size} is too small", "give the input size in pixels, e.g. 64")
        # with --builder the spec's own builder is never imported: the one named here is used instead
        loaded = _load(spec, ANY if builder else (trust_builder or ()))
        result = check_spec(loaded, canonical_builder(builder) if builder else None, parse_kwargs(kw), size)
        facts = {"spec": result.spec, "builder": result.builder, "size": result.size, "spaces": result.spaces,
                 "self_check": result.self_check, "tolerance": SELF_CHECK_TOLERANCE, "tensors": result.tensors,
                 "tensors_in_spaces": result.in_spaces, "outside_spaces": result.outside_why,
                 "problems": result.problems, "passed": result.passed}
        if json_out:
            print_json(facts)
        mark = "[green]passed[/]" if result.passed else "[bold red]failed[/]"
        err.print(f"{mark} {shown(result.spec)} ({shown(result.builder)}, {result.size} px): {result.spaces} "
                  f"feature spaces; self-check {result.self_check:.1e} (tolerance {SELF_CHECK_TOLERANCE:g}); "
                  f"coverage {result.in_spaces}/{result.tensors} tensors in spaces", soft_wrap=not err.is_terminal)
        outside = [m for m in result.outside if m not in loaded.classifiers]
        if outside:
            reasons = sorted(set(result.outside_why[m] for m in outside))
            err.print(f"  {result.tensors - result.in_spaces} tensor(s) in no space, in {len(result.outside)} layer(s); "
                      f"the classifiers aside: {shown(', '.join(outside[:6]))}"
                      f"{', ...' if len(outside) > 6 else ''} "
                      f"({shown('; '.join(reasons))})", soft_wrap=not err.is_terminal)
        for problem in result.problems:
            err.print(f"  [red]-[/] {shown(problem)}", soft_wrap=not err.is_terminal)
        if not result.passed:
            raise SystemExit(2)


@specs_app.command("list", help=LIST_HELP)
def list_cmd(json_out: bool = typer.Option(False, "--json", metavar="", help="Print the list as JSON on stdout."),
             debug: bool = DEBUG):
    """Render the built-ins as a table (the help text is LIST_HELP)."""
    from .specs import builtin_spec_names, load_spec

    with user_errors(debug):
        specs = [load_spec(arch=n) for n in builtin_spec_names()]
        if json_out:
            print_json([{"name": s.name, "description": s.description, "builder": s.builder, "kwargs": s.kwargs,
                         "input_size": s.input.size, "spaces": len(s.spaces), "stops": list(s.stops),
                         "default_stop": s.default_stop} for s in specs])
            return
        table = Table(show_edge=False)
        for col in ("name", "input", "spaces", "stops (default marked *)"):
            table.add_column(col, justify="right" if col in ("input", "spaces") else "left")
        for s in specs:
            stops = ", ".join(f"[bold]{shown(x)}*[/]" if x == s.default_stop else shown(x) for x in s.stops)
            table.add_row(shown(s.name), f"{s.input.size}px", str(len(s.spaces)), stops)
        out.print(table)
