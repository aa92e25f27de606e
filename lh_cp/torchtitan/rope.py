"""Rotate-half RoPE (the HF Llama layout lh-cp's model uses) with angles formed in float64.

torchtitan's CosSinRoPE forms position * frequency in float32, which at a million positions
is off by ~0.1 rad; lh-cp forms the angles in float64 (lh_cp.model.rope_tables). Only the
cache construction differs: applying the cache is CosSinRoPE's own code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchtitan.models.common.rope import CosSinRoPE


class Float64CosSinRoPE(CosSinRoPE):
    @dataclass(kw_only=True, slots=True)
    class Config(CosSinRoPE.Config):
        def __post_init__(self) -> None:
            if self.scaling != "none":
                raise ValueError(f"Float64CosSinRoPE supports scaling='none' only, got scaling={self.scaling!r}")
            if self.dim % 2 != 0:
                raise ValueError(f"RoPE head dimension must be even, got dim={self.dim}")

    def _precompute_cache(self) -> torch.Tensor:
        """[max_seq_len, 2 * dim]: cos then sin of each rotated pair, duplicated per half."""
        cfg = self.config
        inv_freq = cfg.theta ** (-torch.arange(0, cfg.dim, 2, dtype=torch.float64) / cfg.dim)  # [dim / 2]
        angles = torch.arange(cfg.max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)  # [max_seq_len, dim]
        return torch.cat([angles.cos(), angles.sin()], dim=-1).to(torch.float32)
