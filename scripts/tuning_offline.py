"""Which label-free criterion, and how many held-out images, pick zipit's α and β best?

Usage: python scripts/tuning_offline.py DUMP_DIR [DUMP_DIR ...] [--sizes 256,512,1024]
           [--grid all|no-alpha1|...]

Reads the per-stop dumps of ``scripts/tuning_study.py --dump`` (the sources' and each
candidate's logits on the held-out calibration images, and each candidate's test
accuracy) and, for every criterion and held-out size (a seeded random N of the
held-out images; the held-out files are sorted by folder, so a prefix would
over-sample the first classes),
prints the test accuracy of the candidate the criterion would choose, beside the
best candidate, the default (α 0.3, β 0.125) and permute. Test accuracy is only
read to judge the choice, never to make it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from zipcli.tuning import agreement, divergence

DEFAULT = ("0.3", "0.125")


def criteria(heads, targets):
    """Lower is better for every criterion."""
    return {
        "claimed KL": divergence(heads, targets),
        "claimed agreement": -agreement(heads, targets),
        "KL": divergence(heads, targets, claimed_only=False),
        "agreement": -agreement(heads, targets, claimed_only=False),
    }


def spearman(x, y) -> float:
    rx, ry = torch.tensor(x).argsort().argsort().double(), torch.tensor(y).argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dumps", nargs="+")
    p.add_argument("--sizes", default="256,512,1024")
    p.add_argument("--no-permute", action="store_true", help="leave permute out of the candidates")
    p.add_argument("--alphas", default=None, help="only these alphas, e.g. 0.1,0.3,0.5")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    print("| zoo | stop | held out | criterion | ρ (avg task) | chosen | chosen test | best test | default test "
          "| permute test |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for folder in a.dumps:
        for path in sorted(Path(folder).glob("*.pt")):
            d = torch.load(path, weights_only=False)
            cands = [c for c in d["candidates"]
                     if not (a.no_permute and c["settings"][0][0] == "permute")
                     and (a.alphas is None or any(s[0] in a.alphas.split(",") or s[0] == "permute"
                                                  for s in c["settings"]))]
            test = [c["test"][0] for c in cands]
            default = next(c["test"][0] for c in d["candidates"] if DEFAULT in c["settings"])
            permute = next(c["test"][0] for c in d["candidates"] if c["settings"][0][0] == "permute")
            for n in sizes:
                if n > len(d["targets"][0]):
                    continue
                keep = torch.randperm(len(d["targets"][0]), generator=torch.Generator().manual_seed(0))[:n]
                targets = [t[keep] for t in d["targets"]]
                scores = [criteria([h[keep] for h in c["heads"]], targets) for c in cands]
                names = list(scores[0])
                scores_rank = [sum(torch.tensor([s[k] for s in scores]).argsort().argsort()[i].item()
                                   for k in ("claimed KL", "claimed agreement")) for i in range(len(cands))]
                rows = [(k, [s[k] for s in scores]) for k in names] + [("KL+agreement ranks", scores_rank)]
                for name, vals in rows:
                    i = min(range(len(cands)), key=lambda j: (vals[j], j))
                    label = "/".join(f"{x}" for x in cands[i]["settings"][0])
                    print(f"| {Path(folder).name} | {path.stem} | {n} | {name} | {spearman([-v for v in vals], test):.2f} "
                          f"| {label} | {test[i]:.4f} | {max(test):.4f} | {default:.4f} | {permute:.4f} |")


if __name__ == "__main__":
    main()
