"""``zipit sweep``: every stop, size and method from one calibration pass, as a table and a plot (parse, call, render)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .console import (AUGMENT, BATCH_SIZE, DEBUG, NUM_CALIB, PARAMS, QUIET, REFIT, RESET_BN, SEED, TRUST, RichReporter,
                      auto_or_float, err, out, parse_params, parse_size, print_json, shown, user_errors)
from .errors import ZipitError
from .methods import METHODS

MAX_HEAD_COLUMNS = 4    # more heads than this: only the average and joint columns


def sweep_cmd(
    checkpoints: List[Path] = typer.Argument(..., metavar="CHECKPOINT", show_default=False,
                                             help="Two or more checkpoints (.pt, .pth, .safetensors)."),
    calib: Path = typer.Option(..., "--calib", metavar="DIR", help="Folder of calibration images (unlabelled), as in merge."),
    data: Optional[Path] = typer.Option(None, "--data", metavar="DIR", help="Labelled test folder (DIR/<class>/<images>): "
                                        "score each merge by accuracy. Without it: by the label-free divergence "
                                        "from the sources on held-out calibration images (lower is better)."),
    arch: Optional[str] = typer.Option(None, "--arch", metavar="NAME", help="Built-in architecture (zipit specs list)."),
    spec: Optional[Path] = typer.Option(None, "--spec", metavar="FILE", help="Your own architecture spec (YAML) instead of --arch."),
    method: Optional[List[str]] = typer.Option(None, "--method", metavar="METHOD", help=f"Method to sweep, repeatable "
                                               f"(auto, {', '.join(METHODS)}). Default: zipit and permute."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", metavar="STOP", help="Stop to sweep, repeatable. Default: "
                                             "every stage stop of the architecture."),
    size: Optional[List[str]] = typer.Option(None, "--size", metavar="X", help="Also merge at this size, "
                                             "repeatable: parameters as a multiple of one source model, as in "
                                             "merge --size (1 to the number of models), at every stop whose full "
                                             "zip is no larger. Adds a size column and marks the frontier."),
    alpha: str = typer.Option("auto", "--alpha", metavar="FLOAT|auto", help="zipit's alpha, as in merge ('auto': "
                              "chosen without labels at each stop)."),
    beta: str = typer.Option("auto", "--beta", metavar="FLOAT|auto", help="zipit's beta, as in merge."),
    param: Optional[List[str]] = PARAMS,
    refit: str = REFIT,
    num_calib: int = NUM_CALIB,
    seed: int = SEED,
    batch_size: int = BATCH_SIZE,
    augment: bool = AUGMENT,
    reset_bn: bool = RESET_BN,
    classes: Optional[List[str]] = typer.Option(None, "--classes", metavar="NAMES|FILE", help="Class names, once per "
                                                "checkpoint, as in merge."),
    limit: Optional[int] = typer.Option(None, "--limit", metavar="N", help="At most N test images per class, for a quick look."),
    device: str = typer.Option("cpu", "--device", metavar="cpu|cuda", help="cpu or cuda."),
    plot: Optional[Path] = typer.Option(None, "--plot", "-p", metavar="FILE", help="Also draw accuracy against compute "
                                        "as a PNG: every point, the frontier as a step line (needs: pip install "
                                        "matplotlib)."),
    force: bool = typer.Option(False, "--force", "-f", metavar="", help="Overwrite the plot file if it exists."),
    json_out: bool = typer.Option(False, "--json", metavar="", help="Print every point as JSON on stdout (nothing else there)."),
    trust_builder: Optional[List[str]] = TRUST,
    quiet: bool = QUIET,
    debug: bool = DEBUG,
):
    """Merge at every stop (and --size) with each method and score every merge, to choose where to stop. The
    calibration images go through the sources once; each point then costs its own zip, BatchNorm
    reset and scoring. Each point is the model zipit merge writes with the same options (when alpha
    and beta are tuned in a folder with too few spare images, every method calibrates on the images
    left after the held-out ones).

    Example: zipit sweep a.pt b.pt --arch resnet20 --calib ./train --data ./test -p sweep.png
             zipit sweep a.pt b.pt --arch resnet20 --calib ./train --data ./test --size 1.25 --size 1.5

    Columns: parameters and MACs per image as a share of running the sources side by side, accuracy
    per head (each on its own classes), their average, and joint accuracy (all classes at once).
    With --size: the size asked (– for a stop's own merge) and a ★ column marking the frontier (no other point
    costs no more MACs and scores no worse).
    """
    from .checkpoints import parse_classes
    from .pipeline import MergeOptions
    from .specs import load_spec
    from .sweep import DEFAULT_METHODS, sweep

    with user_errors(debug):
        if plot is not None:      # what the user can fix by editing the command line comes first
            from .plot import check_plotting
            if plot.suffix.lower() != ".png":
                raise ZipitError(f"plot {str(plot)!r} must end in .png", "e.g. -p sweep.png")
            from .merged import check_output_paths
            check_output_paths([plot], [*checkpoints, *([spec] if spec else [])], force)
            for folder in (calib, data):        # an image of the calibration or test folder is an input too
                if folder is not None and plot.resolve().is_relative_to(Path(folder).resolve()):
                    raise ZipitError(f"plot {str(plot)!r} lies inside the input folder {str(folder)!r}",
                                     "write the plot elsewhere: --force replaces an old output, never an input")
            check_plotting()
        if limit is not None and limit < 1:
            raise ZipitError(f"--limit {limit} must be at least 1")
        arch_spec = load_spec(arch=arch, path=spec, trust_builders=trust_builder or ())
        options = MergeOptions(alpha=auto_or_float(alpha, "--alpha"), beta=auto_or_float(beta, "--beta"),
                               num_calib=num_calib, seed=seed, batch_size=batch_size, augment=augment,
                               reset_bn=reset_bn, device=device, refit=refit,
                               classes=[parse_classes(c) for c in classes] if classes else None,
                               params=parse_params(param))
        sizes = [None, *(parse_size(x, len(checkpoints)) for x in size or ())]
        result = sweep(checkpoints, arch_spec, calib, method or DEFAULT_METHODS, stop, options, data, limit,
                       RichReporter(quiet or json_out), sizes)
        if plot is not None:
            from .plot import plot_sweep
            plot_sweep(result, plot, force)
        if json_out:
            print_json(result.to_dict())
        else:
            _render_sweep(result)
        if plot is not None and not quiet:
            err.print(f"[green]wrote[/] {shown(str(plot))}", soft_wrap=not err.is_terminal)


def _render_sweep(r) -> None:
    labelled = r.data is not None
    heads = [h["name"] for h in r.reference["heads"]] if labelled else []
    per_head = labelled and len(heads) <= MAX_HEAD_COLUMNS
    sized = any(p.size is not None for p in r.points)
    table = Table(show_edge=False, pad_edge=False)
    for col in ("stop", *(("size",) if sized else ()), "method", "α/β", "params", "MACs"):
        table.add_column(col, justify="right" if col in ("size", "params", "MACs") else "left", no_wrap=True)
    for i in range(len(heads) if per_head else 0):
        table.add_column(f"head {i}", justify="right", no_wrap=True)
    for col in (("avg", "joint") if labelled else ("divergence",)):
        table.add_column(col, justify="right", no_wrap=True)
    if sized:
        table.add_column("★", justify="center", no_wrap=True)     # the frontier

    def figures(acc: dict) -> list[str]:
        cells = [_fraction(h["accuracy"]) for h in acc["heads"]] if per_head else []
        return cells + [f"[bold]{_fraction(acc['avg_task'])}[/]", _fraction(acc["joint"])]

    from .merged import RECORDS
    for p in r.points:
        setting = "/".join(f"{v:g}" for k, v in p.params.items() if k not in RECORDS) or "–"
        size = ([f"{p.size:g}" if p.size is not None else "–"] if sized else [])
        cells = [shown(p.stop), *size, shown(p.method), setting, f"{p.parameters / r.source_parameters:.2f}×",
                 f"{p.macs / r.source_macs:.2f}×"]
        table.add_row(*cells, *(figures(p.accuracy) if labelled else [f"{p.divergence:.4f}"]),
                      *(["★" if p.frontier else ""] if sized else []))
    if labelled:
        table.rows[-1].end_section = True
        table.add_row("–", *(["–"] if sized else []), "ensemble", "", "1.00×", "1.00×", *figures(r.reference),
                      *([""] if sized else []))
    out.print(table)
    if per_head:
        out.print("  ".join(f"head {i}: {shown(name)}" for i, name in enumerate(heads)) +
                  "; avg: their average; ensemble: the sources run side by side", soft_wrap=not out.is_terminal)
    cal = r.calibration
    scored = (f"accuracy on {shown(r.data)}" if labelled else
              f"divergence from the sources on {cal['held_out']} held-out calibration images (lower is better)")
    err.print(f"{len(r.points)} merges of {shown(r.spec)} from one calibration pass over {cal['num_images']} images; "
              f"{scored}", soft_wrap=not err.is_terminal)


def _fraction(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"
