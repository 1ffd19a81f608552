"""Benchmark 1 (and 3): whole `zipit merge` processes against the forward-pass floor, same run.

Usage: python bench/merge_vs_floor.py [--arch resnet50] [--num-calib 256] [--batch-size 64]
           [--calib DIR] [--zoo] [--plain] [--skip-default] [--skip-fixed]

Without --zoo, two randomly initialised models of --arch are written to a temporary folder (timing
does not depend on the weights). With --zoo, the zoo's ResNet-20 pair is used. Prints the phase
times of two merges (from their --json summaries): with default options, and with fixed values
(--method zipit --alpha 0.3 --beta 0.125), both with the refit (the default), and with --plain a
third with those values and --refit none; the floor's; each ratio; and peak resident memory of each process (from the kernel's
rusage of the child) next to the size of the input checkpoints.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared"


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (MiB) of the child, and its stdout."""
    t = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode:
            sys.exit(f"failed: {' '.join(cmd)}\n{err.read()}")
        return wall, usage.ru_maxrss / 1024, out.read()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--calib", default=str(SHARED / "datasets/cifar10/train"))
    p.add_argument("--zoo", action="store_true", help="merge the zoo's ResNet-20 pair instead")
    p.add_argument("--no-reset-bn", action="store_true")
    p.add_argument("--plain", action="store_true", help="also time the fixed-value merge with --refit none")
    p.add_argument("--skip-default", action="store_true", help="time only the fixed-value merges")
    p.add_argument("--skip-fixed", action="store_true", help="skip the fixed-value merge with the refit")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        if a.zoo:
            ckpts = [str(SHARED / "zoo/r20x1_c10a_s1.pt"), str(SHARED / "zoo/r20x1_c10b_s2.pt")]
            a.arch = "resnet20"
        else:
            import torch
            from zipcli import load_spec
            from zipcli.specs.builders import build_model
            ckpts = []
            for seed in (1, 2):
                torch.manual_seed(seed)
                path = Path(d) / f"m{seed}.pt"
                torch.save(build_model(load_spec(a.arch), 1000).state_dict(), path)
                ckpts.append(str(path))
        size_mib = sum(os.path.getsize(c) for c in ckpts) / 2**20
        common = ["--calib", a.calib, "--num-calib", str(a.num_calib), "--batch-size", str(a.batch_size)]
        floor_cmd = [sys.executable, str(HERE / "floor.py"), "--arch", a.arch, *common, *ckpts]
        merge_cmd = [sys.executable, "-m", "zipcli", "merge", *ckpts, "--arch", a.arch, *common, "--quiet",
                     "--json", "-o", str(Path(d) / "out.safetensors"), "--force"]
        if a.no_reset_bn:
            merge_cmd.append("--no-reset-bn")
        fixed_cmd = merge_cmd + ["--method", "zipit", "--alpha", "0.3", "--beta", "0.125"]
        floor_wall, floor_mem, floor_out = timed(floor_cmd)
        runs = [] if a.skip_default else [("default", *timed(merge_cmd))]
        if not a.skip_fixed:
            runs.append(("fixed", *timed(fixed_cmd)))
        if a.plain:
            runs.append(("fixed, --refit none", *timed(fixed_cmd + ["--refit", "none"])))
    floor = json.loads(floor_out)
    print(f"{a.arch}: {a.num_calib} images, batch {a.batch_size}, reset BN {not a.no_reset_bn}, torch threads "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"floor  {floor_wall:7.1f} s  (start-up+load {floor['startup_and_load']:.1f}, decode {floor['decode']:.1f}, "
          f"forward {floor['forward']:.1f})  peak RSS {floor_mem:.0f} MiB")
    for label, wall, mem, out in runs:
        merge = json.loads(out)
        phases = ", ".join(f"{k} {v:.1f}" for k, v in merge["timings"].items() if k != "total")
        chose = merge["method"] + ("" if "choice" not in merge["params"] else
                                   f" ({merge['params']['choice'].get('reason') or 'on held-out evidence'})")
        refit = merge["params"].get("refit")
        refitted = "" if not refit else f", refit {refit['layers']} layers on {refit['images']} images"
        print(f"merge ({label}: {chose}{refitted})  {wall:7.1f} s  (in-process {merge['timings']['total']:.1f}: "
              f"{phases})  peak RSS {mem:.0f} MiB;  merge/floor {wall / floor_wall:.2f}")
    print(f"input checkpoints {size_mib:.0f} MiB")

if __name__ == "__main__":
    main()
