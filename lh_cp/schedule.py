"""Learning rate as a function of the global step over all stages together.

Every curve starts with a linear warmup to optim.lr over schedule.warmup_steps steps, then:
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

from lh_cp.recipe import OptimConfig, ScheduleConfig

DECAYS = ("constant", "linear", "cosine", "wsd")


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


def schedule_problems(schedule: ScheduleConfig, total_steps: int) -> list[str]:
    """Every rule of [schedule] that `schedule` breaks for a run of `total_steps` steps."""
    errors = []
    if schedule.decay not in DECAYS:
        errors.append(f"schedule.decay must be one of {DECAYS}, got {schedule.decay!r}")
    if not 0.0 <= schedule.min_lr_ratio <= 1.0:
        errors.append(f"schedule.min_lr_ratio must lie in [0, 1], got {schedule.min_lr_ratio}")
    if schedule.warmup_steps < 0 or (total_steps and schedule.warmup_steps >= total_steps):
        errors.append(
            f"schedule.warmup_steps={schedule.warmup_steps} must be >= 0 and below the total steps of all stages, {total_steps}"
        )
    if schedule.decay == "wsd":
        stable_end = total_steps - schedule.warmup_steps
        if not 1 <= schedule.decay_steps <= stable_end:
            errors.append(
                f"schedule.decay_steps={schedule.decay_steps} must lie in [1, total steps - warmup_steps] = "
                f"[1, {total_steps} - {schedule.warmup_steps} = {stable_end}] for schedule.decay='wsd'"
            )
    elif schedule.decay_steps != 0:
        errors.append(f"schedule.decay_steps={schedule.decay_steps} is used by schedule.decay='wsd' only; "
                      f"set it to 0 with schedule.decay={schedule.decay!r}")
    return errors
