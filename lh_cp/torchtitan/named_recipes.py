"""The lh-cp recipes behind the named torchtitan configs (each a two-stage run).

- debugmodel: 6 layers of width 128 on the byte tokenizer and this Python's standard library;
  runs anywhere (its forward/backward is tested on CPU), 10 Lighthouse + 5 recovery steps.
- 270M: the paper's ablation model (docs/LIGHTHOUSE.md s.9): dim 1024, 30 layers, FFN 1536,
  8 heads of 128; 267.4M parameters in the blocks ("270M"), 530.1M with the untied Llama-3
  embeddings (the paper's "530M"); RoPE base 1e4 as the paper.
- 530M: the same model as the long recipes (recipes/128k.toml..1m.toml) train it: the shape
  above with their RoPE base 1e6 (they raise it with the context).
The two Llama-3 sizes use the Llama-3 vocabulary (128256) with its tokenizer read from
./assets/hf/Llama-3.1-8B (override with --tokenizer.name), train on local JSONL documents
(a "text" field per line) under ./data (override with --dataloader.dataset_path; the token
stream is cached under the run's folder) at 98304 tokens with the reference
Lighthouse settings (pool 4, 3 levels, topk 1536, tile budget 128: tile T = 8192), dense
layers the first two and the last two, 10000 Lighthouse steps then 6000 dense recovery steps
under the paper's schedule (AdamW 2e-3, 2000 warmup steps, then constant through both stages).
"""

from __future__ import annotations

from lh_cp.data.loader import DataConfig
from lh_cp.model.transformer import ModelConfig
from lh_cp.train.recipe import (
    CheckpointConfig,
    LighthouseSection,
    MetricsConfig,
    OptimConfig,
    ParallelConfig,
    Recipe,
    RunConfig,
    ScheduleConfig,
    StageConfig,
)

LLAMA3_VOCAB = 128256
LLAMA3_TOKENIZER = "./assets/hf/Llama-3.1-8B"


def _stages(lighthouse_steps: int, recovery_steps: int) -> list[StageConfig]:
    return [
        StageConfig(name="lighthouse", attention="lighthouse", steps=lighthouse_steps),
        StageConfig(name="recovery", attention="dense", steps=recovery_steps),
    ]


def debugmodel() -> Recipe:
    return Recipe(
        run=RunConfig(name="lighthouse_debugmodel", out_dir="./outputs/lighthouse_debugmodel"),
        model=ModelConfig(
            vocab_size=258,
            dim=128,
            n_layers=6,
            n_heads=4,
            n_kv_heads=2,
            ffn_dim=384,
            rope_theta=10000.0,
        ),
        lighthouse=LighthouseSection(
            pool=4, levels=3, topk=64, tile_budget=16, dense_layers=[0, 1, -2, -1]
        ),
        data=DataConfig(source="stdlib", tokenizer="bytes", seq_len=1024, batch_size=2),
        optim=OptimConfig(lr=8e-4),
        schedule=ScheduleConfig(warmup_steps=2, decay="linear", min_lr_ratio=0.0),
        stages=_stages(10, 5),
        checkpoint=CheckpointConfig(interval=5, keep_last=3),
        metrics=MetricsConfig(log_interval=1),
    )


def _llama3(name: str, model: ModelConfig, dense_layers: list[int]) -> Recipe:
    return Recipe(
        run=RunConfig(name=name, out_dir=f"./outputs/{name}"),
        model=model,
        lighthouse=LighthouseSection(
            pool=4, levels=3, topk=1536, tile_budget=128, dense_layers=dense_layers
        ),
        parallel=ParallelConfig(activation_checkpoint=True),
        data=DataConfig(
            source="files",
            path="./data",
            format="jsonl",
            tokenizer=LLAMA3_TOKENIZER,
            eod_token="<|end_of_text|>",
            seq_len=98304,
            batch_size=1,
            cache_dir=f"./outputs/{name}/tokens",
        ),
        optim=OptimConfig(lr=2e-3, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.1, grad_clip=1.0),
        schedule=ScheduleConfig(warmup_steps=2000, decay="constant"),
        stages=_stages(10000, 6000),
        checkpoint=CheckpointConfig(interval=500, keep_last=3),
        metrics=MetricsConfig(log_interval=10),
    )


def _paper_model(rope_theta: float) -> ModelConfig:
    return ModelConfig(
        vocab_size=LLAMA3_VOCAB,
        dim=1024,
        n_layers=30,
        n_heads=8,
        n_kv_heads=8,
        ffn_dim=1536,
        rope_theta=rope_theta,
    )


def llama3_270m() -> Recipe:
    return _llama3("lighthouse_270m", _paper_model(1e4), [0, 1, 28, 29])


def llama3_530m() -> Recipe:
    return _llama3("lighthouse_530m", _paper_model(1e6), [0, 1, 28, 29])
