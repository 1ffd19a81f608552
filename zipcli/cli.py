"""The ``zipit`` command: parse, call the library, render. No merging logic lives here."""
from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from . import __version__
from .console import (AUGMENT, BATCH_SIZE, DEBUG, HELP_SETTINGS, NUM_CALIB, PARAMS, QUIET, REFIT, RESET_BN, SEED, TRUST,
                      RichReporter, auto_or_float, click_style_arguments, err, parse_params, parse_size, print_json,
                      shown, user_errors)
from .errors import ZipitError
from .visible import visible_tree
from .methods import METHODS
from .specs import builtin_spec_names, load_spec

click_style_arguments()
app = typer.Typer(
    help="Merge models trained on different tasks into one multi-head model, without training (ZipIt!).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings=HELP_SETTINGS,
)

def _version(value: bool):
    if value:
        typer.echo(f"zipit {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", metavar="", callback=_version, is_eager=True,
                                      help="Print the version and exit.")):
    """zipit merges checkpoints of one architecture, trained on different tasks from different
    initialisations, into one model with a shared trunk and one head per task.

    Exit codes: 0 success, 1 internal error (or an eval below its bar), 2 bad invocation or input.
    """


@app.command("merge")
def merge_cmd(
    checkpoints: List[Path] = typer.Argument(..., metavar="CHECKPOINT", help="Two or more checkpoints (.pt, .pth, .safetensors).",
                                              show_default=False),
    calib: Path = typer.Option(..., "--calib", metavar="DIR", help="Folder of calibration images, read recursively "
                               "(labels are not used; the train split of the tasks is ideal)."),
    output: Path = typer.Option(Path("merged.safetensors"), "--output", "-o", metavar="FILE", help="Merged file to write."),
    arch: Optional[str] = typer.Option(None, "--arch", metavar="NAME", help=f"Built-in architecture: {', '.join(builtin_spec_names())}."),
    spec: Optional[Path] = typer.Option(None, "--spec", metavar="FILE", help="Your own architecture spec (YAML) instead of --arch."),
    stop: Optional[str] = typer.Option(None, "--stop", metavar="STOP", help="Share layers up to and including this stage; later "
                                       "layers become one head per model. Default: all but the classifiers. "
                                       "'output' also merges the classifiers (identical classes only). "
                                       "Each architecture's stops: zipit specs list."),
    method: str = typer.Option("auto", "--method", metavar="METHOD", help=f"Matching: auto, {', '.join(METHODS)}. "
                               "auto: permute, unless zipit (with --alpha/--beta, chosen or given) "
                               "reproduces the sources better on held-out calibration images by more than the "
                               "score's noise."),
    alpha: str = typer.Option("auto", "--alpha", metavar="FLOAT|auto", help="zipit: weight of an already merged feature's correlations "
                              "(repeated matching), in [0, 1]. 'auto': chosen without labels on held-out "
                              "calibration images; 0.3 is the paper's value."),
    beta: str = typer.Option("auto", "--beta", metavar="FLOAT|auto", help="zipit: share of merges allowed within one model, in [0, 1], or "
                             "'auto' (see --alpha); 0.125 is the paper's value."),
    param: Optional[List[str]] = PARAMS,
    size: Optional[str] = typer.Option(None, "--size", metavar="X", help="The merged model's parameter count as a "
                                       "multiple of one source model (parameters, not MACs: what the file and "
                                       "memory hold), from 1 (the full zip, the default) up to the number of "
                                       "models: the extra width keeps apart the features that merge worst, "
                                       "chosen without labels. A size below the full zip's at the stop gives "
                                       "the full zip."),
    num_calib: int = NUM_CALIB,
    seed: int = SEED,
    batch_size: int = BATCH_SIZE,
    augment: bool = AUGMENT,
    reset_bn: bool = RESET_BN,
    refit: str = REFIT,
    classes: Optional[List[str]] = typer.Option(None, "--classes", metavar="NAMES|FILE", help="Class names, once per checkpoint in order: "
                                                "'a,b,c' or a file with one per line. Default: the checkpoint's "
                                                "JSON sidecar, else class_0, class_1, ..."),
    device: str = typer.Option("cpu", "--device", metavar="cpu|cuda", help="cpu or cuda."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="DTYPE", help="Output dtype (float32, float16, bfloat16); "
                                        "default: the first checkpoint's."),
    force: bool = typer.Option(False, "--force", "-f", metavar="", help="Overwrite the output file if it exists."),
    card: bool = typer.Option(True, "--card/--no-card", metavar="", help="Also write a model card (OUTPUT with .md) "
                              "and a config (.config.json: id2label per head, the input as timm describes it)."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print a JSON summary on stdout."),
    trust_builder: Optional[List[str]] = TRUST,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
):
    """Merge checkpoints into one multi-head model and write it as safetensors.

    Example: zipit merge a.pt b.pt --arch resnet20 --calib ./imgs --stop layer2 -o merged.safetensors
    """
    from .card import card_paths
    from .checkpoints import parse_classes
    from .distributed import leave, ranks_from_env
    from .merged import check_output_paths
    from .pipeline import MergeOptions, merge

    with user_errors(debug):
        waiting = None if quiet else (lambda m: err.print(shown(m), soft_wrap=not err.is_terminal))
        ranks = ranks_from_env(device, waiting)     # alone, or one of the processes torchrun started
        quiet = quiet or not ranks.main
        if output.suffix != ".safetensors":
            raise ZipitError(f"output {str(output)!r} must end in .safetensors", "e.g. -o merged.safetensors")
        check_output_paths([output], checkpoints, force)
        beside = [str(p) for p in card_paths(output)] if card else []
        for path in beside:
            if Path(path).exists() and not force:
                raise ZipitError(f"output {path!r} (the model card or config beside the merged file) already exists",
                                 "pass --force to overwrite it, or --no-card")
        check_output_paths(beside, checkpoints, force=True)
        arch_spec = load_spec(arch=arch, path=spec, trust_builders=trust_builder or ())
        options = MergeOptions(method=method, alpha=auto_or_float(alpha, "--alpha"),
                               beta=auto_or_float(beta, "--beta"), stop=stop, num_calib=num_calib, seed=seed,
                               batch_size=batch_size, augment=augment, reset_bn=reset_bn, refit=refit, device=device,
                               dtype=dtype, classes=[parse_classes(c) for c in classes] if classes else None,
                               params=parse_params(param), size=parse_size(size, len(checkpoints)))
        t0 = time.perf_counter()
        result = merge(checkpoints, arch_spec, calib, options, RichReporter(quiet, speaks=ranks.main), ranks)
        command = ["zipit", "merge", *map(str, checkpoints), *(["--arch", arch] if arch else ["--spec", str(spec)]),
                   *[x for t in (trust_builder or []) for x in ("--trust-builder", t)], "--calib", str(calib),
                   "--stop", result.metadata["stop"], "--method", method, "--alpha", alpha, "--beta", beta,
                   *[x for p in (param or []) for x in ("--param", p)], *(["--size", size] if size else []),
                   "--num-calib", str(num_calib), "--seed", str(seed), "--batch-size", str(batch_size),
                   *(["--augment"] if augment else []), *([] if reset_bn else ["--no-reset-bn"]),
                   "--refit", refit, *[x for c in (classes or []) for x in ("--classes", c)],
                   *(["--dtype", dtype] if dtype else []),
                   "-o", str(output)]
        ranks.together(lambda: result.save(output, force=force, card=card, command=shlex.join(command))
                       if ranks.main else None)
        leave(ranks)
        total = time.perf_counter() - t0
        summary = {"output": str(output), "spec": arch_spec.name, "stop": result.metadata["stop"],
                   "method": result.metadata["method"], "params": result.metadata["params"],
                   "heads": result.metadata["heads"], "calibration": result.metadata["calibration"],
                   "timings": {k: round(v, 3) for k, v in result.timings.items()} | {"total": round(total, 3)},
                   "spaces": result.metadata["spaces"], "beside": beside}
        if not quiet:                      # what it decided was told by the reporter as it was decided
            _render_merge_summary(summary)
        if json_out and ranks.main:
            print_json(summary)


def _render_merge_summary(s: dict) -> None:
    s = visible_tree(s)
    table = Table(title=None, show_edge=False, pad_edge=False)
    table.add_column("head")
    table.add_column("classes", justify="right")
    table.add_column("first classes")
    for h in s["heads"]:
        table.add_row(shown(h["name"]), str(len(h["classes"])), shown(", ".join(h["classes"][:4])
                                                                         + (", ..." if len(h["classes"]) > 4 else "")))
    err.print(table)
    t = s["timings"]
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in t.items() if k != "total")
    cal = s["calibration"]
    where = [f"{cal['held_out']} more held out for tuning"] if cal["held_out"] else []
    where += [f"{cal['skipped']} unreadable, skipped"] if cal["skipped"] else []
    also = f" (and {', '.join(shown(Path(p).name) for p in s['beside'])})" if s.get("beside") else ""
    err.print(f"[green]wrote[/] {shown(s['output'])}{also}: {s['method']} merge of {len(s['heads'])} heads "
              f"at stop {s['stop']} on {cal['num_images']} images{' (' + '; '.join(where) + ')' if where else ''} "
              f"in {t['total']:.1f}s ({phases})", soft_wrap=not err.is_terminal)


