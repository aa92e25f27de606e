"""Learning rate as a function of the global step: linear warmup, then cosine, linear or
constant decay to min_lr_ratio * lr at the last step of the last stage.

A pure function of the step, so a resumed run needs no scheduler state beyond the step
counter, and the recovery stage continues the same curve.
"""

from __future__ import annotations

import math

from lh_cp.recipe import OptimConfig, ScheduleConfig


def lr_at(step: int, total_steps: int, optim: OptimConfig, schedule: ScheduleConfig) -> float:
    """Learning rate of global step `step` (1-based) of a run of `total_steps` steps."""
    peak, floor = optim.lr, optim.lr * schedule.min_lr_ratio
    if step <= schedule.warmup_steps:
        return peak * step / schedule.warmup_steps
    if schedule.decay == "constant" or total_steps == schedule.warmup_steps:
        return peak
    progress = min((step - schedule.warmup_steps) / (total_steps - schedule.warmup_steps), 1.0)
    if schedule.decay == "linear":
        return peak + (floor - peak) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
