"""The sweep as a picture: accuracy (or divergence) against compute, every point and the frontier.

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
    accuracy (or the label-free divergence); every point is marked by its method and labelled with its
    stop (``layer3@1.25`` at a size), and the frontier is drawn as a step line, so one picture shows
    what each cost buys."""
    check_plotting()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labelled = result.data is not None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    x = lambda p: p.macs / result.source_macs                                            # noqa: E731
    y = lambda p: p.accuracy["avg_task"] if labelled else p.divergence                  # noqa: E731
    for method in dict.fromkeys(p.method for p in result.points):
        points = [p for p in result.points if p.method == method]
        ax.plot([x(p) for p in points], [y(p) for p in points], marker="o", linestyle="none", label=method)
    for p in result.points:
        ax.annotate(p.stop if p.size is None else f"{p.stop}@{p.size:g}", (x(p), y(p)), fontsize=7, color="dimgrey",
                    xytext=(3, 3), textcoords="offset points")
    best = sorted((p for p in result.points if p.frontier), key=lambda p: (x(p), -y(p) if labelled else y(p)))
    if best:
        ax.step([x(p) for p in best], [y(p) for p in best], where="post", color="black", linewidth=1, alpha=0.6,
                label="frontier")
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
