"""AdamW and learning-rate schedule configs matching lh-cp's trainer (lh_cp/train.py, lh_cp/schedule.py).

AdamW: norm weights are not decayed, every other parameter is (as lh-cp: matrices decay, 1-D
norm weights do not). Schedule: linear warmup, then cosine or linear decay to
min_lr_ratio * lr at the last step of the last stage ('constant' keeps lr); torchtitan's
scheduler adds one virtual step at the end, so its last values sit one step's decay above
lh-cp's.
"""

from __future__ import annotations

from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer, ParamGroupConfig

DECAYS = ("cosine", "linear", "constant")


def adamw_config(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> OptimizersContainer.Config:
    def group(pattern: str, decay: float) -> ParamGroupConfig:
        kwargs = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": decay}
        return ParamGroupConfig(pattern=pattern, optimizer_name="AdamW", optimizer_kwargs=kwargs)

    return OptimizersContainer.Config(param_groups=[group(r".*norm\.weight$", 0.0), group(r".*", weight_decay)])


def schedule_config(warmup_steps: int, decay: str, min_lr_ratio: float, total_steps: int) -> LRSchedulersContainer.Config:
    """total_steps: steps of all stages together, so a later stage continues the same curve."""
    if decay not in DECAYS:
        raise ValueError(f"schedule decay must be one of {DECAYS}, got {decay!r}")
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"schedule needs 0 <= warmup_steps <= total_steps, got warmup_steps={warmup_steps}, total_steps={total_steps}")
    return LRSchedulersContainer.Config(
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        decay_type="linear" if decay == "constant" else decay,
        min_lr_factor=1.0 if decay == "constant" else min_lr_ratio,
    )
