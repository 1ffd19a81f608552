"""Accuracy of average / permute / zipit at every stop on a zoo of checkpoints.

Usage: python scripts/accuracy_table.py CKPT CKPT [CKPT ...] [--calib DIR] [--test DIR]
           [--num-calib 512] [--alpha auto] [--beta auto] [--methods average,permute,zipit]

Protocol (the core merge issue): calibration images drawn at random (seed 0)
from the train folder, no augmentation, BatchNorm reset on the same images,
every test image. Prints a Markdown table: per-head accuracy on its own
classes, their average, and joint accuracy. zipit runs with zipit's defaults
(α and β chosen without labels) unless --alpha/--beta are given; the row
names the values used.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from zipcli import MergeOptions, load_spec, merge
from zipcli.evaluate import Ensemble, evaluate, labelled_batches, labelled_images
from zipcli.checkpoints import load_sources

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--calib", default=str(SHARED / "datasets/cifar10/train"))
    p.add_argument("--test", default=str(SHARED / "datasets/cifar10/test"))
    p.add_argument("--num-calib", type=int, default=512)
    p.add_argument("--alpha", default="auto")
    p.add_argument("--beta", default="auto")
    p.add_argument("--methods", default="average,permute,zipit")
    p.add_argument("--stops", default=None)
    p.add_argument("--limit", type=int, default=None, help="test images per class (default: all)")
    a = p.parse_args()
    torch.manual_seed(0)
    spec = load_spec(a.arch)
    sources = load_sources(a.checkpoints, spec)
    names = [s.checkpoint.name for s in sources]
    classes = [s.classes for s in sources]
    t = time.time()
    test = list(labelled_batches(labelled_images(a.test, a.limit), spec.input, 500))
    print(f"decoded {sum(len(y) for _, y in test)} test images in {time.time() - t:.1f}s", file=sys.stderr)

    def row(label, stop, model, heads_classes):
        r = evaluate(model, test, names, heads_classes)
        accs = " | ".join(f"{h['accuracy']:.4f}" for h in r["heads"])
        print(f"| {label} | {stop} | {accs} | {r['avg_task']:.4f} | {r['joint']:.4f} |", flush=True)

    head_cols = " | ".join(f"head {n}" for n in names)
    print(f"| method | stop | {head_cols} | avg task | joint |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " | --- | --- |")
    row("the source models, run separately (ensemble)", "–", Ensemble([s.model for s in sources]), classes)
    for method in a.methods.split(","):
        for stop in (a.stops.split(",") if a.stops else spec.stops):
            options = MergeOptions(method=method, alpha=_value(a.alpha), beta=_value(a.beta), stop=stop,
                                   num_calib=a.num_calib, seed=0)
            t = time.time()
            result = merge(a.checkpoints, spec, a.calib, options)
            params = result.metadata["params"]
            label = method
            if method == "zipit":
                how = "auto: " if "tuning" in params else ""
                label = f"zipit ({how}α {params['alpha']:g}, β {params['beta']:g})"
            row(label, stop, result.model, [h.classes for h in result.model.heads])
            print(f"  merged {method}@{stop} in {time.time() - t:.1f}s", file=sys.stderr)


def _value(text: str) -> float | None:
    return None if text == "auto" else float(text)


if __name__ == "__main__":
    main()
