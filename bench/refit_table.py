"""Issue 15's table: on every pair, at every stop, permute and zipit, each with and without the refit.

Usage: python bench/refit_table.py [--pairs NAME,...] [--extra DIR] [--num-calib 512] [--test-limit N]

Pairs: those of bench/validate_default.py (the zoo pair, the three pairs of the three-way zoo, and the
pairs trained for issue 18 in --extra, see docs/tuning.md). The calibration images
(../shared/datasets/cifar10/train) go through the sources once per pair; each cell merges with
`MergeOptions(method=..., alpha=0.3, beta=0.125, refit=...)` (zipit at the paper's values) and scores
average per-task and joint accuracy on the test images (all 10,000 by default), beside the sources'
ensemble. Prints one JSON line per (pair, stop) and a markdown table.
"""
from __future__ import annotations

import json
import time


from zipcli.evaluate import Ensemble, evaluate, labelled_batches, labelled_images
from zipcli.pipeline import Calibration, MergeOptions, MergePoint, merge_at
from zipcli.report import SilentReporter
from zipcli.specs import load_spec
from zipcli.tuning import FALLBACK, Setting

from validate_default import SHARED, study_arguments

CELLS = [("permute", "none"), ("permute", "lsq"), ("zipit", "none"), ("zipit", "lsq")]


def main() -> None:
    args, pairs = study_arguments(__doc__)
    spec = load_spec("resnet20")
    test = list(labelled_batches(labelled_images(SHARED / "datasets/cifar10/test", args.test_limit), spec.input, 500))
    rows = []
    for name, (a, b) in pairs.items():
        t0 = time.perf_counter()
        base = MergeOptions(num_calib=args.num_calib, stop="layer3", method="permute")
        cal = Calibration([a, b], spec, SHARED / "datasets/cifar10/train", base, SilentReporter(), hold_out=False)
        cal.measure("layer3")
        names, classes = [s.checkpoint.name for s in cal.sources], [s.classes for s in cal.sources]
        ensemble = evaluate(Ensemble([s.model for s in cal.sources]), test, names, classes)
        for stop in spec.stops:
            row = {"pair": name, "stop": stop, "ensemble": {"avg": ensemble["avg_task"], "joint": ensemble["joint"]}}
            for method, refit in CELLS:
                t = time.perf_counter()
                result = merge_at(cal, MergePoint(stop, method, Setting(*FALLBACK), refit))
                seconds = time.perf_counter() - t
                acc = evaluate(result.model, test, names, classes)
                row[f"{method}+{refit}"] = {"avg": acc["avg_task"], "joint": acc["joint"], "merge_s": round(seconds, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(f"# {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    table(rows)


def table(rows: list[dict]) -> None:
    print("\n| pair | stop | permute | permute + refit | zipit 0.3/0.125 | zipit + refit | refit gain over best without "
          "| ensemble |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [r[f"{m}+{f}"] for m, f in CELLS]
        best_without = max(cells[0]["avg"], cells[2]["avg"])
        best_with = max(cells[1]["avg"], cells[3]["avg"])
        shown = " | ".join(f"{c['avg']:.4f} / {c['joint']:.4f}" for c in cells)
        print(f"| {r['pair']} | {r['stop']} | {shown} | {best_with - best_without:+.4f} | "
              f"{r['ensemble']['avg']:.4f} / {r['ensemble']['joint']:.4f} |")


if __name__ == "__main__":
    main()
