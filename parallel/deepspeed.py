"""DeepSpeed as an alternative training engine: ZeRO stage 1-3 around an lh_cp model.

`build_deepspeed_engine` wraps the model and the trainer's torch AdamW (a ZeRO-supported
optimizer, so no DeepSpeed optimizer op has to be compiled, which also keeps it working on
DeepSpeed's CPU accelerator) into a DeepSpeed engine whose config comes from a few recipe
numbers. The engine then replaces FSDP2 + optimizer in a training step:

    engine = build_deepspeed_engine(model, build_optimizer(model, recipe), zero_stage=3, grad_clip=1.0)
    set_learning_rate(engine, lr_at(step, ...))     # the schedule stays a pure function of the step
    loss, mean_loss = training_loss(engine, rt, batch)   # lh_cp/train/steps.py, a loader's Batch
    engine.backward(loss)
    engine.step()                                   # clips, steps, zeroes the gradients
    norm = engine.get_global_grad_norm()

DeepSpeed averages gradients over its data-parallel group, which is every rank of the job
(context-parallel ranks hold the same weights and their gradients must be combined too,
as FSDP2 does over dp_shard x cp), so each rank's loss must be W * (local loss sum) / (real
tokens of the global batch), the normaliser training_loss and global_token_mean_loss use.
"""

from __future__ import annotations

import torch
from torch import nn

ZERO_STAGES = (1, 2, 3)
# Torch optimizers DeepSpeed runs under ZeRO without compiling any op of its own.
SUPPORTED_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam)


def deepspeed_config(
    *,
    zero_stage: int,
    grad_clip: float,
    micro_batch_size: int = 1,
    grad_accum_steps: int = 1,
    bf16: bool = False,
) -> dict:
    """The DeepSpeed config dict of a run (the optimizer is passed separately, see module doc).

    zero_stage: 1 shards optimizer state, 2 also gradients, 3 also weights.
    grad_clip: global gradient-norm clip; 0 disables it (as in the recipe).
    micro_batch_size: batch rows per rank per forward; grad_accum_steps: forwards per step.
    bf16: bf16 weights and activations with fp32 master weights (CUDA runs); False = fp32.
    """
    if zero_stage not in ZERO_STAGES:
        raise ValueError(
            f"zero_stage must be one of {ZERO_STAGES} (1: optimizer state, 2: + gradients, 3: + weights), got {zero_stage!r}"
        )
    if grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {grad_clip}")
    for name, value in (
        ("micro_batch_size", micro_batch_size),
        ("grad_accum_steps", grad_accum_steps),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bool(bf16)},
        # The trainer logs its own metrics; DeepSpeed's periodic prints would duplicate them.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_deepspeed_engine(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    zero_stage: int,
    grad_clip: float,
    micro_batch_size: int = 1,
    grad_accum_steps: int = 1,
    bf16: bool = False,
):
    """deepspeed.initialize(model, optimizer, deepspeed_config(...)) -> the DeepSpeedEngine.

    optimizer: torch.optim.AdamW (as lh_cp.train.engines.build_optimizer makes) or torch.optim.Adam over
        the model's parameters, param groups included; ZeRO repartitions its state.
    The other arguments are those of deepspeed_config. Collective over every rank of the
    default process group (started by the launcher, torchrun or `deepspeed`; DeepSpeed wraps
    an already-started group). The model must be built identically on every rank (same seed)
    before the call; ZeRO-3 then partitions it.
    """
    import deepspeed

    config = deepspeed_config(
        zero_stage=zero_stage,
        grad_clip=grad_clip,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        bf16=bf16,
    )
    # Exact types, as DeepSpeed checks them: a subclass may change the step ZeRO relies on.
    if type(optimizer) not in SUPPORTED_OPTIMIZERS:
        raise ValueError(
            f"ZeRO stage {zero_stage} needs an optimizer DeepSpeed supports under ZeRO: torch.optim.AdamW or "
            f"torch.optim.Adam, got {type(optimizer).__module__}.{type(optimizer).__name__}"
        )
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def set_learning_rate(engine, lr: float) -> None:
    """Set the learning rate of every parameter group (call before engine.step())."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
