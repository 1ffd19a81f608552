"""The records of a merged file in words: one sentence each for the default's choice and for the
refit, shared by the merge summary, ``zipit inspect`` and the model card, so the three cannot
drift apart. Records may come from a damaged file: one that does not read gives a plain line.
"""
from __future__ import annotations

_UNREADABLE = (AttributeError, KeyError, IndexError, TypeError, ValueError, ZeroDivisionError)


def choice_evidence(choice: dict) -> str:
    """Why the default merged with permute or zipit: both divergences, their difference and its
    interval (or, without evidence, the reason)."""
    try:
        if "interval" not in choice:
            return str(choice["reason"])
        lo, hi = choice["interval"]
        zipit = choice["zipit"]
        return (f"held-out divergence zipit {zipit['divergence']:.4f} (alpha {zipit['alpha']:g}, beta "
                f"{zipit['beta']:g}), permute {choice['permute']['divergence']:.4f}, difference "
                f"{choice['difference']:+.4f} ({choice.get('level', 0.95) * 100:g}% interval {lo:+.4f} to {hi:+.4f} "
                f"on {choice['held_out_images']} held-out images; zipit only if wholly below 0)")
    except _UNREADABLE:
        return "(its evidence in the file is unreadable)"


def refit_summary(facts: dict) -> str:
    """One line on the refit: how many layers were solved, and how much closer to the sources they came.
    The facts come from a file, which may be damaged: anything unexpected gives a plain line."""
    try:
        rows = [r for r in facts.get("per_layer", []) if r["ridge"] is not None]
        if not rows:
            return (f"lsq on {int(facts['images'])} images: every layer kept its zipped weights (too few "
                    "samples, or no gain on held-out images)")
        drops = sorted(1 - r["residual"][1] / r["residual"][0] for r in rows if r["residual"][0] > 0)
        median = drops[len(drops) // 2] if drops else 0.0
        return (f"lsq on {int(facts['images'])} images: {len(rows)} of {int(facts['layers'])} layers solved, "
                f"their held-out error to the sources' outputs down by {median:.0%} (median)")
    except _UNREADABLE:
        return "lsq (its figures in the file are unreadable)"
