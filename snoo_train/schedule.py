"""Learning-rate schedules as LambdaLR multipliers of the inner learning rate (`optim.lr`).

SNOO exposes its inner optimizer's `param_groups`, so a LambdaLR built on the SNOO object
schedules the inner lr; the outer lr (eta) stays constant.

`multiplier(i)` is the factor for optimizer step i (0-based; LambdaLR evaluates it at
construction for step 0 and after every `scheduler.step()`):

* warmup (all kinds): (i + 1) / warmup_steps for i < warmup_steps, so step 0 already moves
  and the peak is reached on the last warmup step.
* cosine: from 1 down to min_lr_ratio along half a cosine, reaching min_lr_ratio exactly on
  the last step (max_steps - 1).
* wsd (warmup-stable-decay): 1 until the last ceil(decay_fraction * max_steps) steps, then
  linearly down to min_lr_ratio on the last step.
* constant: 1 after warmup.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "wsd", "constant")


def lr_multiplier(
    kind: str,
    *,
    max_steps: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    decay_fraction: float = 0.2,
) -> Callable[[int], float]:
    if kind not in SCHEDULES:
        raise ValueError(f"lr schedule {kind!r} is not one of {', '.join(SCHEDULES)}")
    decay_steps = max(1, math.ceil(decay_fraction * max_steps))
    decay_start = max_steps - decay_steps

    def multiplier(i: int) -> float:
        if i < warmup_steps:
            return (i + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        if kind == "cosine":
            progress = min(1.0, (i - warmup_steps + 1) / max(1, max_steps - warmup_steps))
            return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if i < decay_start:
            return 1.0
        progress = min(1.0, (i - decay_start + 1) / decay_steps)
        return 1.0 - (1.0 - min_lr_ratio) * progress

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, trainer_cfg) -> LambdaLR:
    """LambdaLR for `trainer.lr_schedule` (cfg keys: max_steps, warmup_steps, min_lr_ratio, decay_fraction)."""
    fn = lr_multiplier(
        trainer_cfg.lr_schedule,
        max_steps=trainer_cfg.max_steps,
        warmup_steps=trainer_cfg.warmup_steps,
        min_lr_ratio=trainer_cfg.min_lr_ratio,
        decay_fraction=trainer_cfg.decay_fraction,
    )
    return LambdaLR(optimizer, fn)
