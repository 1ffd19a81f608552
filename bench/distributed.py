"""Benchmark 6: the same `zipit merge` in 1 process and under torchrun in N processes (gloo, CPU).

Usage: python bench/distributed.py [--procs 2] [--num-calib 512] [--repeat 3] [--threads 1]
           [--method zipit|permute]

The zoo's ResNet-20 pair (../shared/zoo), calibrated on ../shared/datasets/cifar10/train with
default options otherwise (alpha and beta tuned unless --method permute). Each merge is a whole
process tree timed from outside (median of --repeat after one untimed warm-up); phase times come
from rank 0's --json summary, whose `collectives` is the time rank 0 spent in all-reduce,
broadcast and the failure check, waiting for the other ranks included (it overlaps the phases).
Also checks that the two files hold the same weights (largest absolute difference printed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"


def run(cmd: list[str], threads: int) -> tuple[float, dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--num-calib", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--method", default="zipit")
    args = ap.parse_args()
    zoo, calib = SHARED / "zoo", SHARED / "datasets" / "cifar10" / "train"
    with tempfile.TemporaryDirectory() as tmp:
        def merge(out: str) -> list[str]:
            return ["-m", "zipcli", "merge", str(zoo / "r20x1_c10a_s1.pt"), str(zoo / "r20x1_c10b_s2.pt"),
                    "--arch", "resnet20", "--calib", str(calib), "--num-calib", str(args.num_calib),
                    "--method", args.method, "-o", str(Path(tmp) / out), "--force", "--no-card", "--json", "-q"]

        commands = {
            "1 process": [sys.executable, *merge("one.safetensors")],
            f"{args.procs} processes (torchrun, gloo)": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                         "--nproc-per-node", str(args.procs),
                                                         *merge("many.safetensors")],
        }
        rows = {}
        for name, cmd in commands.items():
            run(cmd, args.threads)                                   # warm-up: page cache, imports
            runs = [run(cmd, args.threads) for _ in range(args.repeat)]
            rows[name] = (statistics.median(w for w, _ in runs), runs[-1][1])
        one, many = load_file(Path(tmp) / "one.safetensors"), load_file(Path(tmp) / "many.safetensors")
        gap = max(float((one[k].float() - many[k].float()).abs().max()) for k in one)
    phases = sorted({k for _, s in rows.values() for k in s["timings"]} - {"total"},
                    key=lambda k: list(rows["1 process"][1]["timings"]).index(k)
                    if k in rows["1 process"][1]["timings"] else 99)
    print(f"method {args.method}, {args.num_calib} images, OMP_NUM_THREADS={args.threads}, median of {args.repeat}\n")
    print("| run | whole command | " + " | ".join(phases) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in phases) + " |")
    base = rows["1 process"][0]
    for name, (wall, summary) in rows.items():
        t = summary["timings"]
        cells = [f"{t[k]:.2f}" if k in t else "–" for k in phases]
        print(f"| {name} | {wall:.1f} s ({wall / base:.2f}×) | " + " | ".join(cells) + " |")
    chosen = [{k: v for k, v in s["params"].items() if k != "tuning"} for _, s in rows.values()]
    print(f"\nsetting: 1 process {chosen[0]}, {args.procs} processes {chosen[1]}")
    print(f"largest absolute weight difference between the two files: {gap:.2e}")


if __name__ == "__main__":
    main()