def _short(classes: list[str], n: int = 4) -> str:
    return ", ".join(classes[:n]) + (", ..." if len(classes) > n else "")


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


@app.command("inspect", short_help="Show what a merged file holds: heads, sources, cost, per-space statistics.")
def inspect_cmd(
    file: Path = typer.Argument(..., metavar="FILE", help="A merged .safetensors, or a plain checkpoint (.pt, .pth, .safetensors).",
                                show_default=False),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print the facts as one JSON document on stdout."),
    trust_builder: Optional[List[str]] = TRUST,
    debug: bool = DEBUG,
):
    """Show what a file holds: heads, sources, parameters, cost and per-space statistics of a merge;
    tensors and the matching built-in architecture of a plain checkpoint. Reads no image data."""
    from .inspection import inspect_file

    with user_errors(debug):
        facts = inspect_file(file, trust_builder or ())
        if json_out:
            print_json(facts)
        elif facts["kind"] == "merged":
            _render_merged(facts)
        else:
            _render_checkpoint(facts)


def _render_merged(f: dict) -> None:
    from .console import out
    f = visible_tree(f)             # every string in it came from the file
    cal, p, m = f["calibration"], f["parameters"], f["macs"]
    tuning, choice = f["params"].get("tuning"), f["params"].get("choice")
    from .merged import RECORDS
    params = ", ".join(f"{k} {v}" for k, v in f["params"].items() if k not in RECORDS) or "none"
    whose = "" if f["method"] == "zipit" else "zipit's alpha, beta "
    if tuning and tuning["candidates"]:
        params += f"; {whose}tuned: lowest divergence of {len(tuning['candidates'])} candidates on " \
                  f"{tuning['held_out_images']} held-out images"
    elif tuning:
        params += f"; {whose}not tuned: {tuning['reason']}"
    out.print(f"[bold]{shown(f['file'])}[/]  ({shown(f['format'])}, written by zipit {shown(f['zipit_version'])})")
    facts = Table.grid(padding=(0, 2), pad_edge=True)   # values wrap on words inside their own column
    facts.add_column(no_wrap=True)
    facts.add_column()
    facts.add_row("architecture", f"{shown(str(f['spec']))}, shared up to [bold]{shown(f['stop'])}[/]")
    facts.add_row("method", f"{shown(f['method'])} ({shown(params)})")
    if choice:
        facts.add_row("why", shown(_choice_text(choice)))
    if f["params"].get("refit"):
        from .wording import refit_summary
        facts.add_row("refit", shown(refit_summary(f["params"]["refit"])))
    if f["params"].get("size"):
        from .wording import size_summary
        facts.add_row("size", shown(size_summary(f["params"]["size"])))
    facts.add_row("calibration", f"{cal['num_images']} images from {shown(cal['folder'])}, seed {cal['seed']}, "
                  f"augment {'on' if cal['augment'] else 'off'}, BN reset {'on' if cal['reset_bn'] else 'off'}")
    for s in f["sources"]:
        facts.add_row("source", f"{shown(s['file'])}  sha256 {s['sha256'][:16]}...")
    facts.add_row("parameters", f"trunk {_human(p['trunk'])} + heads {_human(p['heads'])} = {_human(p['total'])} "
                  f"(sources together: {_human(p['sources_total'])}, {p['total'] / p['sources_total']:.0%})")
    facts.add_row("cost", f"{_human(m['merged'])} MACs per {m['input_size']}px image "
                  f"(sources together: {_human(m['sources_total'])}, {m['merged'] / m['sources_total']:.0%})")
    out.print(facts)
    heads = Table(title="heads", title_justify="left", show_edge=False)
    for col, just in (("head", "left"), ("classes", "right"), ("first classes", "left"), ("parameters", "right")):
        heads.add_column(col, justify=just)
    for h in f["heads"]:
        heads.add_row(shown(h["name"]), str(h["num_classes"]), shown(_short(h["classes"])), _human(h["params"]))
    out.print(heads)
    spaces = Table(title="feature spaces (where the models agree)", title_justify="left", show_edge=False)
    sized = any("width" in s for s in f["spaces"])
    for col in ("space", "size", *(["merged width"] if sized else []), "mean corr. of merged pairs",
                "within-model merges"):
        spaces.add_column(col, justify="left" if col == "space" else "right")
    for s in f["spaces"]:
        corr = "–" if s["mean_corr"] is None else f"{s['mean_corr']:.3f}"
        width = [str(s.get("width", "–"))] if sized else []
        spaces.add_row(shown(s["space"]), str(s["size"]), *width, corr, f"{s['within_share']:.1%}")
    out.print(spaces)
    if tuning and tuning["candidates"]:
        out.print(_tuning_grid(tuning))


