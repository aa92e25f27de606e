"""What turns a loss into updated weights (recipe key parallel.engine): FSDP2 or DeepSpeed ZeRO.

Both engines wrap the same model with the same AdamW (build_optimizer) and give the trainer
one interface, so lh_cp/train/trainer.py has no engine branches:
- `model`: what the forward is called on (the FSDP2 module, or the DeepSpeed engine);
- `network`: the Transformer itself (set_attention, lighthouse_layers);
- `step(loss, lr)`: backward, clip, optimizer step, zeroed gradients; returns the global
  gradient norm before clipping; a non-finite norm raises NonFiniteStep (under FSDP2 before
  the optimizer step, so the weights in memory stay those of the last good step);
- `save(root, step, data_state, meta)` / `load(path, data_state)`: checkpoints in the
  step_XXXXXXXX folders of lh_cp.train.checkpoint (DCP for FSDP2, DeepSpeed's own format for ZeRO),
  so latest_checkpoint and prune_checkpoints serve both.
Both hand the run's ContextParallel (rt.cp, under CP) to the model's attention modules
before wrapping it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lh_cp.model.transformer import Transformer
from lh_cp.parallel import checkpoint_and_compile, parallelize
from lh_cp.train.checkpoint import (
    load_checkpoint,
    load_deepspeed_checkpoint,
    save_checkpoint,
    save_deepspeed_checkpoint,
)
from lh_cp.train.recipe import Recipe
from lh_cp.train.runtime import Runtime


class NonFiniteStep(RuntimeError):
    """A training step produced a non-finite loss or gradient norm; `what` names which, `value`
    is it. Raised on every rank (both are global values), so the job stops together."""

    def __init__(self, what: str, value: float | str, where: str = "") -> None:
        super().__init__(f"non-finite {what} ({value}){' ' + where if where else ''}")
        self.what, self.value = what, value


def check_finite_value(what: str, value: float) -> float:
    if not math.isfinite(value):
        raise NonFiniteStep(what, value)
    return value


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW; matrices (and embeddings) decay, norm weights (1-D) do not."""
    opt = recipe.optim
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": opt.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)


class FsdpEngine:
    """parallelize (activation checkpointing, compile, FSDP2) + torch AdamW; DCP checkpoints."""

    def __init__(self, model: Transformer, recipe: Recipe, rt: Runtime) -> None:
        self.model = self.network = parallelize(model, rt.mesh, recipe.parallel, context=rt.cp)
        self.optimizer = build_optimizer(self.model, recipe)
        self.grad_clip, self.group = recipe.optim.grad_clip, rt.world

    def step(self, loss: torch.Tensor, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.grad_clip if self.grad_clip > 0 else math.inf
        )
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        check_finite_value("gradient norm", float(norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def save(self, root: Path, step: int, data_state: dict, meta: dict) -> None:
        save_checkpoint(root, step, self.model, self.optimizer, data_state, self.group, meta)

    def load(self, path: Path, data_state: dict) -> tuple[int, dict]:
        return load_checkpoint(path, self.model, self.optimizer, data_state, self.group)


class ZeroEngine:
    """checkpoint_and_compile (no FSDP wrapping) + a DeepSpeed ZeRO engine around torch AdamW.

    ZeRO (parallel.zero_stage) shards over every rank and averages gradients over all of them,
    which is what training_loss's normaliser expects (CP ranks hold the same weights, like
    FSDP2's dp_shard x cp). On CUDA DeepSpeed runs in its bf16 mode (fp32 master weights).
    """

    def __init__(self, model: Transformer, recipe: Recipe, rt: Runtime) -> None:
        from lh_cp.parallel.deepspeed import build_deepspeed_engine

        self.network = checkpoint_and_compile(
            model, recipe.parallel, compile_in_place=True, context=rt.cp
        )
        self.model = build_deepspeed_engine(
            model,
            build_optimizer(model, recipe),
            zero_stage=recipe.parallel.zero_stage,
            grad_clip=recipe.optim.grad_clip,
            micro_batch_size=recipe.data.batch_size,
            bf16=rt.device.type == "cuda",
        )
        self.group = rt.world

    def step(self, loss: torch.Tensor, lr: float) -> float:
        from lh_cp.parallel.deepspeed import set_learning_rate

        set_learning_rate(self.model, lr)
        self.model.backward(loss)
        self.model.step()  # clips (optim.grad_clip), steps, zeroes the gradients
        # DeepSpeed computes the norm inside its step, so this one is checked after it.
        return check_finite_value("gradient norm", float(self.model.get_global_grad_norm()))

    def save(self, root: Path, step: int, data_state: dict, meta: dict) -> None:
        save_deepspeed_checkpoint(self.model, root, step, data_state, self.group, meta)

    def load(self, path: Path, data_state: dict) -> tuple[int, dict]:
        return load_deepspeed_checkpoint(self.model, path)


def build_engine(model: Transformer, recipe: Recipe, rt: Runtime) -> FsdpEngine | ZeroEngine:
    """The engine recipe.parallel.engine names, around `model` (built identically on every rank)."""
    return (
        ZeroEngine(model, recipe, rt)
        if recipe.parallel.engine == "deepspeed"
        else FsdpEngine(model, recipe, rt)
    )
