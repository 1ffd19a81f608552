"""Does the label-free tuning score rank zipit's (alpha, beta) settings the way test accuracy does?

Usage: python scripts/tuning_study.py CKPT CKPT [CKPT ...] [--arch resnet20] [--calib DIR]
           [--test DIR] [--num-calib 512] [--stops layer1,layer2,layer3] [--limit N]
           [--holdout 256] [--dump DIR]

For every stop, runs the auto merge's own stages once (MergeJob: calibration on
the fit images, held-out split, BN subset), then for every candidate setting
prints the label-free score the tuner sees (held-out top-1 agreement) and two
alternatives (mean KL divergence from the source, and agreement of the joint
prediction), next to the test accuracy of the final model built with that
setting. Test images are used only for the accuracy columns. A last row does
the same for `permute` matching, for comparison.

--holdout sets how many spare calibration images are held out (the tuner's
HOLDOUT); --dump writes, per stop, the sources' and every candidate's logits on
the held-out images with the candidate's test accuracy, so other criteria and
held-out sizes can be studied offline (scripts/tuning_offline.py).
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
import zipcli.calibration

from zipcli.bn import reset_batchnorm
from zipcli.assembly import build, match as match_point
from zipcli.choosing import candidate
from zipcli.pipeline import Calibration, MergePoint, merge_at
from zipcli.tuning import FALLBACK, Setting, agreement, candidate_settings, divergence, head_outputs

SHARED = Path(__file__).resolve().parents[2] / "shared"


def criteria(heads, held) -> tuple[float, ...]:
    """(claimed agreement, plain agreement, claimed KL(source || head), KL on all images, joint agreement)."""
    joint = lambda logits: torch.cat([F.softmax(z, 1) for z in logits], 1).argmax(1)  # noqa: E731
    return (agreement(heads, held.targets), agreement(heads, held.targets, claimed_only=False),
            divergence(heads, held.targets), divergence(heads, held.targets, claimed_only=False),
            float((joint(heads) == joint(held.targets)).float().mean()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--calib", default=str(SHARED / "datasets/cifar10/train"))
    p.add_argument("--test", default=str(SHARED / "datasets/cifar10/test"))
    p.add_argument("--num-calib", type=int, default=512)
    p.add_argument("--stops", default=None)
    p.add_argument("--limit", type=int, default=None, help="test images per class (default: all)")
    p.add_argument("--holdout", type=int, default=zipcli.calibration.HOLDOUT, help="spare images held out")
    p.add_argument("--dump", default=None, help="folder for per-stop logits (offline analysis)")
    a = p.parse_args()
    zipcli.calibration.HOLDOUT = a.holdout
    torch.manual_seed(0)
    spec = load_spec(a.arch)
    test = list(labelled_batches(labelled_images(a.test, a.limit), spec.input, 500))
    print(f"{sum(len(y) for _, y in test)} test images", file=sys.stderr)
    for stop in (a.stops.split(",") if a.stops else spec.stops):
        t = time.time()
        cal = Calibration(a.checkpoints, spec, a.calib, MergeOptions(stop=stop, num_calib=a.num_calib, seed=0,
                                                                      alpha=None, beta=None))
        cal.measure(stop)
        held, bn_images = cal.held_out(), cal.bn_subset()
        names = [h.name for h in cal.heads(stop)]
        classes = [h.classes for h in cal.heads(stop)]
        print(f"\n### stop {stop} ({len(cal.stream)} fit images, {len(held.images)} held out)\n")
        print("| alpha | beta | claimed agreement | agreement | claimed KL | KL | joint agreement "
              "| test avg task | test joint |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        seen, dump = {}, {"targets": held.targets, "candidates": []}

        def run(label_a, label_b, setting, matches):
            key = tuple(m.assign.tobytes() for m in matches.values())
            if key not in seen:
                heads = head_outputs(candidate(cal, stop, matches, bn_images), held.images, len(held.targets))
                final = (build(cal, stop, matches) if setting is None else
                         merge_at(cal, MergePoint(stop, "zipit", setting)).model)
                if setting is None:                  # permute: the same final BN reset as merge_at()
                    reset_batchnorm(final, cal.stream.batches(), "cpu")
                r = evaluate(final, test, names, classes)
                seen[key] = (*criteria(heads, held), r["avg_task"], r["joint"])
                dump["candidates"].append({"settings": [], "heads": heads, "test": (r["avg_task"], r["joint"])})
                seen[key] = (seen[key], len(dump["candidates"]) - 1)
            values, index = seen[key]
            dump["candidates"][index]["settings"].append((label_a, label_b))
            print("| " + " | ".join([label_a, label_b] + [f"{v:.4f}" for v in values]) + " |", flush=True)

        for s in candidate_settings(len(cal.sources)):
            run(f"{s.alpha:g}", f"{s.beta:g}", s, match_point(cal, stop, "zipit", s))
        run("permute", "–", None, match_point(cal, stop, "permute", Setting(*FALLBACK)))
        if a.dump:
            Path(a.dump).mkdir(parents=True, exist_ok=True)
            torch.save(dump, Path(a.dump) / f"{stop}.pt")
        print(f"  stop {stop}: {time.time() - t:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