def _choice_text(choice: dict) -> str:
    from .wording import choice_evidence
    return f"{choice.get('chosen')}: {choice_evidence(choice)}"


def _tuning_grid(tuning: dict) -> Table:
    """Candidates' held-out divergence as a beta x alpha grid, one row per beta: every candidate's
    round-1 score, then the last score of those that went on to more images (scores on different
    numbers of images are not compared)."""
    alphas = sorted({c["alpha"] for c in tuning["candidates"]})
    screened = min(c["images"] for c in tuning["candidates"])
    full = max(c["images"] for c in tuning["candidates"])
    two = screened < full
    title = (f"alpha/beta tuning: divergence from the sources (lower is better); candidates on {screened} "
             f"held-out images, the best then on more (up to {full}); chosen: *" if two else
             f"alpha/beta tuning: divergence from the sources on {full} held-out images (lower is better); chosen: *")
    if tuning.get("not_screened"):
        title += "; –: not scored (not in the grid, or its beta ranked below the best two in round 1)"
    grid = Table(title=title, title_justify="left", show_edge=False)
    grid.add_column("beta \\ alpha")
    for a in alphas:
        grid.add_column(f"{a:g}", justify="right")
    chosen = (tuning["chosen"]["alpha"], tuning["chosen"]["beta"])
    kinds = [("round 1", "screen_score"), ("more images", "final")] if two else [("", "score")]
    for b in sorted({c["beta"] for c in tuning["candidates"]}):
        cells = {c["alpha"]: c for c in tuning["candidates"] if c["beta"] == b}
        for label, key in kinds:
            if key == "final" and not any(c["images"] > screened for c in cells.values()):
                continue                    # no candidate of this row went on
            grid.add_row(f"{b:g} {label}".strip(), *(_grid_cell(cells.get(a), key, screened, (a, b) == chosen)
                                                    for a in alphas))
    return grid


