"""Cost of label-free tuning: whole `zipit merge` with --alpha/--beta auto against fixed values, same run.

Usage: python bench/auto_vs_fixed.py [--num-calib 512] [--calib DIR] [--stop layer2]

Runs the zoo's ResNet-20 pair and its three-way split, each merged once with fixed
alpha 0.3, beta 0.125 and once with auto, as whole processes (start-up included).
Prints wall times, the tuning phase and the ratio auto/fixed (target: at most 3).
"""
from __future__ import annotations

import argparse
import json
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
    a = p.parse_args()
    print("| zoo | fixed (α 0.3, β 0.125) | auto | of which tuning | candidates scored | auto / fixed |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as d:
        for name, files in ZOOS.items():
            ckpts = [str(SHARED / "zoo" / f) for f in files]
            base = [sys.executable, "-m", "zipcli", "merge", *ckpts, "--arch", "resnet20", "--calib", a.calib,
                    "--num-calib", str(a.num_calib), "--stop", a.stop, "--quiet", "--json", "--force",
                    "-o", str(Path(d) / "out.safetensors")]
            fixed_wall, _, _ = timed(base + ["--alpha", "0.3", "--beta", "0.125"])
            auto_wall, _, out = timed(base + ["--alpha", "auto", "--beta", "auto"])
            summary = json.loads(out)
            tuning = summary["params"]["tuning"]
            print(f"| {name} | {fixed_wall:.1f} s | {auto_wall:.1f} s | {summary['timings'].get('tuning', 0):.1f} s "
                  f"| {len(tuning['candidates'])} | **{auto_wall / fixed_wall:.2f}** |", flush=True)


if __name__ == "__main__":
    main()
