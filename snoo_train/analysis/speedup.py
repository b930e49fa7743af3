"""How much sooner a run reaches a baseline's loss: the two speedup figures of bench/ and plots.

* Crossing speedup, within one run: the baseline's x (steps, tokens or FLOPs) divided by the x
  at which the candidate's validation curve first reaches the baseline's final loss. The curve
  is only known at evaluations, so the crossing is interpolated linearly between the last
  evaluation above the target and the first at or below it.
* Budget speedup, across runs: the candidate is trained to completion with budgets f x B (its
  learning-rate schedule scaled to each); speedup = 1 / (smallest f whose final loss is at or
  below the baseline's). A budget counts only if every larger budget on the grid also reached
  the target, so a lucky short run past a failed longer one does not inflate the figure.

A run that never reaches the target yields None, never a number: "not reached" is a result,
and a made-up speedup below 1 would hide it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def crossing_point(xs: Sequence[float], losses: Sequence[float], target: float) -> float | None:
    """The first x at which the piecewise-linear curve (xs, losses) reaches `target`.

    None if no evaluation is at or below the target. If the first evaluation already is, its x
    is returned: nothing is known about the curve before it. Non-finite losses (a diverged
    evaluation) never count as reaching the target.
    """
    if len(xs) != len(losses):
        raise ValueError(f"xs and losses differ in length: {len(xs)} != {len(losses)}")
    prev_x = prev_loss = None
    for x, loss in zip(xs, losses):
        if math.isfinite(loss) and loss <= target:
            if prev_x is None or not math.isfinite(prev_loss):
                return float(x)
            # prev_loss > target >= loss: the straight line between them crosses the target.
            return prev_x + (x - prev_x) * (prev_loss - target) / (prev_loss - loss)
        prev_x, prev_loss = float(x), loss
    return None


def crossing_speedup(
    budget: float, xs: Sequence[float], losses: Sequence[float], target: float
) -> float | None:
    """budget / (x where the curve first reaches target); None if it never does."""
    x = crossing_point(xs, losses, target)
    if x is None:
        return None
    return budget / x if x > 0 else math.inf


def smallest_sufficient_fraction(
    final_loss_by_fraction: Mapping[float, float], target: float
) -> float | None:
    """The smallest budget fraction f whose run, and the run of every larger f on the grid,
    ended at or below `target`. None if even the largest fraction missed it."""
    best = None
    for f in sorted(final_loss_by_fraction, reverse=True):
        loss = final_loss_by_fraction[f]
        if not (math.isfinite(loss) and loss <= target):
            break
        best = f
    return best


def budget_speedup(final_loss_by_fraction: Mapping[float, float], target: float) -> float | None:
    """1 / smallest_sufficient_fraction; None when no budget on the grid reaches the target."""
    f = smallest_sufficient_fraction(final_loss_by_fraction, target)
    return None if f is None else 1.0 / f


def format_speedup(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f}x"


def seed_spread(values: Sequence[float | None]) -> dict:
    """Mean and spread of one figure over seeds: mean, sample standard deviation (0 for one
    value), min, max over the seeds where it exists; `reached` counts them (a speedup that is
    not reached on a seed is None and is counted, never averaged in as a number)."""
    got = [float(v) for v in values if v is not None and math.isfinite(v)]
    out: dict = {"values": list(values), "reached": len(got), "seeds": len(values)}
    if not got:
        return {**out, "mean": None, "std": None, "min": None, "max": None}
    mean = sum(got) / len(got)
    std = math.sqrt(sum((v - mean) ** 2 for v in got) / (len(got) - 1)) if len(got) > 1 else 0.0
    return {**out, "mean": mean, "std": std, "min": min(got), "max": max(got)}


def gain_versus_seed_noise(baseline: Sequence[float], candidate: Sequence[float]) -> dict:
    """Is the candidate's lower final loss more than the seed-to-seed noise?

    The paired difference baseline - candidate on each seed (the same seed means the same data
    order and initialisation) against the spread of the losses themselves: the gain is `within
    seed noise` when its mean is not larger than the larger of the two sides' standard
    deviations, or when its sign changes between seeds."""
    diffs = [b - c for b, c in zip(baseline, candidate)]
    if len(diffs) < 2:
        return {"mean_gain": diffs[0] if diffs else None, "noise": None, "verdict": "one seed: noise unknown"}
    noise = max(seed_spread(baseline)["std"], seed_spread(candidate)["std"])
    gain = seed_spread(diffs)["mean"]
    consistent = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    if abs(gain) <= noise or not consistent:
        verdict = "within seed noise"
    else:
        verdict = "candidate lower" if gain > 0 else "baseline lower"
    return {"mean_gain": gain, "noise": noise, "diffs": diffs, "verdict": verdict}
