"""AdamW and learning-rate schedule configs matching lh-cp's trainer (lh_cp/train/trainer.py, lh_cp/train/schedule.py).

AdamW: norm weights are not decayed, every other parameter is (as lh-cp: matrices decay, 1-D
norm weights do not). Schedule: linear warmup, then cosine or linear decay to
min_lr_ratio * lr at the last step of the last stage, 'constant' (torchtitan decay_ratio = 0,
the paper's setting) or 'wsd' (stable, then linear decay over the last decay_steps: torchtitan
decay_ratio = decay_steps / total_steps); torchtitan's scheduler adds one virtual step at the
end, so its last values sit one step's decay above lh-cp's.
"""

from __future__ import annotations

from torchtitan.components.optimizer import (
    LRSchedulersContainer,
    OptimizersContainer,
    ParamGroupConfig,
)

from lh_cp.train.recipe import DECAYS


def adamw_config(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> OptimizersContainer.Config:
    def group(pattern: str, decay: float) -> ParamGroupConfig:
        kwargs = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": decay}
        return ParamGroupConfig(pattern=pattern, optimizer_name="AdamW", optimizer_kwargs=kwargs)

    return OptimizersContainer.Config(
        param_groups=[group(r".*norm\.weight$", 0.0), group(r".*", weight_decay)]
    )


def schedule_config(
    warmup_steps: int, decay: str, min_lr_ratio: float, total_steps: int, decay_steps: int = 0
) -> LRSchedulersContainer.Config:
    """total_steps: steps of all stages together, so a later stage continues the same curve;
    decay_steps: the decaying tail of 'wsd'."""
    if decay not in DECAYS:
        raise ValueError(f"schedule decay must be one of {DECAYS}, got {decay!r}")
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"schedule needs 0 <= warmup_steps <= total_steps, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}"
        )
    if decay == "wsd" and not 1 <= decay_steps <= total_steps - warmup_steps:
        raise ValueError(
            f"schedule 'wsd' needs 1 <= decay_steps <= total_steps - warmup_steps, got "
            f"decay_steps={decay_steps}, total_steps={total_steps}, warmup_steps={warmup_steps}"
        )
    decay_ratio = {"constant": 0.0, "wsd": decay_steps / total_steps}.get(
        decay
    )  # None: decay after warmup
    return LRSchedulersContainer.Config(
        warmup_steps=warmup_steps,
        total_steps=total_steps,
        decay_ratio=decay_ratio,
        decay_type="cosine" if decay == "cosine" else "linear",
        min_lr_factor=min_lr_ratio,
    )
