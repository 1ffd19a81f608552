"""Issue 27: more unlabelled data must never make the default merge worse.

Usage: python bench/more_data.py [--pairs u+v,w+x,r+s,vgg] [--sizes 128,256,512,1024,2048]
           [--test-limit N]

For each pair and each calibration size, the sources are calibrated once on that many train images
(../shared/datasets/cifar10/train, seed 0), and two stops are merged with default options (the
default's own choice of method, the refit on) and, beside them, with `--method permute --refit none`
(a fixed-value figure). Each merge is scored on the test images, never seen by a merge. Prints one
JSON line per (pair, size, stop) and a table of average per-task / joint accuracy.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from zipcli.choosing import decide
from zipcli.evaluate import evaluate, labelled_batches, labelled_images
from zipcli.pipeline import Calibration, MergeOptions, MergePoint, merge_at
from zipcli.report import SilentReporter
from zipcli.specs import load_spec
from zipcli.tuning import FALLBACK, Setting

from validate_default import PAIRS, SHARED, HERE

STUDY = {   # name: (checkpoints, spec, an earlier stop, full zip)
    "u+v": (PAIRS["u+v"], "resnet20", "layer1", "layer3"),
    "w+x": (PAIRS["w+x"], "resnet20", "layer1", "layer3"),
    "r+s": (PAIRS["r+s"], "resnet20", "layer1", "layer3"),
    "zoo a+b": (PAIRS["zoo a+b"], "resnet20", "layer1", "layer3"),
    "vgg": ((HERE / "vgg11_c10a_s71.safetensors", HERE / "vgg11_c10b_s72.safetensors"), "cifar_vgg11",
            "features.8", "features"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="u+v,w+x,r+s,vgg")
    ap.add_argument("--sizes", default="128,256,512,1024,2048")
    ap.add_argument("--test-limit", type=int, default=None, help="test images per class (default: all 1000)")
    args = ap.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    rows = []
    for name in args.pairs.split(","):
        paths, arch, early, full = STUDY[name]
        spec = load_spec(arch)
        test = list(labelled_batches(labelled_images(SHARED / "datasets/cifar10/test", args.test_limit),
                                     spec.input, 500))
        for n in sizes:
            t0 = time.perf_counter()
            base = MergeOptions(num_calib=n, stop=full)
            cal = Calibration(list(paths), spec, SHARED / "datasets/cifar10/train", base, SilentReporter())
            cal.measure(full)
            names, classes = [s.checkpoint.name for s in cal.sources], [s.classes for s in cal.sources]
            for stop in (early, full):
                decision = decide(cal, replace(base, stop=stop))       # what a default merge does
                default = merge_at(cal, decision.point)
                plain = merge_at(cal, MergePoint(stop, "permute", Setting(*FALLBACK), "none"))
                row = {"pair": name, "images": n, "stop": stop, "method": decision.point.method,
                       "refit_images": default.metadata["params"]["refit"]["images"]}
                for label, result in (("default", default), ("permute, no refit", plain)):
                    acc = evaluate(result.model, test, names, classes)
                    row[label] = {"avg": acc["avg_task"], "joint": acc["joint"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
            print(f"# {name}, {n} images: {time.perf_counter() - t0:.0f} s", flush=True)
    table(rows, sizes)


def table(rows: list[dict], sizes: list[int]) -> None:
    print("\n| pair | stop | " + " | ".join(f"{n} images" for n in sizes) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in sizes) + " |")
    cells: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        cells.setdefault((r["pair"], r["stop"]), {})[r["images"]] = r
    for (pair, stop), by_n in cells.items():
        shown = []
        for n in sizes:
            r = by_n.get(n)
            shown.append("" if r is None else f"{r['default']['avg']:.4f} / {r['default']['joint']:.4f} "
                         f"({r['method']}; permute, no refit {r['permute, no refit']['avg']:.4f})")
        print(f"| {pair} | {stop} | " + " | ".join(shown) + " |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
