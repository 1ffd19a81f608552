"""The sweep as a picture: accuracy (or divergence) against compute, one line per method.

matplotlib is optional (``pip install matplotlib``); nothing else in zipit needs it.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import ZipitError
from .merged import write_atomic
from .sweep import SweepResult


def check_plotting() -> None:
    """Fail before any work when the plot cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ZipitError("a plot (--plot) needs matplotlib", 'install it: pip install matplotlib')


def plot_sweep(result: SweepResult, path: str | Path, force: bool = False) -> None:
    """Write a PNG: x is MACs relative to running the sources side by side, y is average per-task
    accuracy (or the label-free divergence), each point marked with its stop."""
    check_plotting()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labelled = result.data is not None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in dict.fromkeys(p.method for p in result.points):
        points = sorted((p for p in result.points if p.method == method), key=lambda p: p.macs)
        xs = [p.macs / result.source_macs for p in points]
        ys = [p.accuracy["avg_task"] if labelled else p.divergence for p in points]
        ax.plot(xs, ys, marker="o", label=method)
    for stop, macs in {p.stop: p.macs for p in result.points}.items():     # every method cuts a stop alike
        x = macs / result.source_macs
        ax.axvline(x, linestyle=":", color="grey", linewidth=0.8)
        ax.text(x, 0.02, f" {stop}", transform=ax.get_xaxis_transform(), rotation=90, fontsize=8, color="grey",
                va="bottom", ha="right")
    if labelled and result.reference is not None:
        ax.plot([1.0], [result.reference["avg_task"]], marker="*", markersize=12, linestyle="none", color="black",
                label="sources side by side")
    ax.set_xlabel("MACs per image, relative to running the sources side by side")
    ax.set_ylabel("average per-task accuracy" if labelled else "divergence from the sources (lower is better)")
    ax.set_title(f"zipit sweep: {result.spec}, "
                 f"{'accuracy on ' + Path(result.data).name if labelled else 'label-free score'}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png"), force, suffix=".png")
    finally:
        plt.close(fig)
