"""Does the label-free tuning score rank zipit's (alpha, beta) settings the way test accuracy does?

Usage: python scripts/tuning_study.py CKPT CKPT [CKPT ...] [--arch resnet20] [--calib DIR]
           [--test DIR] [--num-calib 512] [--stops layer1,layer2,layer3] [--limit N]

For every stop, runs the auto merge's own stages once (MergeJob: calibration on
the fit images, held-out split, BN subset), then for every candidate setting
prints the label-free score the tuner sees (held-out top-1 agreement) and two
alternatives (mean KL divergence from the source, and agreement of the joint
prediction), next to the test accuracy of the final model built with that
setting. Test images are used only for the accuracy columns.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zipcli import MergeOptions, load_spec
from zipcli.evaluate import evaluate, labelled_batches, labelled_images
from zipcli.pipeline import MergeJob
from zipcli.tuning import agreement, candidate_settings, divergence, head_outputs

SHARED = Path(__file__).resolve().parents[2] / "shared"


def criteria(model, held) -> tuple[float, ...]:
    """(the score, plain agreement, claimed KL(source || head), KL on all images, joint agreement)."""
    heads = head_outputs(model, held.images, len(held.targets))
    joint = lambda logits: torch.cat([F.softmax(z, 1) for z in logits], 1).argmax(1)  # noqa: E731
    return (score_of(heads, held), agreement(heads, held.targets, claimed_only=False),
            divergence(heads, held.targets), divergence(heads, held.targets, claimed_only=False),
            float((joint(heads) == joint(held.targets)).float().mean()))


def score_of(heads, held) -> float:
    return agreement(heads, held.targets)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--calib", default=str(SHARED / "datasets/cifar10/train"))
    p.add_argument("--test", default=str(SHARED / "datasets/cifar10/test"))
    p.add_argument("--num-calib", type=int, default=512)
    p.add_argument("--stops", default=None)
    p.add_argument("--limit", type=int, default=None, help="test images per class (default: all)")
    a = p.parse_args()
    torch.manual_seed(0)
    spec = load_spec(a.arch)
    test = list(labelled_batches(labelled_images(a.test, a.limit), spec.input, 500))
    print(f"{sum(len(y) for _, y in test)} test images", file=sys.stderr)
    for stop in (a.stops.split(",") if a.stops else spec.stops):
        t = time.time()
        job = MergeJob(a.checkpoints, spec, a.calib, MergeOptions(stop=stop, num_calib=a.num_calib, seed=0,
                                                                   alpha=None, beta=None))
        job.calibrate()
        held, bn_images = job.held_out(), job.bn_subset()
        names = [h.name for h in job.heads]
        classes = [h.classes for h in job.heads]
        print(f"\n### stop {stop} ({len(job.stream)} fit images, {len(held.images)} held out)\n")
        print("| alpha | beta | claimed agreement | agreement | claimed KL | KL | joint agreement "
              "| test avg task | test joint |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        seen = {}
        for s in candidate_settings(len(job.sources)):
            matches = job.match(s)
            key = tuple(m.assign.tobytes() for m in matches.values())
            if key not in seen:
                cand = job.candidate(matches, bn_images)
                r = evaluate(job.finish(s).model, test, names, classes)
                seen[key] = (*criteria(cand, held), r["avg_task"], r["joint"])
            print("| " + " | ".join([f"{s.alpha:g}", f"{s.beta:g}"] + [f"{v:.4f}" for v in seen[key]]) + " |",
                  flush=True)
        print(f"  stop {stop}: {time.time() - t:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
