"""Issue 18's validation: on every pair, at every stop, the default against permute and the paper's values.

Usage: python bench/validate_default.py [--pairs NAME,...] [--extra DIR] [--num-calib 512] [--test-limit N]

Pairs: the zoo pair, the three pairs of the three-way zoo (../shared/zoo), and the pairs trained
for this issue in --extra (see docs/tuning.md for how to recreate them). For each pair the
calibration images (../shared/datasets/cifar10/train) go through the sources once; at each stop it
makes the default's choice exactly as `zipit merge` does (its tuning plan, zipit's tuned setting, and the
paired-bootstrap interval of zipit - permute on the held-out calibration images), then merges (a) the
default, (b) zipit with the tuned setting, (c) permute, (d) zipit with the paper's 0.3/0.125, and scores
each on the test images (never seen by the merge). Prints one JSON line per (pair, stop) and a table.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from zipcli.evaluate import evaluate, labelled_batches, labelled_images
from zipcli.choosing import decide
from zipcli.pipeline import Calibration, MergeOptions, MergePoint, merge_at
from zipcli.report import SilentReporter
from zipcli.specs import load_spec
from zipcli.tuning import FALLBACK, Setting

SHARED = Path(__file__).resolve().parents[2] / "shared"
ZOO = SHARED / "zoo"
HERE = Path(__file__).resolve().parent / "zoo"      # pairs trained in session 10 (bench/zoo/README.md)
PAIRS = {
    "zoo a+b": (ZOO / "r20x1_c10a_s1.pt", ZOO / "r20x1_c10b_s2.pt"),
    "x3 a+b": (ZOO / "r20x1_c10x3a_s21.pt", ZOO / "r20x1_c10x3b_s22.pt"),
    "x3 a+c": (ZOO / "r20x1_c10x3a_s21.pt", ZOO / "r20x1_c10x3c_s23.pt"),
    "x3 b+c": (ZOO / "r20x1_c10x3b_s22.pt", ZOO / "r20x1_c10x3c_s23.pt"),
    "r+s": (ZOO / "r20x1_c10r_s41.pt", ZOO / "r20x1_c10s_s42.pt"),
    "u+v": (HERE / "r20x1_c10u_s51.pt", HERE / "r20x1_c10v_s52.pt"),
    "w+x": (HERE / "r20x1_c10w_s61.pt", HERE / "r20x1_c10x_s62.pt"),
}
EXTRA = {"p+q": ("r20x1_c10p_s31.pt", "r20x1_c10q_s32.pt")}     # trained in session 6, kept outside the repo


def study_arguments(doc: str, more=None,
                    pairs: dict | None = None) -> tuple[argparse.Namespace, dict[str, tuple[Path, Path]]]:
    """The options every pair study takes, and the pairs they select (the extra ones where trained);
    ``more`` adds a study's own options to the parser, ``pairs`` replaces the default pairs."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if more is not None:
        more(ap)
    ap.add_argument("--pairs", default=None, help="comma-separated names (default: all found)")
    ap.add_argument("--extra", default="/work/zoo-extra")
    ap.add_argument("--num-calib", type=int, default=512)
    ap.add_argument("--test-limit", type=int, default=None, help="test images per class (default: all 1000)")
    args = ap.parse_args()
    pairs = dict(PAIRS if pairs is None else pairs)
    pairs.update({k: (Path(args.extra) / a, Path(args.extra) / b) for k, (a, b) in EXTRA.items()
                  if (Path(args.extra) / a).is_file() and (Path(args.extra) / b).is_file()})
    if args.pairs:
        pairs = {k: pairs[k] for k in args.pairs.split(",")}
    return args, pairs


def main() -> None:
    args, pairs = study_arguments(__doc__)
    spec = load_spec("resnet20")
    items = labelled_images(SHARED / "datasets/cifar10/test", args.test_limit)
    test = list(labelled_batches(items, spec.input, 500))
    rows = []
    for name, (a, b) in pairs.items():
        t0 = time.perf_counter()
        base = MergeOptions(num_calib=args.num_calib, stop="layer3")
        cal = Calibration([a, b], spec, SHARED / "datasets/cifar10/train", base, SilentReporter())
        cal.measure("layer3")
        names, classes = [s.checkpoint.name for s in cal.sources], [s.classes for s in cal.sources]
        for stop in spec.stops:
            row = {"pair": name, "stop": stop}
            decision = decide(cal, replace(base, stop=stop))     # exactly what a default merge does
            setting, method, choice = decision.point.setting, decision.point.method, decision.choice.to_metadata()
            runs = {"default": (method, setting), "zipit tuned": ("zipit", setting),
                    "permute": ("permute", Setting(*FALLBACK)), "paper": ("zipit", Setting(*FALLBACK))}
            runs.update({"default + refit": (method, setting), "permute + refit": ("permute", Setting(*FALLBACK))})
            for label, (m, s) in runs.items():
                point = MergePoint(stop, m, s, "lsq" if label.endswith("refit") else "none")
                acc = evaluate(merge_at(cal, point).model, test, names, classes)
                row[label] = {"method": m, "avg": acc["avg_task"], "joint": acc["joint"],
                              **({"alpha": s.alpha, "beta": s.beta} if m == "zipit" else {})}
            row["choice"], row["plan"] = choice, decision.tuning.plan.to_metadata()
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(f"# {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    table(rows)


def table(rows: list[dict]) -> None:
    """The default (what ``zipit merge`` chose, and its evidence) beside tuned zipit, permute and the
    paper's values."""
    print("\n| pair | stop | default: pick, avg (− permute) | zipit tuned (α/β) | permute | paper 0.3/0.125 | "
          "default + refit | permute + refit | held-out, rounds | divergence zipit − permute [interval], images behind it |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        c, d, z = r["choice"], r["default"], r["zipit tuned"]
        evidence = (f"{c['difference']:+.4f} [{c['interval'][0]:+.4f}, {c['interval'][1]:+.4f}] "
                    f"({c.get('level', 0.95) * 100:g}%), {c['held_out_images']}" if "interval" in c else c["reason"])
        print(f"| {r['pair']} | {r['stop']} | {d['method']}, {d['avg']:.4f} ({d['avg'] - r['permute']['avg']:+.4f}) | "
              f"{z['avg']:.4f} ({z['alpha']:g}/{z['beta']:g}) | {r['permute']['avg']:.4f} | {r['paper']['avg']:.4f} | "
              f"{r['default + refit']['avg']:.4f} | {r['permute + refit']['avg']:.4f} | "
              f"{r['plan']['held_out_images']}, {r['plan']['rounds']} | {evidence} |")

if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