def _grid_cell(candidate: dict | None, key: str, screened: int, chosen: bool) -> str:
    if candidate is None:
        return "–"
    went_on = candidate["images"] > screened
    if key == "final":
        value = candidate["score"] if went_on else None
    else:
        value = candidate.get(key, None if went_on else candidate["score"])
    if value is None:
        return ""
    return f"{value:.4f}{'*' if chosen and key != 'screen_score' else ''}"


def _render_checkpoint(f: dict) -> None:
    from .console import out
    f = visible_tree(f)
    out.print(f"[bold]{shown(f['file'])}[/]  plain checkpoint, sha256 {f['sha256'][:16]}...")
    out.print(f"  {len(f['tensors'])} tensors, {_human(f['parameters'])} parameters; matches built-in: "
              f"{', '.join(f['matching_specs']) or 'none'}")
    table = Table(show_edge=False)
    for col in ("tensor", "shape", "dtype"):
        table.add_column(col)
    for t in f["tensors"]:
        table.add_row(shown(t["name"]), shown(str(t["shape"])), shown(t["dtype"]))
    out.print(table)


@app.command("eval", short_help="Accuracy per task, their average and joint accuracy; a CI gate.")
def eval_cmd(
    files: List[Path] = typer.Argument(..., metavar="FILE", show_default=False,
                                       help="Merged .safetensors files (compared side by side) and/or plain "
                                            "checkpoints (each alone and their ensemble, the reference; these need "
                                            "--arch or --spec)."),
    data: Path = typer.Option(..., "--data", metavar="DIR", help="Labelled image folder: DIR/<class name>/<images>."),
    arch: Optional[str] = typer.Option(None, "--arch", metavar="NAME", help="Architecture of plain checkpoints (built-in name)."),
    spec: Optional[Path] = typer.Option(None, "--spec", metavar="FILE", help="Architecture spec file of plain checkpoints."),
    classes: Optional[List[str]] = typer.Option(None, "--classes", metavar="NAMES|FILE", help="Plain checkpoints: class names, as in merge."),
    limit: Optional[int] = typer.Option(None, "--limit", metavar="N", help="At most N images per class, for a quick look."),
    batch_size: int = typer.Option(256, "--batch-size", metavar="N", help="Images per forward pass."),
    device: str = typer.Option("cpu", "--device", metavar="cpu|cuda", help="cpu or cuda."),
    min_avg: Optional[float] = typer.Option(None, "--min-avg", metavar="FRACTION", help="Exit 1 if the average per-task accuracy "
                                            "(a fraction) is below this."),
    min_joint: Optional[float] = typer.Option(None, "--min-joint", metavar="FRACTION", help="Exit 1 if joint accuracy is below this."),
    card: bool = typer.Option(True, "--card/--no-card", metavar="", help="Write each merged file's figures into its "
                              "model card (the .md beside it, if zipit wrote one)."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print results as JSON on stdout (nothing else there)."),
    trust_builder: Optional[List[str]] = TRUST,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
):
    """Accuracy per task (each head on its own classes), their average, and joint accuracy (softmax per
    head, argmax over all classes), for merged files side by side and, as the reference, the source
    checkpoints alone and as an ensemble.

    Example: zipit eval merged_l2.safetensors merged_l3.safetensors a.pt b.pt --arch resnet20 --data ./test

    The bars --min-avg and --min-joint apply to every merged file given (to the ensemble when only plain
    checkpoints are given), and a head without test images fails them. Exit codes: 0 every bar met; 1
    below a bar (after printing); 2 bad invocation or unusable input. Preprocessing of a merged file
    comes from the spec stored in it.
    """
    from .card import record_accuracy
    from .checkpoints import parse_classes
    from .evaluate import evaluate_files

    with user_errors(debug):
        for name, bar in (("--min-avg", min_avg), ("--min-joint", min_joint)):
            if bar is not None and not 0 <= bar <= 1:
                raise ZipitError(f"{name} {bar} is not a fraction", "give a value in [0, 1], e.g. 0.8")
        if limit is not None and limit < 1:
            raise ZipitError(f"--limit {limit} must be at least 1")
        if batch_size < 1:
            raise ZipitError(f"--batch-size {batch_size} must be at least 1", "e.g. --batch-size 256")
        arch_spec = load_spec(arch=arch, path=spec, trust_builders=trust_builder or ()) if (arch or spec) else None
        report = evaluate_files(files, data, arch_spec, [parse_classes(c) for c in classes] if classes else None,
                                limit, batch_size, device, RichReporter(quiet or json_out), trust_builder or ())
        gated = [r for r in report["results"] if r["kind"] == "merged"] or report["results"][-1:]
        failures = []
        for result in gated:   # every merged file must meet the bars (else the ensemble of the sources)
            who = f"{result['model']}: " if len(gated) > 1 else ""
            failures += [f"{who}{label} {value:.4f} < {bar}" for label, value, bar in
                         (("avg task", result["avg_task"], min_avg), ("joint", result["joint"], min_joint))
                         if bar is not None and value is not None and value < bar]
            if min_avg is not None or min_joint is not None:   # a gate cannot pass on heads it never saw
                failures += [f"{who}head {h['name']} has no test images (no folder of its classes in {data})"
                             for h in result["heads"] if not h["images"]]
                failures += [f"{who}{label}: no image to score" for label, value, bar in
                             (("avg task", result["avg_task"], min_avg), ("joint", result["joint"], min_joint))
                             if bar is not None and value is None]
        report["passed"] = not failures
        report["cards_updated"], not_updated = [], []
        if card:     # the figures are the result; a card that cannot be written is a warning, never the gate
            for result in report["results"]:
                if result["kind"] == "merged":
                    try:
                        written = record_accuracy(result["file"], result, str(data), report["images"], limit)
                    except ZipitError as exc:
                        not_updated.append(f"{exc.message}")
                        continue
                    report["cards_updated"] += [str(written)] if written else []
        if json_out:
            print_json(report)
        else:
            _render_eval(report)
        for why in not_updated:
            err.print(f"[yellow]warning:[/] the model card was not updated: {shown(why)} (--no-card leaves cards "
                      "alone)", soft_wrap=not err.is_terminal)
        if report["cards_updated"] and not quiet:
            err.print(f"recorded the figures in {shown(', '.join(report['cards_updated']))}",
                      soft_wrap=not err.is_terminal)
        if failures:
            err.print(f"[bold red]below the bar:[/] {shown('; '.join(failures))}", soft_wrap=not err.is_terminal)
            raise SystemExit(1)


def _render_eval(r: dict) -> None:
    from .console import out
    r = visible_tree(r)
    table = Table(show_edge=False)
    for col in ("model", "head", "images", "accuracy"):
        table.add_column(col, justify="left" if col in ("model", "head") else "right")
    for res in r["results"]:
        for h in res["heads"]:
            acc = "–" if h["accuracy"] is None else f"{h['accuracy']:.4f}"
            table.add_row(shown(res["model"]), shown(h["name"]), str(h["images"]), acc)
        if len(res["heads"]) > 1:
            table.add_row(shown(res["model"]), "[bold]average per task[/]", "", f"[bold]{res['avg_task']:.4f}[/]")
            joint = "–" if res["joint"] is None else f"{res['joint']:.4f}"
            table.add_row(shown(res["model"]), "[bold]joint[/]", str(res["joint_images"]), f"[bold]{joint}[/]")
        table.rows[-1].end_section = True
    out.print(table)
    if r["unknown_class_folders"]:
        out.print(f"[yellow]note:[/] {sum(x['unknown_class_images'] for x in r['results'][-1:])} images in "
                  f"folders no head knows: {shown(', '.join(r['unknown_class_folders']))}")
    if r["skipped_images"]:
        out.print(f"[yellow]note:[/] {r['skipped_images']} unreadable images skipped")


@app.command("export", short_help="Export a merged model to run without zipit (torch.export or ONNX).")
def export_cmd(
    file: Path = typer.Argument(..., metavar="FILE", show_default=False, help="A merged .safetensors file."),
    output: Path = typer.Option(..., "--output", "-o", metavar="FILE", help="Program to write (.pt2 or .onnx)."),
    fmt: Optional[str] = typer.Option(None, "--format", metavar="pt2|onnx", help="pt2: a torch.export archive "
                                      "(torch.export.load(FILE).module()(images) gives one tensor per head); onnx: "
                                      "ONNX with a dynamic batch axis (needs: pip install onnx onnxscript onnxruntime). "
                                      "Default: from the output's suffix."),
    force: bool = typer.Option(False, "--force", "-f", metavar="", help="Overwrite the output file if it exists."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print what was written as JSON on stdout."),
    trust_builder: Optional[List[str]] = TRUST,
    debug: bool = DEBUG,
):
    """Export a merged model as a program that runs without zipit, one output per head, any batch size.

    The export checks itself before anything is written: on inputs of 1, 3 and 8 images it must give
    the merged model's outputs (float rounding aside).

    Example: zipit export merged.safetensors -o merged.pt2
    """
    from .export import FORMATS, export_merged
    from .merged import check_output_paths

    with user_errors(debug):
        kind = fmt or output.suffix.lstrip(".")
        if kind not in FORMATS:
            raise ZipitError(f"cannot tell the format of {str(output)!r}", "end it in .pt2 or .onnx, or pass --format")
        check_output_paths([output], [file], force)
        facts = export_merged(file, output, kind, force, trust_builder or ())
        if json_out:
            print_json(facts)
        err.print(f"[green]exported[/] {shown(str(file))} -> {shown(str(output))} ({kind}, {len(facts['heads'])} "
                  f"heads, {facts['input_size']} px input; checked on batches of "
                  f"{', '.join(map(str, facts['checked_batches']))}: largest relative gap "
                  f"{facts['max_relative_gap']:.1g})", soft_wrap=not err.is_terminal)


from .cli_specs import specs_app  # noqa: E402  (the 'zipit specs' commands live in their own module)
from .cli_sweep import sweep_cmd  # noqa: E402  (and so does 'zipit sweep')

app.command("sweep")(sweep_cmd)
app.add_typer(specs_app, name="specs")
