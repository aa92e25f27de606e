"""Lighthouse or dense causal attention as the inner attention of torchtitan's GQAttention.

torchtitan's GQAttention projects q/k/v, applies RoPE and calls its `inner_attention` module
with q [B, L, H, D] and k, v [B, L, Hkv, D]: the public layout of lh_cp.lighthouse_attention,
so this module only chooses the function. Under context parallelism the parallelize step hands
it the CP ProcessGroup (set_context_parallel); the tensors are then the rank's head-tail shard
and lh-cp's own exchange moves compressed K/V (Lighthouse) or K/V blocks (dense) between ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torchtitan.protocols.module import Module

from lh_cp.attention import causal_attention, lighthouse_attention
from lh_cp.config import LighthouseConfig

MODES = ("lighthouse", "dense")
EXCHANGES = ("allgather", "ring")


class LighthouseInnerAttention(Module):
    """Causal attention over the whole sequence: Lighthouse (mode='lighthouse') or dense."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        """mode: 'lighthouse' or 'dense' (dense layers, and every layer in recovery).
        pool, levels, topk, tile_budget: LighthouseConfig (lh_cp/config.py); unused when dense.
        exchange: CP exchange of the compressed K/V of Lighthouse layers: 'allgather' or 'ring'.
        dense_exchange: CP exchange of dense layers: 'ring' or 'allgather'.
        """

        mode: str = "lighthouse"
        pool: int = 4
        levels: int = 3
        topk: int = 2048
        tile_budget: int = 128
        exchange: str = "allgather"
        dense_exchange: str = "ring"

        def __post_init__(self) -> None:
            if self.mode not in MODES:
                raise ValueError(f"inner attention mode must be one of {MODES}, got mode={self.mode!r}")
            for name in ("exchange", "dense_exchange"):
                if getattr(self, name) not in EXCHANGES:
                    raise ValueError(f"inner attention {name} must be one of {EXCHANGES}, got {name}={getattr(self, name)!r}")
            self.lighthouse_config()

        def lighthouse_config(self) -> LighthouseConfig:
            return LighthouseConfig(pool=self.pool, levels=self.levels, topk=self.topk, tile_budget=self.tile_budget)

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.mode = config.mode
        self.lighthouse = config.lighthouse_config()
        self.exchange = config.exchange
        self.dense_exchange = config.dense_exchange
        self.cp_group: dist.ProcessGroup | None = None

    def set_context_parallel(self, group: dist.ProcessGroup | None) -> None:
        """Inputs become this rank's head-tail shard of a sequence split over `group`."""
        self.cp_group = group

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
        """q [B, L, H, D], k/v [B, L, Hkv, D] (GQA when Hkv < H) -> [B, L, H, D]."""
        if attention_masks is not None:
            raise ValueError(
                "LighthouseInnerAttention is causal over the whole sequence and takes no attention "
                f"masks (document masking is not supported), got {type(attention_masks).__name__}"
            )
        head_dim = q_BLNH.shape[-1]
        if scale is not None and abs(scale - head_dim**-0.5) > 1e-12 * scale:
            raise ValueError(f"LighthouseInnerAttention uses scale 1/sqrt(head_dim) = {head_dim**-0.5}, got scale={scale}")
        if self.mode == "lighthouse":
            return lighthouse_attention(q_BLNH, k_BLNH, v_BLNH, self.lighthouse, cp=self.cp_group, exchange=self.exchange)
        return causal_attention(q_BLNH, k_BLNH, v_BLNH, cp=self.cp_group, exchange=self.dense_exchange)
