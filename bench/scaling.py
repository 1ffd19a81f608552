"""Benchmark 4: how the whole `zipit merge` process grows with images, width and number of models.

Usage: python bench/scaling.py [--calib DIR] [--repeat 3] [--threads 1] [--only images,width,models]

Each merge runs as its own process (`python -m zipcli merge ... --json`, BN reset on, batch 64,
CPU, OMP_NUM_THREADS=--threads); its wall time and peak resident memory come from the kernel's
rusage of the child (as in bench/merge_vs_floor.py), its phase times from the --json summary.
Median of --repeat runs, after one untimed warm-up merge. One torch thread by default: on a small
machine shared with other jobs, torch's default threads spin against each other and the same merge
then varies by a factor of 2-4 between runs.

- images: the zoo's ResNet-20 pair with 64 ... 1024 calibration images;
- width: randomly initialised ResNet-20 x1, x2, x4 pairs (timing does not depend on the weights)
  at 256 images;
- models: 2, 3, 4 of the zoo's trained ResNet-20s (the three-way split, then the first of the
  pair) at 256 images.

Prints one markdown table per sweep, and for the image sweep a least-squares line through the
wall times, to show the growth is linear, with the peak memory alongside.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from merge_vs_floor import SHARED, timed

ZOO = SHARED / "zoo"
PHASES = ("load", "calibration", "matching", "zip", "batchnorm")


def merge(ckpts: list[Path], arch: str, images: int, calib: str, out: Path, repeat: int) -> dict:
    """Median wall time, peak RSS and phase times of `repeat` merges."""
    cmd = [sys.executable, "-m", "zipcli", "merge", *map(str, ckpts), "--arch", arch, "--calib", calib,
           "--num-calib", str(images), "--batch-size", "64", "--quiet", "--json", "-o", str(out), "--force"]
    runs = [timed(cmd) for _ in range(repeat)]
    summaries = [json.loads(stdout)["timings"] for _, _, stdout in runs]
    return {"wall": statistics.median(r[0] for r in runs), "rss": statistics.median(r[1] for r in runs),
            **{k: statistics.median(s.get(k, 0.0) for s in summaries) for k in PHASES},
            "images": json.loads(runs[0][2])["calibration"]["num_images"]}


def table(title: str, key: str, rows: list[tuple[str, dict]]) -> None:
    print(f"\n{title}\n")
    print(f"| {key} | whole process | peak RSS | " + " | ".join(PHASES) + " |")
    print("|" + " --- |" * (len(PHASES) + 3))
    for label, r in rows:
        phases = " | ".join(f"{r[k]:.2f}" for k in PHASES)
        print(f"| {label} | {r['wall']:.1f} s | {r['rss']:.0f} MiB | {phases} |")


def random_pair(arch: str, folder: Path) -> list[Path]:
    import torch

    from zipcli import load_spec
    from zipcli.specs.builders import build_model

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        paths.append(folder / f"{arch}_s{seed}.pt")
        torch.save(build_model(load_spec(arch), 10).state_dict(), paths[-1])
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib", default=str(SHARED / "datasets/cifar10/train"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", default="1", help="OMP_NUM_THREADS of the merges ('' leaves it alone)")
    p.add_argument("--only", default="images,width,models", help="comma-separated sweeps to run")
    a = p.parse_args()
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = a.threads               # inherited by the merge processes
    print(f"torch threads: {os.environ.get('OMP_NUM_THREADS', 'default')}")
    sweeps = a.only.split(",")
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.safetensors"
        # Untimed warm-up: reads every image any run uses into the page cache (the samples of a seed
        # are prefixes of one another), so no run pays for cold disk reads.
        merge([ZOO / "r20x1_c10a_s1.pt", ZOO / "r20x1_c10b_s2.pt"], "resnet20", 1024, a.calib, out, 1)
        if "images" in sweeps:
            pair = [ZOO / "r20x1_c10a_s1.pt", ZOO / "r20x1_c10b_s2.pt"]
            rows = [(str(n), merge(pair, "resnet20", n, a.calib, out, a.repeat))
                    for n in (64, 128, 256, 512, 1024)]
            table("(a) calibration images: zoo ResNet-20 x1 pair", "images", rows)
            n, wall = np.array([r["images"] for _, r in rows]), np.array([r["wall"] for _, r in rows])
            slope, intercept = np.polyfit(n, wall, 1)
            worst = np.abs(wall - (intercept + slope * n)).max()
            rss = [r["rss"] for _, r in rows]
            print(f"\nleast squares: wall = {intercept:.2f} s + {slope * 1000:.2f} ms/image "
                  f"(largest deviation {worst:.2f} s); peak RSS {min(rss):.0f}-{max(rss):.0f} MiB")
        if "width" in sweeps:
            rows = []
            for arch, label in (("resnet20", "×1"), ("resnet20x2", "×2"), ("resnet20x4", "×4")):
                rows.append((label, merge(random_pair(arch, Path(d)), arch, 256, a.calib, out, a.repeat)))
            table("(b) width: random-init ResNet-20 pairs, 256 images", "width", rows)
        if "models" in sweeps:
            zoo = [ZOO / f for f in ("r20x1_c10x3a_s21.pt", "r20x1_c10x3b_s22.pt", "r20x1_c10x3c_s23.pt",
                                     "r20x1_c10a_s1.pt")]
            rows = [(str(k), merge(zoo[:k], "resnet20", 256, a.calib, out, a.repeat)) for k in (2, 3, 4)]
            table("(c) number of models: zoo ResNet-20 x1, 256 images", "models", rows)


if __name__ == "__main__":
    main()
