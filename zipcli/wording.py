"""The records of a merged file in words: one sentence each for the default's choice, the refit
and the size, shared by the merge summary, ``zipit inspect`` and the model card, so the three cannot
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


def choice_rule(choice: dict) -> str:
    """The rule the default chose by, from the level and the looks recorded with the choice."""
    try:
        looks = choice.get("looks") or []
        return (f"permute unless zipit's mean divergence is lower with the whole {choice.get('level', 0.95) * 100:g}% "
                "paired-bootstrap interval of the difference below 0" +
                (f", on the first {looks[0]} held-out images, then on all {looks[-1]} if that interval contains 0"
                 if len(looks) > 1 else ""))
    except _UNREADABLE:
        return "(its rule in the file is unreadable)"


def decision_lines(params: dict) -> list[str]:
    """What a merge decided, in the order it decided it: each tuning candidate's held-out divergence
    and the alpha and beta chosen, permute or zipit and why, the refit. ``zipit merge`` prints these
    lines; ``merge()`` sends them to its reporter (the ``zipit`` logger for Python callers)."""
    lines = []
    tuning, choice, refitted = params.get("tuning"), params.get("choice"), params.get("refit")
    try:
        if tuning and tuning["candidates"]:
            fewest = min(c["images"] for c in tuning["candidates"])
            for c in tuning["candidates"]:
                went_on = ", went on" if c["images"] > fewest else ""
                lines.append(f"  alpha {c['alpha']:<5g} beta {c['beta']:<7g} divergence {c['score']:.4f} "
                             f"({c['images']} images{went_on})")
            chosen = tuning["chosen"]
            lines.append(f"chose alpha {chosen['alpha']:g}, beta {chosen['beta']:g} (lowest divergence from the "
                         f"sources on {tuning['held_out_images']} held-out calibration images)")
    except _UNREADABLE:
        lines.append("tuning: (its figures in the file are unreadable)")
    if choice:
        lines.append(f"chose {choice.get('chosen')}: {choice_evidence(choice)}")
    if refitted:
        lines.append(f"refit: {refit_summary(refitted)}")
    if params.get("size"):
        lines.append(f"size: {size_summary(params['size'])}")
    return lines


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


def size_summary(record: dict) -> str:
    """One line on the size dial: the size asked and reached, in one source model's parameters."""
    try:
        floor = f"; below the full zip's {record['floor']:g}x, merged as the full zip" \
            if record["asked"] < record["floor"] else f" (the full zip: {record['floor']:g}x)"
        return (f"asked {record['asked']:g}x one source model's {record['unit']}, reached {record['reached']:g}x"
                f"{floor}, {_count(record['macs'])} MACs per image")
    except _UNREADABLE:
        return "(its figures in the file are unreadable)"


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:g}"
