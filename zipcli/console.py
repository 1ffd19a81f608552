"""Terminal output: a stderr console, Rich progress, error rendering.

stdout is kept for machine-readable output (``--json``); everything for people
goes to stderr.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from .errors import ZipitError
from .visible import visible

TRUST = typer.Option(None, "--trust-builder", metavar="MODULE",
                     help="Trust this module's model builders for this run, repeatable. A spec or merged file "
                          "names the function that builds its model; zipit imports only its own models and "
                          "torchvision's unless you trust the module here (e.g. --trust-builder mymodels).")
QUIET = typer.Option(False, "--quiet", "-q", metavar="", help="No progress or summary on stderr.")
DEBUG = typer.Option(False, "--debug", metavar="", help="Show Python tracebacks for errors.")
# How calibration images are drawn and used: the same options in merge and sweep.
NUM_CALIB = typer.Option(512, "--num-calib", metavar="N", help="Calibration images to sample (all if fewer).")
SEED = typer.Option(0, "--seed", metavar="N", help="Seed for sampling and augmentation.")
BATCH_SIZE = typer.Option(64, "--batch-size", metavar="N", help="Images per forward pass.")
AUGMENT = typer.Option(False, "--augment", metavar="", help="Random crop and flip on calibration images.")
RESET_BN = typer.Option(True, "--reset-bn/--no-reset-bn", metavar="", help="Recompute BatchNorm statistics after merging.")
REFIT = typer.Option("lsq", "--refit", metavar="lsq|none", help="lsq: after the zip, solve each merged layer's "
                     "weights in closed form (ridge least squares, no labels) so that its outputs reproduce the "
                     "sources' on the calibration images, layer after layer; one more pass over them (as many as "
                     "fit in 256 MiB of activations); a layer with too few samples keeps its zipped weights. "
                     "none: keep the zipped weights.")
PARAMS = typer.Option(None, "--param", metavar="NAME=VALUE", help="A parameter of the method, repeatable (zipit's are "
                      "--alpha and --beta); an unknown name is refused with the method's own list.")

def click_style_arguments() -> None:
    """Show arguments as Click tools do (``CHECKPOINT...``), not as Typer's ``{checkpoints}...``
    with a Python type (``<list[Path]>``): an argument with a metavar shows just that."""
    try:
        from typer.core import TyperArgument
    except ImportError:  # another Typer: keep its rendering
        return
    if hasattr(TyperArgument, "display_type_rich"):
        plain = TyperArgument.display_type_rich
        TyperArgument.display_type_rich = lambda self, ctx: None if self.metavar else plain(self, ctx)
    if hasattr(TyperArgument, "_usage_display_name"):
        usage = TyperArgument._usage_display_name
        TyperArgument._usage_display_name = lambda self: (
            (self.metavar if self.required else f"[{self.metavar}]") + ("..." if self.nargs != 1 else "")
            if self.metavar else usage(self))


HELP_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 120}


def shown(text: object) -> str:
    """Text for the terminal: control characters written out (it may come from a file) and Rich
    markup escaped. Everything the commands print that is not their own words goes through here."""
    return escape(visible(text))


err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=not err.is_terminal)


LABEL_WIDTH = 27      # the longest phase label ("tuning round 1 (best betas)"), so the bars line up


class EtaColumn(TimeRemainingColumn):
    """``eta 0:00:03`` while a phase runs; nothing once it is done (a finished bar showed ``eta 0:00:00``)."""

    def render(self, task):
        return Text("") if task.finished else Text.assemble("eta ", super().render(task))


class RichReporter:
    """Progress bars on stderr for each phase of a long job; silent with ``quiet``."""

    def __init__(self, quiet: bool = False, speaks: bool = True):
        """``speaks``: print warnings (the other ranks of a torchrun job leave them to rank 0)."""
        self.quiet, self.speaks = quiet, speaks
        self.progress = None
        self.task = None

    def start(self, phase: str, total: int | None = None) -> None:
        if self.quiet:
            return
        label = TextColumn(f"{{task.description:<{LABEL_WIDTH}}}")
        self.progress = Progress(label, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), EtaColumn(),
                                 console=err, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(shown(phase), total=total)

    def advance(self, n: int = 1) -> None:
        if self.progress is not None:
            self.progress.advance(self.task, n)

    def done(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def warn(self, message: str) -> None:
        if self.speaks:
            err.print(f"[yellow]warning:[/] {shown(message)}", soft_wrap=not err.is_terminal)

    def info(self, message: str) -> None:
        if self.speaks and not self.quiet:
            (self.progress.console if self.progress is not None else err).print(shown(message), soft_wrap=not err.is_terminal)


def speaks_for_job() -> bool:
    """False in the ranks other than 0 of a torchrun job: rank 0 alone prints for the job."""
    return os.environ.get("RANK", "0") == "0"


def parse_params(items: list[str] | None) -> dict[str, float]:
    """``["gamma=0.5"]`` -> ``{"gamma": 0.5}`` (--param)."""
    params = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        try:
            value = float(text)
        except ValueError:
            value = None
        if not sep or not name.strip().isidentifier() or value is None:
            raise ZipitError(f"--param {item!r} is not NAME=NUMBER", "write e.g. --param gamma=0.5")
        params[name.strip()] = value
    return params


def auto_or_float(value: str, option: str) -> float | None:
    """'auto' -> None (tune it); otherwise a number."""
    if value.strip().lower() == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise ZipitError(f"{option} {value!r} is neither a number nor 'auto'",
                         f"e.g. {option} 0.3 or {option} auto") from None


def parse_size(value: str | None, n_models: int) -> float | None:
    """--size X: a number (the range is checked with the other options); None when not given."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise ZipitError(f"--size {value!r} is not a number in [1, {n_models}]",
                         "give the merged model's parameters as a multiple of one source model") from None


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


@contextmanager
def user_errors(debug: bool):
    """Turn zipit's errors into one-line messages and exit code 2; tracebacks only with --debug."""
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield
    except ZipitError as exc:
        if debug:
            raise
        if not speaks_for_job():
            raise SystemExit(exc.exit_code) from None
        err.print(f"[bold red]error:[/] {shown(exc.message)}", soft_wrap=not err.is_terminal)
        if exc.hint:
            err.print(f"  [dim]hint:[/] {shown(exc.hint)}", soft_wrap=not err.is_terminal)
        raise SystemExit(exc.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        if not speaks_for_job():
            raise SystemExit(130) from None
        err.print("[bold red]interrupted[/]: nothing was written")
        raise SystemExit(130)
    except (SystemExit, MemoryError):
        raise
    except Exception as exc:  # a bug in zipit: say so, briefly
        if debug:
            raise
        if not speaks_for_job():
            raise SystemExit(1) from None
        err.print(f"[bold red]internal error:[/] {shown(exc.__class__.__name__)}: {shown(str(exc)[:300])}")
        err.print("  [dim]hint:[/] rerun with --debug for the traceback, and please report it")
        raise SystemExit(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
