"""Benchmark 2: time of zipit greedy matching and of permute on correlations of real activations.

Usage: python bench/matching.py [--calib DIR] [--images 64] [--size 128] [--repeat 3] [--compare]

Correlations come from randomly initialised torchvision ResNet-50s run on calibration images:
the layer4 residual stream (2 models x 2048 features) and the layer2 stream (4 models x 512).
Prints a markdown table with the median (min-max) of --repeat runs for each case. --compare also
times the implementations they replaced (tests/reference_matching.py) in the same run, as the
machine is too noisy to compare seconds across runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from zipcli import load_spec
from zipcli.calibration import calibration_stream
from zipcli.specs.graph import ModelGraph
from zipcli.methods.permute import match_permute
from zipcli.methods.zipit import match_zipit
from zipcli.specs.builders import build_model
from zipcli import SilentReporter
from zipcli.checkpoints import load_sources
from zipcli.correlation import collect_correlations
from zipcli.specs import Preprocess

SHARED = Path(__file__).resolve().parents[2] / "shared"


def correlation(n_models: int, space: str, calib: str, images: int, size: int):
    spec = load_spec("resnet50")
    spec = dataclasses.replace(spec, input=Preprocess(size, size, spec.input.mean, spec.input.std))
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for seed in range(n_models):
            torch.manual_seed(seed)
            paths.append(Path(d) / f"m{seed}.pt")
            torch.save(build_model(spec, 10).state_dict(), paths[-1])
        sources = load_sources(paths, spec)
    plan = ModelGraph(spec, sources[0].model).plan("layer4")
    plan = dataclasses.replace(plan, merged_spaces=(space,))
    stream = calibration_stream(calib, spec.input, images, 0, 32)
    return collect_correlations([s.model for s in sources], spec, plan, stream, "cpu", SilentReporter())[space].correlation().numpy()


def timed(fn, repeat: int) -> str:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return f"{statistics.median(times):.3f} s ({min(times):.3f}-{max(times):.3f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib", default=str(SHARED / "datasets/cifar10/train"))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--compare", action="store_true", help="also time the replaced implementations")
    a = p.parse_args()
    methods = [("zipit (α 0.3, β 0.125)", lambda c, n: match_zipit(c, n, 0.3, 0.125)),
               ("permute", match_permute)]
    if a.compare:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from reference_matching import _reference_match_permute, _reference_match_zipit
        methods[1:1] = [("zipit before", lambda c, n: _reference_match_zipit(c, n, 0.3, 0.125))]
        methods.append(("permute before", _reference_match_permute))
    rows = []
    for n, space in ((2, "layer4.stream"), (4, "layer2.stream")):
        corr = correlation(n, space, a.calib, a.images, a.size)
        o = corr.shape[0] // n
        rows.append([f"{n} models × {o} features ({space})"] +
                    [timed(lambda: fn(corr, n), a.repeat) for _, fn in methods])
    print("| case | " + " | ".join(name for name, _ in methods) + " |")
    print("|" + " --- |" * (len(methods) + 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
