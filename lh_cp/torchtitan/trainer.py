"""LighthouseTrainer: torchtitan's Trainer whose config carries lh-cp's model sections.

The trainer config gains three sections, settable from torchtitan's command line like any
other (`--model.dim 1024`, `--lighthouse.topk 2048`, `--stage.attention dense`):
- model: lh_cp.model.transformer.ModelConfig (the recipe's [model]);
- lighthouse: lh_cp.train.recipe.LighthouseSection (the recipe's [lighthouse]);
- stage: StageOptions (attention of this stage, CP exchanges, resume step of recovery).
The ModelSpec (torchtitan's llama3 model with LighthouseInnerAttention) is derived from them
every time the config is constructed, so the sections are the only source of the model. Rules
that tie sections together (tile size vs seq_len, CP chunks, checkpoints of a two-stage run)
are checked here, before any process group starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.config import ParallelismConfig, TrainingConfig
from torchtitan.trainer import Trainer

from lh_cp.data.tokenizer import ByteTokenizer
from lh_cp.model.transformer import ModelConfig
from lh_cp.torchtitan.data import LhCpDataLoader
from lh_cp.torchtitan.model import layer_modes, lighthouse_model_spec
from lh_cp.torchtitan.stage import StageOptions
from lh_cp.torchtitan.tokenizer import LhCpTokenizer
from lh_cp.train.recipe import LighthouseSection


def _check_lighthouse_shapes(config: LighthouseTrainer.Config) -> None:
    if "lighthouse" not in layer_modes(config.model, config.lighthouse, config.stage):
        return
    cfg = config.lighthouse.config()
    seq_len, cp = config.training.seq_len, config.parallelism.context_parallel_degree
    cfg.tile_size(seq_len)
    if cp > 1:
        cfg.for_pieces(seq_len, 2 * cp, "each head-tail chunk")


def _check_stages(config: LighthouseTrainer.Config) -> None:
    checkpoint, schedule_end = config.checkpoint, config.lr_scheduler.total_steps
    if schedule_end is not None and schedule_end > config.training.steps:
        if not checkpoint.enable or checkpoint.last_save_model_only:
            raise ValueError(
                f"this stage ends at training.steps={config.training.steps} before the schedule's "
                f"lr_scheduler.total_steps={schedule_end}: it must save a full checkpoint for the next "
                f"stage, so set checkpoint.enable=True and checkpoint.last_save_model_only=False"
            )
    resume = config.stage.resume_step
    if resume:
        if not checkpoint.enable:
            raise ValueError(
                f"stage.resume_step={resume} resumes from a checkpoint: set checkpoint.enable=True"
            )
        if resume >= config.training.steps:
            raise ValueError(
                f"stage.resume_step={resume} must be smaller than training.steps={config.training.steps} "
                f"(the recovery stage trains steps {resume + 1}..training.steps)"
            )


class LighthouseTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        model: ModelConfig = field(default_factory=ModelConfig)
        """Decoder shape (lh_cp.model.transformer.ModelConfig, the recipe's [model])."""

        lighthouse: LighthouseSection = field(default_factory=LighthouseSection)
        """Lighthouse attention of the non-dense layers (the recipe's [lighthouse])."""

        stage: StageOptions = field(default_factory=StageOptions)
        """Attention of this stage, CP exchanges, resume step (lh_cp.torchtitan.stage)."""

        flavor: str = "custom"
        """Name of the model size in torchtitan's logs."""

        hf_assets_path: str = "."
        """Unused here: tokenizer.name names the tokenizer (kept at '.' so torchtitan finds it)."""

        tokenizer: LhCpTokenizer.Config = field(default_factory=LhCpTokenizer.Config)
        dataloader: LhCpDataLoader.Config = field(default_factory=LhCpDataLoader.Config)
        parallelism: ParallelismConfig = field(
            default_factory=lambda: ParallelismConfig(spmd_backend="partial_dtensor")
        )
        training: TrainingConfig = field(
            default_factory=lambda: TrainingConfig(disable_cuda_graphs=True)
        )
        """CUDA graphs are off: Lighthouse selection checks its scores for NaN on the host."""

        def __post_init__(self) -> None:
            if self.parallelism.spmd_backend != "partial_dtensor":
                raise ValueError(
                    f"lh_cp.torchtitan needs parallelism.spmd_backend='partial_dtensor', got "
                    f"{self.parallelism.spmd_backend!r}"
                )
            if not isinstance(self.dataloader, LhCpDataLoader.Config) or not isinstance(
                self.tokenizer, LhCpTokenizer.Config
            ):
                raise ValueError(
                    f"lh_cp.torchtitan trains on lh-cp data with global positions (Lighthouse attention is "
                    f"causal over the whole packed sequence): dataloader must be LhCpDataLoader.Config and "
                    f"tokenizer LhCpTokenizer.Config, got {type(self.dataloader).__qualname__} and "
                    f"{type(self.tokenizer).__qualname__}"
                )
            if self.tokenizer.name == "bytes" and self.model.vocab_size < ByteTokenizer.vocab_size:
                raise ValueError(
                    f"model.vocab_size={self.model.vocab_size} is smaller than the byte tokenizer's "
                    f"{ByteTokenizer.vocab_size} tokens"
                )
            _check_lighthouse_shapes(self)
            _check_stages(self)
            self.model_spec = lighthouse_model_spec(
                self.model, self.lighthouse, self.stage, self.training.seq_len, self.flavor
            )
            for _, loss_cfg, _, _ in self.loss.traverse(CrossEntropyLoss.Config):
                loss_cfg.global_vocab_size = self.model.vocab_size
            Trainer.Config.__post_init__(self)

    def should_continue_training(self) -> bool:
        resume = self.config.stage.resume_step
        if resume and self.step < resume:
            raise RuntimeError(
                f"stage.resume_step={resume}: this stage continues the previous stage from its checkpoint "
                f"at step {resume}, but it would start at step {self.step + 1}; no such checkpoint was found "
                f"under dump_folder={self.config.dump_folder!r}, checkpoint.folder={self.config.checkpoint.folder!r}"
            )
        return super().should_continue_training()
