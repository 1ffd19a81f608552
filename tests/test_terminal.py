"""What a newcomer sees in an 80- or 100-column terminal: help without Python types, text that wraps on words."""
from __future__ import annotations

import io
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

import zipcli.cli
import zipcli.cli_specs
import zipcli.console
from zipcli.cli import app

from conftest import make_images, resnet20_pair

runner = CliRunner()
COMMANDS = [[], ["merge"], ["inspect"], ["eval"], ["sweep"], ["export"], ["specs"], ["specs", "trace"], ["specs", "check"],
            ["specs", "list"]]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PYTHON_TYPES = re.compile(r"<(bool|str|int|float|path|list\[[^\]]*\])>|\{\w+\}")


@pytest.mark.parametrize("width", [80, 100])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "zipit")
def test_help_fits_the_terminal_and_shows_no_python_types(command, width, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(width))
    r = runner.invoke(app, [*command, "--help"])
    assert r.exit_code == 0, r.output
    assert not PYTHON_TYPES.search(r.output), PYTHON_TYPES.search(r.output).group(0)
    assert max(len(line) for line in r.output.splitlines()) <= width
    if command == ["merge"]:
        assert "specs list" in r.output and "--trust-builder MODULE" in r.output
        assert re.search(r"--augment\s+Random", r.output)          # a flag has no metavar


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("term")
    calib = make_images(root / "calib", 40, 32, seed=2)
    data = make_images(root / "data", 3, 32, seed=4, classes=["a0", "a1", "b0", "b1", "b2"])
    a, b = resnet20_pair(root, calib)
    return {"root": root, "a": a, "b": b, "calib": calib, "data": data}


def _render(args, width: int, monkeypatch) -> str:
    """The command's stdout and stderr as a terminal of ``width`` columns would show them."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=True, no_color=True, highlight=False,
                      color_system=None)
    for module in (zipcli.console, zipcli.cli, zipcli.cli_specs):
        for name in ("err", "out"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, console)
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    lines = []
    for line in (buffer.getvalue() + r.stdout).splitlines():
        line = line.rsplit("\x1b[2K", 1)[-1]              # a live progress bar: its last frame
        lines.append(ANSI.sub("", line))
    return "\n".join(lines)


def _words(text: str) -> set[str]:
    """Words of the text; box lines and progress-bar glyphs (a bar's half cells depend on timing) split them."""
    return {w for w in re.split(r"[\s│┃━─╸╺╇┏┓┗┛╭╮╰╯|]+", text) if w}


def test_every_command_wraps_on_words_at_80_and_100_columns(files, tmp_path, monkeypatch):
    monkeypatch.chdir(files["root"])
    merged = "m.safetensors"
    commands = [
        ["merge", "A.pt", "B.pt", "--arch", "resnet20", "--calib", "calib", "--stop", "layer2", "-o", merged,
         "--num-calib", "24", "--alpha", "0.5", "--force"],
        ["inspect", merged],
        ["eval", merged, "A.pt", "B.pt", "--arch", "resnet20", "--data", "data"],
        ["sweep", "A.pt", "B.pt", "--arch", "resnet20", "--calib", "calib", "--num-calib", "24", "--alpha", "0.5",
         "--beta", "0.125", "--data", "data", "--stop", "layer1"],
        ["specs", "check", "resnet20", "--size", "32"],
        ["specs", "list"],
    ]
    for args in commands:
        wide = _render(args, 1000, monkeypatch)
        reference = _words(wide)
        for width in (80, 100):
            text = _render(args, width, monkeypatch)
            lines = text.splitlines()
            assert max(len(line) for line in lines) <= width, (args, width)
            # timings and progress counts ("0.4s,", "16/24") differ from run to run, so they are not compared
            split = sorted(w for w in _words(text)
                           if w not in reference and not re.fullmatch(r"\(?[\d:./-]+s?[,)]*", w))
            assert not split, (args, width, split[:5])       # a fragment of a word is no word of the reference


def test_specs_list_marks_the_default_stop_without_styles():
    r = runner.invoke(app, ["specs", "list"])           # piped: no bold to see
    row = next(line for line in r.output.splitlines() if line.strip().startswith("resnet20 "))
    assert "layer3*" in row and "layer1*" not in row


def test_finished_bars_show_no_eta_and_the_bars_line_up(monkeypatch):
    buffer = io.StringIO()
    console = Console(file=buffer, width=100, force_terminal=True, no_color=True, color_system=None)
    monkeypatch.setattr(zipcli.console, "err", console)
    reporter = zipcli.console.RichReporter()
    for label in ("calibration", "tuning round 1 (best betas)"):
        reporter.start(label, 4)
        reporter.advance(4)
        reporter.done()
    lines = [ANSI.sub("", line.rsplit("\x1b[2K", 1)[-1]) for line in buffer.getvalue().splitlines()]
    finished = [line for line in lines if "4/4" in line]
    assert len(finished) >= 2 and not any(re.search(r"\beta\b", line) for line in finished), finished
    assert len({line.index("4/4") for line in finished}) == 1, finished       # one column for every label
