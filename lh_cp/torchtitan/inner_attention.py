"""Lighthouse or dense causal attention as the inner attention of torchtitan's GQAttention.

torchtitan's GQAttention projects q/k/v, applies RoPE and calls its `inner_attention` module
with q [B, L, H, D] and k, v [B, L, Hkv, D]: the public layout of lh_cp.lighthouse_attention,
so this module only chooses the function. Under context parallelism the parallelize step hands
it a ContextParallel (use_context, as lh-cp's own Attention gets one); the tensors are then the
rank's head-tail shard and lh-cp's exchange moves compressed K/V (Lighthouse) or K/V blocks
(dense) between ranks.

Document masks: torchtitan 0.3.0 builds `attention_masks` from per-document positions, as a
VarlenMetadata (cu_seq_q, cu_seq_k: int32 cumulative document lengths over the flattened
batch, the varlen layout) for its varlen backend or a FlexAttention BlockMask for its flex
backend. A VarlenMetadata whose query and key boundaries are equal is exactly lh-cp's
documents= contract, so every layer takes it (documents=cu_seq_q; under CP it must be the
global one, as torchtitan builds it before sharding the inputs): dense layers attend inside
each document, Lighthouse layers as LIGHTHOUSE.md s.12 defines. A BlockMask is refused: it
holds an arbitrary mask function compiled to block indices, from which document boundaries
cannot be read back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torchtitan.models.common.attention import VarlenMetadata
from torchtitan.protocols.module import Module

from lh_cp.ops.attention import SINGLE_DEVICE
from lh_cp.ops.config import LighthouseConfig
from lh_cp.parallel.context import HEADTAIL_EXCHANGES

MODES = ("lighthouse", "dense")
EXCHANGES = HEADTAIL_EXCHANGES  # torchtitan's CP input split is the head-tail layout


class LighthouseInnerAttention(Module):
    """Causal attention over the whole sequence: Lighthouse (mode='lighthouse') or dense."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        """mode: 'lighthouse' or 'dense' (dense layers, and every layer in recovery).
        lighthouse: the Lighthouse settings (lh_cp/ops/config.py); unused when dense.
        exchange: CP exchange of the compressed K/V of Lighthouse layers: 'allgather' or 'ring'.
        dense_exchange: CP exchange of dense layers: 'ring' or 'allgather'.
        """

        mode: str = "lighthouse"
        lighthouse: LighthouseConfig = field(default_factory=LighthouseConfig)
        exchange: str = "allgather"
        dense_exchange: str = "ring"

        def __post_init__(self) -> None:
            if self.mode not in MODES:
                raise ValueError(
                    f"inner attention mode must be one of {MODES}, got mode={self.mode!r}"
                )
            for name in ("exchange", "dense_exchange"):
                if getattr(self, name) not in EXCHANGES:
                    raise ValueError(
                        f"inner attention {name} must be one of {EXCHANGES}, got {name}={getattr(self, name)!r}"
                    )
            if not isinstance(self.lighthouse, LighthouseConfig):
                raise ValueError(
                    f"inner attention lighthouse must be a LighthouseConfig, got {self.lighthouse!r}"
                )
            if self.lighthouse.rope != "tokens":
                # torchtitan's GQAttention rotates q and k before it calls its inner attention,
                # so this module never sees them unrotated (LIGHTHOUSE.md s.14).
                raise ValueError(
                    f"lighthouse.rope={self.lighthouse.rope!r} is not available with torchtitan: "
                    f"its GQAttention applies RoPE to q and k before the inner attention, which "
                    f'needs them unrotated for rope="entries"; use rope="tokens" or lh-cp\'s own '
                    f"trainer"
                )

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.mode = config.mode
        self.lighthouse = config.lighthouse
        self.exchange = config.exchange
        self.dense_exchange = config.dense_exchange
        self.context = SINGLE_DEVICE

    def use_context(self, context) -> None:
        """Run through `context`: a ContextParallel makes the inputs this rank's head-tail shard."""
        self.context = context

    def forward(
        self,
        q_BLNH: torch.Tensor,
        k_BLNH: torch.Tensor,
        v_BLNH: torch.Tensor,
        *,
        attention_masks=None,
        scale: float | None = None,
        enable_gqa: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """q [B, L, H, D], k/v [B, L, Hkv, D] (GQA when Hkv < H) -> [B, L, H, D];
        attention_masks: None (causal over each whole sequence) or a VarlenMetadata of
        documents (document_masks)."""
        documents = document_masks(attention_masks)
        head_dim = q_BLNH.shape[-1]
        if scale is not None and abs(scale - head_dim**-0.5) > 1e-12 * scale:
            raise ValueError(
                f"LighthouseInnerAttention uses scale 1/sqrt(head_dim) = {head_dim**-0.5}, got scale={scale}"
            )
        if self.mode == "lighthouse":
            return self.context.lighthouse(q_BLNH, k_BLNH, v_BLNH, self.lighthouse, documents)
        return self.context.dense(q_BLNH, k_BLNH, v_BLNH, documents)


def document_masks(attention_masks) -> torch.Tensor | None:
    """lh-cp's documents= from torchtitan's attention masks: None -> None; a VarlenMetadata of
    self-attention (cu_seq_q equal to cu_seq_k) -> its cu_seq_q; anything else is refused,
    naming why."""
    if attention_masks is None:
        return None
    if isinstance(attention_masks, VarlenMetadata):
        if attention_masks.cu_seq_q is not attention_masks.cu_seq_k and not torch.equal(
            attention_masks.cu_seq_q, attention_masks.cu_seq_k
        ):
            raise ValueError(
                "LighthouseInnerAttention takes a VarlenMetadata of documents (cu_seq_q equal to "
                "cu_seq_k: each document attends to itself); these query and key boundaries differ"
            )
        return attention_masks.cu_seq_q
    raise ValueError(
        f"LighthouseInnerAttention takes document masks as torchtitan's VarlenMetadata (the "
        f"varlen backend's cumulative document lengths, lh-cp's documents=), got "
        f"{type(attention_masks).__name__}: a FlexAttention BlockMask holds a compiled mask "
        f"function from which document boundaries cannot be read back"
    )
