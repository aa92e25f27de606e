"""DeepSpeed as an alternative training engine: ZeRO stage 1-3 around an lh_cp model.

`build_deepspeed_engine` turns the numbers of a recipe's [optim] section into a DeepSpeed
config and calls `deepspeed.initialize` with a torch AdamW (a ZeRO-supported optimizer, so
no DeepSpeed op has to be compiled, which also keeps it working on DeepSpeed's CPU
accelerator). The engine then replaces FSDP2 + optimizer in a training step:

    engine = build_deepspeed_engine(model, lr=..., betas=..., weight_decay=..., grad_clip=..., zero_stage=3)
    set_learning_rate(engine, lr_at(step, ...))     # the schedule stays a pure function of the step
    loss_sum, count = engine(tokens, positions, targets)
    loss = loss_sum * world / global_count          # global token mean, see below
    engine.backward(loss)
    engine.step()

DeepSpeed averages gradients over its data-parallel group, which is every rank here
(sequence-parallel ranks hold the same weights and their gradients must be combined too),
so each rank's loss is scaled as parallel/loss.py's global_token_mean_loss does.
"""

from __future__ import annotations

import torch
from torch import nn

ZERO_STAGES = (1, 2, 3)


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
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES} (1: optimizer state, 2: + gradients, 3: + weights), got {zero_stage!r}")
    if grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {grad_clip}")
    for name, value in (("micro_batch_size", micro_batch_size), ("grad_accum_steps", grad_accum_steps)):
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


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (linear and embedding weights) decay, vectors (norm weights) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_deepspeed_engine(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float] | list[float],
    weight_decay: float,
    grad_clip: float,
    zero_stage: int,
    eps: float = 1e-8,
    micro_batch_size: int = 1,
    grad_accum_steps: int = 1,
    bf16: bool = False,
):
    """deepspeed.initialize(model, AdamW, config) -> the DeepSpeedEngine.

    Collective over every rank of the default process group (initialised by the launcher,
    torchrun or `deepspeed`; DeepSpeed wraps an already-initialised group). The model must be
    built identically on every rank (same seed) before the call; ZeRO-3 then partitions it.
    """
    import deepspeed

    if len(betas) != 2:
        raise ValueError(f"betas must be two numbers (beta1, beta2), got {betas!r}")
    if lr <= 0 or eps <= 0 or weight_decay < 0:
        raise ValueError(f"need lr > 0, eps > 0, weight_decay >= 0; got lr={lr}, eps={eps}, weight_decay={weight_decay}")
    config = deepspeed_config(
        zero_stage=zero_stage, grad_clip=grad_clip, micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps, bf16=bf16,
    )
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def set_learning_rate(engine, lr: float) -> None:
    """Set the learning rate of every parameter group (call before engine.step())."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
