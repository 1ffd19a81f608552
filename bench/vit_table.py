"""Issue 30's table: the trained ViT pair at every stop, permute and zipit, each with and without the refit.

Usage: python bench/vit_table.py [--num-calib 512] [--test-limit N]

The pair is bench/zoo/vit_c10a_s81.pt + vit_c10b_s82.pt (two `cifar_vit`s from different seeds on the
two halves of CIFAR-10, bench/zoo/README.md). The calibration images (../shared/datasets/cifar10/train)
go through the sources once; each cell merges with `MergeOptions(method=..., alpha=0.3, beta=0.125,
refit=...)` and scores average per-task and joint accuracy on the test images (all 10,000 by default;
--test-limit N takes a seeded N per class), beside the sources' ensemble. Prints one JSON line per stop
and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from zipcli.evaluate import Ensemble, evaluate, labelled_batches, labelled_images
from zipcli.pipeline import Calibration, MergeOptions, MergePoint, merge_at
from zipcli.report import SilentReporter
from zipcli.specs import load_spec
from zipcli.tuning import FALLBACK, Setting

from refit_table import CELLS, table

SHARED = Path(__file__).resolve().parents[2] / "shared"
ZOO = Path(__file__).resolve().parent / "zoo"
PAIR = (ZOO / "vit_c10a_s81.pt", ZOO / "vit_c10b_s82.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-calib", type=int, default=512)
    ap.add_argument("--test-limit", type=int, default=None, help="test images per class (default: all)")
    args = ap.parse_args()
    spec = load_spec("cifar_vit")
    test = list(labelled_batches(labelled_images(SHARED / "datasets/cifar10/test", args.test_limit), spec.input, 500))
    t0 = time.perf_counter()
    base = MergeOptions(num_calib=args.num_calib, stop=spec.default_stop, method="permute")
    cal = Calibration(list(PAIR), spec, SHARED / "datasets/cifar10/train", base, SilentReporter(), hold_out=False)
    cal.measure(spec.default_stop)
    names, classes = [s.checkpoint.name for s in cal.sources], [s.classes for s in cal.sources]
    ensemble = evaluate(Ensemble([s.model for s in cal.sources]), test, names, classes)
    rows = []
    for stop in spec.stops:
        row = {"pair": "vit a+b", "stop": stop, "ensemble": {"avg": ensemble["avg_task"], "joint": ensemble["joint"]}}
        for method, refit in CELLS:
            t = time.perf_counter()
            result = merge_at(cal, MergePoint(stop, method, Setting(*FALLBACK), refit))
            seconds = time.perf_counter() - t
            acc = evaluate(result.model, test, names, classes)
            row[f"{method}+{refit}"] = {"avg": acc["avg_task"], "joint": acc["joint"], "merge_s": round(seconds, 2)}
            print(json.dumps({"stop": stop, "cell": f"{method}+{refit}", **row[f"{method}+{refit}"]}), flush=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"# {time.perf_counter() - t0:.0f} s, {sum(len(b[1]) for b in test)} test images", flush=True)
    table(rows)


if __name__ == "__main__":
    main()
