"""torchtitan llama3 model configs whose inner attention is Lighthouse (or dense).

The shape comes from lh-cp's own ModelConfig and the attention from its [lighthouse] section,
so one recipe describes the model of both trainers. The blocks are torchtitan's
Llama3TransformerBlock / GQAttention (fused QKV) / FeedForward; only the inner attention
(LighthouseInnerAttention) and the RoPE cache (rotate-half, float64 angles, as lh-cp's model)
are lh-cp's. Initialisation follows lh_cp.model.transformer.Transformer.init_weights: normal(init_std),
output projections of each block normal(init_std / sqrt(2 * n_layers)), norms one.
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchtitan.models.common import Embedding, FeedForward, Linear, RMSNorm
from torchtitan.models.common.config_utils import make_gqa_config
from torchtitan.models.llama3.model import Llama3Model, Llama3TransformerBlock
from torchtitan.protocols.model_spec import ModelSpec

from lh_cp.model.transformer import ModelConfig, normalize_layer_indices
from lh_cp.torchtitan.inner_attention import LighthouseInnerAttention
from lh_cp.torchtitan.rope import Float64CosSinRoPE
from lh_cp.torchtitan.stage import StageOptions
from lh_cp.train.recipe import LighthouseSection

MODEL_NAME = "lighthouse_llama3"


def _normal(std: float) -> dict:
    return {"weight": partial(nn.init.normal_, std=std)}


def layer_modes(
    model: ModelConfig, lighthouse: LighthouseSection, stage: StageOptions
) -> list[str]:
    """Attention mode of every layer: dense layers and the dense stage use 'dense'."""
    dense = normalize_layer_indices(lighthouse.dense_layers, model.n_layers)
    if stage.attention == "dense":
        return ["dense"] * model.n_layers
    return ["dense" if i in dense else "lighthouse" for i in range(model.n_layers)]


def _inner_attention(
    mode: str, lighthouse: LighthouseSection, stage: StageOptions
) -> LighthouseInnerAttention.Config:
    return LighthouseInnerAttention.Config(
        mode=mode,
        lighthouse=lighthouse.config(),
        exchange=stage.exchange,
        dense_exchange=stage.dense_exchange,
    )


def _block(
    model: ModelConfig, inner: LighthouseInnerAttention.Config, max_seq_len: int
) -> Llama3TransformerBlock.Config:
    std, out_std = model.init_std, model.init_std / (2 * model.n_layers) ** 0.5
    norm = {"weight": nn.init.ones_}
    rope = Float64CosSinRoPE.Config(
        dim=model.head_dim, max_seq_len=max_seq_len, theta=model.rope_theta
    )
    return Llama3TransformerBlock.Config(
        attention_norm=RMSNorm.Config(
            normalized_shape=model.dim, eps=model.norm_eps, param_init=norm
        ),
        ffn_norm=RMSNorm.Config(normalized_shape=model.dim, eps=model.norm_eps, param_init=norm),
        attention=make_gqa_config(
            dim=model.dim,
            n_heads=model.n_heads,
            n_kv_heads=model.n_kv_heads,
            wqkv_param_init=_normal(std),
            wo_param_init=_normal(out_std),
            inner_attention=inner,
            fuse_qkv=True,
            rope=rope,
        ),
        feed_forward=FeedForward.Config(
            w1=Linear.Config(
                in_features=model.dim, out_features=model.ffn_dim, param_init=_normal(std)
            ),
            w2=Linear.Config(
                in_features=model.ffn_dim, out_features=model.dim, param_init=_normal(out_std)
            ),
            w3=Linear.Config(
                in_features=model.dim, out_features=model.ffn_dim, param_init=_normal(std)
            ),
        ),
    )


def lighthouse_llama3_config(
    model: ModelConfig, lighthouse: LighthouseSection, stage: StageOptions, max_seq_len: int
) -> Llama3Model.Config:
    """torchtitan Llama3Model.Config of `model` with Lighthouse/dense inner attention per layer.

    max_seq_len sizes the RoPE cache (torchtitan resizes it to training.seq_len at build).
    """
    model.validate()
    modes = layer_modes(model, lighthouse, stage)
    std = model.init_std
    return Llama3Model.Config(
        dim=model.dim,
        vocab_size=model.vocab_size,
        enable_weight_tying=model.tie_embeddings,
        tok_embeddings=Embedding.Config(
            num_embeddings=model.vocab_size, embedding_dim=model.dim, param_init=_normal(std)
        ),
        norm=RMSNorm.Config(
            normalized_shape=model.dim, eps=model.norm_eps, param_init={"weight": nn.init.ones_}
        ),
        lm_head=Linear.Config(
            in_features=model.dim, out_features=model.vocab_size, param_init=_normal(std)
        ),
        layers=[
            _block(model, _inner_attention(mode, lighthouse, stage), max_seq_len) for mode in modes
        ],
    )


def lighthouse_model_spec(
    model: ModelConfig,
    lighthouse: LighthouseSection,
    stage: StageOptions,
    max_seq_len: int,
    flavor: str,
) -> ModelSpec:
    """The ModelSpec torchtitan's Trainer builds and parallelizes (no pipelining, no HF adapter)."""
    from lh_cp.torchtitan.parallelize import parallelize_lighthouse_llama

    return ModelSpec(
        name=MODEL_NAME,
        flavor=flavor,
        model=lighthouse_llama3_config(model, lighthouse, stage, max_seq_len),
        parallelize_fn=parallelize_lighthouse_llama,
        pipelining_fn=None,
        post_optimizer_build_fn=None,
        state_dict_adapter=None,
    )
