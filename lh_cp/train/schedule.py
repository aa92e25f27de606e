"""Learning rate as a function of the global step over all stages together.

The curve names (lh_cp.train.recipe.DECAYS) and their rules are ScheduleConfig's; every curve starts
with a linear warmup to optim.lr over schedule.warmup_steps steps, then:
- 'constant': optim.lr to the last step (the paper's protocol: torchtitan decay_ratio = 0.0);
- 'linear' / 'cosine': from optim.lr down to min_lr_ratio * optim.lr at the last step;
- 'wsd' (warmup-stable-decay): optim.lr until the last schedule.decay_steps steps, then
  linearly down to min_lr_ratio * optim.lr at the last step, so a run can put the whole
  decay inside its recovery stage.

A pure function of the step: a resumed run needs no scheduler state beyond the step counter,
and the recovery stage continues the same curve (no re-warm, no jump at the switch).
"""

from __future__ import annotations

import math

from lh_cp.train.recipe import OptimConfig, ScheduleConfig


def lr_at(step: int, total_steps: int, optim: OptimConfig, schedule: ScheduleConfig) -> float:
    """Learning rate of global step `step` (1-based) of a run of `total_steps` steps."""
    peak, floor = optim.lr, optim.lr * schedule.min_lr_ratio
    if step <= schedule.warmup_steps:
        return peak * step / schedule.warmup_steps
    if schedule.decay == "constant":
        return peak
    if schedule.decay == "wsd":
        decay_start = total_steps - schedule.decay_steps
        if step <= decay_start:
            return peak
        return peak + (floor - peak) * min((step - decay_start) / schedule.decay_steps, 1.0)
    if total_steps == schedule.warmup_steps:
        return peak
    progress = min((step - schedule.warmup_steps) / (total_steps - schedule.warmup_steps), 1.0)
    if schedule.decay == "linear":
        return peak + (floor - peak) * progress
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
