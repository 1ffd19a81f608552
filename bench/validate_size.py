"""Issue 29's validation: the size dial against the stops and the ensemble, on every pair.

Usage: python bench/validate_size.py [--pairs NAME,...] [--sizes 1.0,1.1,1.25,1.5] [--spreads greedy,...]
                                     [--num-calib 512] [--test-limit N]

For each pair the calibration images (../shared/datasets/cifar10/train, seeded) go through the sources
once. With default options otherwise (auto method, tuned alpha/beta, the refit, the BatchNorm reset), it
merges at every stop (VGG11: a subset, STOPS) and the full zip at each size, and scores every merge and
the ensemble (the sources side by side) on the test images, which the merge never sees. For each size,
the method and setting are decided once, at the default spread's widths, exactly as ``zipit merge
--size`` does; every other spread named then merges that point at its own widths (so a spread other
than the default is, if anything, handicapped by tuning done for another set of widths).
Prints one JSON line per merge and a table per pair.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from validate_default import PAIRS, SHARED, HERE, study_arguments
from zipcli.choosing import decide
from zipcli.evaluate import Ensemble, evaluate, labelled_batches, labelled_images
from zipcli.macs import count_macs
from zipcli.pipeline import Calibration, MergeOptions, merge_at
from zipcli.report import SilentReporter
from zipcli.sizing import SPREADS, allocate
from zipcli.specs import load_spec

SIZE_PAIRS = {**PAIRS, "vgg11": (HERE / "vgg11_c10a_s71.safetensors", HERE / "vgg11_c10b_s72.safetensors"),
              "vit": (HERE / "vit_c10a_s81.pt", HERE / "vit_c10b_s82.pt")}
ARCH = {"vgg11": "cifar_vgg11", "vit": "cifar_vit"}      # else resnet20
STOPS = {"cifar_vgg11": ("features.8", "features.13", "features.16", "features")}   # eight in all: the later half


def options(ap) -> None:
    ap.add_argument("--sizes", default="1.0,1.1,1.25,1.5")
    ap.add_argument("--spreads", default=SPREADS[0], help=f"comma-separated, of {', '.join(SPREADS)}")
    ap.add_argument("--no-stops", action="store_true", help="only the sizes (and the ensemble)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--table", nargs="+", default=None, metavar="LOG",
                    help="only print the table of earlier runs' JSON lines (a run cut short included)")


def main() -> None:
    args, pairs = study_arguments(__doc__, options, SIZE_PAIRS)
    if args.table:
        table([json.loads(line) for log in args.table for line in Path(log).read_text().splitlines()
               if line.startswith("{")])
        return
    torch.set_num_threads(args.threads)
    sizes = [float(x) for x in args.sizes.split(",")]
    spreads = args.spreads.split(",")
    rows = []
    for name, (a, b) in pairs.items():
        t0 = time.perf_counter()
        spec = load_spec(ARCH.get(name, "resnet20"))
        items = labelled_images(SHARED / "datasets/cifar10/test", args.test_limit)
        test = list(labelled_batches(items, spec.input, 500))
        full = spec.stops[-1]
        base = MergeOptions(num_calib=args.num_calib, stop=full)
        cal = Calibration([a, b], spec, SHARED / "datasets/cifar10/train", base, SilentReporter())
        cal.measure(full)
        names, classes = [s.checkpoint.name for s in cal.sources], [s.classes for s in cal.sources]
        sources = [s.model for s in cal.sources]
        one = sum(p.numel() for p in sources[0].parameters())

        def scored(label, model, extra) -> None:
            acc = evaluate(model, test, names, classes)
            row = {"pair": name, "point": label, "avg": acc["avg_task"], "joint": acc["joint"],
                   "params": sum(p.numel() for p in model.parameters()), "one": one,
                   "macs": count_macs(model, spec.input.shape), **extra}
            rows.append(row)
            print(json.dumps(row), flush=True)

        scored("ensemble", Ensemble(sources), {})
        for stop in () if args.no_stops else STOPS.get(spec.name, spec.stops):
            t = time.perf_counter()
            decision = decide(cal, replace(base, stop=stop))
            model = merge_at(cal, decision).model
            scored(stop, model, {"method": decision.point.method, "seconds": round(time.perf_counter() - t, 1)})
        for size in sizes:
            t = time.perf_counter()
            if not any(allocate(cal, full, size, spread).widths for spread in spreads):
                print(f"# {name}: size {size:g} keeps nothing apart: it is the full zip, the {full} row", flush=True)
                continue
            decision = decide(cal, replace(base, size=size))
            for spread in spreads:
                widths = allocate(cal, full, size, spread).widths
                model = merge_at(cal, replace(decision.point, widths=widths)).model
                scored(f"{full}@{size:g}", model, {"size": size, "spread": spread, "method": decision.point.method,
                                                   "widths": dict(widths),
                                                   "seconds": round(time.perf_counter() - t, 1)})
                t = time.perf_counter()
        print(f"# {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    table(rows)


def table(rows: list[dict]) -> None:
    """One line per merge, by pair and cost: accuracy beside its cost, and how far below the ensemble it lies."""
    print("\n| pair | merge | spread | method | avg | joint | ensemble − avg | params / one | MACs / one |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ensemble = {r["pair"]: r for r in rows if r["point"] == "ensemble"}
    order = list(ensemble)
    for r in sorted(rows, key=lambda r: (order.index(r["pair"]), -r["macs"] if r["point"] == "ensemble" else r["macs"])):
        e = ensemble[r["pair"]]
        one_macs = e["macs"] / 2
        print(f"| {r['pair']} | {r['point']} | {r.get('spread', '')} | {r.get('method', '')} | {r['avg']:.4f} | "
              f"{r['joint']:.4f} | {e['avg'] - r['avg']:+.4f} | {r['params'] / r['one']:.3f} | "
              f"{r['macs'] / one_macs:.3f} |")


if __name__ == "__main__":
    main()
