"""Cost of the default (label-free choice of method, alpha and beta) against a fixed-value merge, same run.

Usage: python bench/auto_vs_fixed.py [--num-calib 512] [--calib DIR] [--stop layer2] [--repeat 3] [--zoos pair]

Runs the zoo's ResNet-20 pair and its three-way split, each merged with fixed values
(--method zipit --alpha 0.3 --beta 0.125) and with default options, as whole processes
(start-up included), alternating, --repeat times. Prints the median wall times, the tuning
phase, what tuning planned, and the ratio default/fixed (target for the pair: at most 1.5).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from merge_vs_floor import SHARED, timed

ZOOS = {
    "pair": ["r20x1_c10a_s1.pt", "r20x1_c10b_s2.pt"],
    "three-way": ["r20x1_c10x3a_s21.pt", "r20x1_c10x3b_s22.pt", "r20x1_c10x3c_s23.pt"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-calib", type=int, default=512)
    p.add_argument("--calib", default=str(SHARED / "datasets/cifar10/train"))
    p.add_argument("--stop", default="layer2")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--zoos", default=",".join(ZOOS), help="comma-separated: pair, three-way (default: both)")
    a = p.parse_args()
    print("| zoo | fixed (zipit α 0.3, β 0.125) | default | of which tuning | plan: held-out, rounds | default chose "
          "| default / fixed |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as d:
        for name, files in ((n, ZOOS[n]) for n in a.zoos.split(",")):
            ckpts = [str(SHARED / "zoo" / f) for f in files]
            base = [sys.executable, "-m", "zipcli", "merge", *ckpts, "--arch", "resnet20", "--calib", a.calib,
                    "--num-calib", str(a.num_calib), "--stop", a.stop, "--quiet", "--json", "--force",
                    "-o", str(Path(d) / "out.safetensors")]
            fixed, default = [], []
            for _ in range(a.repeat):
                fixed.append(timed(base + ["--method", "zipit", "--alpha", "0.3", "--beta", "0.125"])[0])
                wall, _, out = timed(base)
                default.append(wall)
            summary = json.loads(out)
            plan = summary["params"]["tuning"]["plan"]
            fixed_wall, auto_wall = statistics.median(fixed), statistics.median(default)
            print(f"| {name} | {fixed_wall:.1f} s | {auto_wall:.1f} s | {summary['timings'].get('tuning', 0):.1f} s "
                  f"| {plan['held_out_images']}, {plan['rounds']} | {summary['method']} "
                  f"| **{auto_wall / fixed_wall:.2f}** |", flush=True)

if __name__ == "__main__":
    main()
