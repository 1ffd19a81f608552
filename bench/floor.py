"""The unavoidable floor of a merge: decode and preprocess the calibration images and run them
through every input model once. Run as its own process, like ``zipit merge``.

Usage: python bench/floor.py --arch resnet50 --calib DIR --num-calib 256 --batch-size 64 CKPT CKPT ...
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from zipcli import load_spec
from zipcli.calibration import calibration_stream
from zipcli.checkpoints import load_sources


def main() -> None:
    t0 = time.perf_counter()
    p = argparse.ArgumentParser()
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--arch", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--num-calib", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    spec = load_spec(a.arch)
    models = [s.model for s in load_sources(a.checkpoints, spec)]
    t1 = time.perf_counter()
    stream = calibration_stream(a.calib, spec.input, a.num_calib, 0, a.batch_size)
    decode = forward = 0.0
    with torch.no_grad():
        t = time.perf_counter()
        for x in stream.batches():
            decode += time.perf_counter() - t
            t = time.perf_counter()
            for m in models:
                m(x)
            forward += time.perf_counter() - t
            t = time.perf_counter()
    print(json.dumps({"startup_and_load": t1 - t0, "decode": decode, "forward": forward,
                      "total": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
