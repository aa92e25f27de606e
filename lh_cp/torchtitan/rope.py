"""Rotate-half RoPE (the HF Llama layout lh-cp's model uses), angles in float64, one table per model.

torchtitan's CosSinRoPE forms position * frequency in float32, which at a million positions
is off by ~0.1 rad; lh-cp forms the angles in float64 (lh_cp.model.transformer.rope_tables). And every
torchtitan attention layer builds its own [max_seq_len, 2 * head_dim] float32 table: 134 MB per
layer at 128K tokens and head size 128, 1 GiB per layer at 1M. Here layers of equal shape share
one table (a read-only buffer), built once per device. Applying the table is CosSinRoPE's code.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torchtitan.models.common.rope import CosSinRoPE

# (dim, max_seq_len, theta, device) -> the table, kept while some module holds it.
_TABLES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def rope_table(dim: int, max_seq_len: int, theta: float, device: torch.device) -> torch.Tensor:
    """[max_seq_len, 2 * dim] float32: cos then sin of each rotated pair, duplicated per half."""
    key = (dim, max_seq_len, float(theta), str(device))
    table = _TABLES.get(key)
    if table is None:
        inv_freq = theta ** (
            -torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
        )  # [dim / 2]
        angles = (
            torch.arange(max_seq_len, dtype=torch.float64, device=device)[:, None]
            * inv_freq[None, :]
        )
        angles = torch.cat([angles, angles], dim=-1)  # [max_seq_len, dim]
        table = torch.cat([angles.cos(), angles.sin()], dim=-1).to(torch.float32)
        _TABLES[key] = table
    return table


class Float64CosSinRoPE(CosSinRoPE):
    @dataclass(kw_only=True, slots=True)
    class Config(CosSinRoPE.Config):
        def __post_init__(self) -> None:
            if self.scaling != "none":
                raise ValueError(
                    f"Float64CosSinRoPE supports scaling='none' only, got scaling={self.scaling!r}"
                )
            if self.dim % 2 != 0:
                raise ValueError(f"RoPE head dimension must be even, got dim={self.dim}")

    def _precompute_cache(self) -> torch.Tensor:
        # torchtitan builds buffers under a `torch.device(...)` context (meta, then the training
        # device); an empty tensor tells which device that is.
        device = torch.empty(0).device
        return rope_table(self.config.dim, self.config.max_seq_len, self.config.theta, device)
