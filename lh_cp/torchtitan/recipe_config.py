"""One lh-cp recipe -> one torchtitan trainer config per stage (LighthouseTrainer.Config).

Stage i of the recipe becomes a torchtitan run that trains global steps
(end of stage i-1) + 1 .. (end of stage i): training.steps is the stage's last step, the
learning-rate schedule spans all stages (lr_scheduler.total_steps), and a later stage
resumes from the previous one's checkpoint (stage.resume_step) in the same dump_folder, with
its optimizer, schedule position and data position. Every recipe key that torchtitan can
express is carried over; UNMAPPED lists the ones it cannot.
"""

from __future__ import annotations

import copy
from pathlib import Path

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.metrics import MetricsProcessor
from torchtitan.config import CompileConfig, DebugConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import FullAC

from lh_cp.torchtitan.data import LhCpDataLoader
from lh_cp.torchtitan.optim import adamw_config, schedule_config
from lh_cp.torchtitan.stage import StageOptions
from lh_cp.torchtitan.tokenizer import LhCpTokenizer
from lh_cp.torchtitan.trainer import LighthouseTrainer
from lh_cp.train.recipe import Recipe

UNMAPPED = (
    "run.device (torchtitan picks the accelerator)",
    "run.stop_after_step (use --training.steps)",
    "eval.* (validation loss and passkey run in lh-cp's trainer only)",
    "metrics.peak_tflops (torchtitan knows its GPUs' peaks)",
    "metrics.profile_step (use torchtitan's --profiling.enable_profiling)",
    "parallel.no_checkpoint_layers (torchtitan's activation checkpointing covers every block)",
    "data.validation_fraction held-out documents are still excluded from training, but not evaluated",
)


def stage_index(recipe: Recipe, stage: int | str) -> int:
    """Index of `stage` (its name or its index) among recipe.stages; ValueError names the choices."""
    names = [s.name for s in recipe.stages]
    if not names:
        raise ValueError("the recipe has no [[stages]]")
    if isinstance(stage, int) and not isinstance(stage, bool):
        if not 0 <= stage < len(names):
            raise ValueError(f"stage index {stage} is out of range: the recipe has stages {names}")
        return stage
    if stage not in names:
        raise ValueError(f"the recipe has no stage named {stage!r}; its stages are {names}")
    return names.index(stage)


def run_folder(recipe: Recipe) -> str:
    """torchtitan's dump_folder: beside lh-cp's own run files, not mixed with its checkpoints."""
    return str(Path(recipe.run.out_dir) / "torchtitan")


def trainer_config_from_recipe(recipe: Recipe, stage: int | str = 0) -> LighthouseTrainer.Config:
    """The torchtitan config of one stage of `recipe` (validated on construction)."""
    index = stage_index(recipe, stage)
    if recipe.data.document_masking:
        raise ValueError(
            "data.document_masking=true cannot be converted: lh_cp.torchtitan's dataloader "
            "yields window positions and no document masks, so the run would attend across "
            "documents (docs/torchtitan.md); train it with lh-cp's own trainer"
        )
    ends, stage_cfg = recipe.stage_ends(), recipe.stages[index]
    par, data, optim, schedule = recipe.parallel, recipe.data, recipe.optim, recipe.schedule
    return LighthouseTrainer.Config(
        flavor=f"{recipe.run.name}:{stage_cfg.name}",
        dump_folder=run_folder(recipe),
        model=copy.deepcopy(recipe.model),
        lighthouse=copy.deepcopy(recipe.lighthouse),
        stage=StageOptions(
            attention=stage_cfg.attention,
            exchange=par.exchange,
            dense_exchange=par.dense_exchange,
            resume_step=ends[index - 1] if index > 0 else 0,
        ),
        tokenizer=LhCpTokenizer.Config(
            name=data.tokenizer, eod_token=data.eod_token, pad_token=data.pad_token
        ),
        dataloader=LhCpDataLoader.Config(
            dataset=data.source,
            dataset_path=data.path or None,
            format=data.format,
            text_field=data.text_field,
            validation_fraction=data.validation_fraction,
            seed=data.seed,
            cache_dir=data.cache_dir,
        ),
        training=TrainingConfig(
            local_batch_size=data.batch_size,
            seq_len=data.seq_len,
            steps=ends[index],
            max_norm=optim.grad_clip if optim.grad_clip > 0 else float("inf"),
            disable_cuda_graphs=True,
        ),
        parallelism=ParallelismConfig(
            spmd_backend="partial_dtensor",
            context_parallel_degree=par.cp,
            data_parallel_shard_degree=par.dp_shard,
            data_parallel_replicate_degree=par.dp_replicate,
        ),
        optimizer=adamw_config(optim.lr, tuple(optim.betas), optim.eps, optim.weight_decay),
        lr_scheduler=schedule_config(
            schedule.warmup_steps,
            schedule.decay,
            schedule.min_lr_ratio,
            recipe.total_steps,
            schedule.decay_steps,
        ),
        loss=ChunkedLossWrapper.Config(
            loss_fn=CrossEntropyLoss.Config(global_vocab_size=recipe.model.vocab_size)
        ),
        activation_checkpoint=FullAC.Config() if par.activation_checkpoint else None,
        compile=CompileConfig(enable=par.compile, components=["model"]),
        checkpoint=CheckpointManager.Config(
            enable=True,
            folder=recipe.checkpoint.dir or "checkpoint",
            interval=recipe.checkpoint.interval or recipe.total_steps,
            keep_latest_k=recipe.checkpoint.keep_last,
            last_save_model_only=False,
        ),
        metrics=MetricsProcessor.Config(
            log_freq=recipe.metrics.log_interval,
            enable_tensorboard=True,
            save_tb_folder=recipe.metrics.tensorboard_dir or "tb",
        ),
        debug=DebugConfig(seed=recipe.run.seed),
    )
