"""Compression and delivery of a rank's chunks in the CP Lighthouse layer: reference and kernels.

lighthouse_attention_cp treats the rank's two chunks as a batch of 2B sequences of C tokens
(LIGHTHOUSE.md s.8). Per chunk it needs the pooled q, k, v of the chunk-local selection and a
scatter of the entry outputs onto R >= C rows: the chunk plus its spill into the next chunk.
Two twins with the same selection and, up to float32 summation order, the same values:

- reference (CPU, float64, or kernels disabled): lh_cp.select, gather_entries, scatter_entries;
- kernels (CUDA, lh_cp.kernels.available): Triton norms and selection write the index plan
  directly; the row kernels gather, and scatter onto R rows (their backward reads R rows).
  No host sync besides the selection's NaN check, which raises as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from lh_cp import kernels
from lh_cp.config import LighthouseConfig
from lh_cp.pyramid import gather_entries
from lh_cp.scatter import scatter_entries
from lh_cp.select import select


@dataclass(frozen=True)
class ChunkEntries:
    """Pooled entries [2B, H, S_c, D] of q, k, v (k and v per query head, as selected) and
    deliver(out_entries [2B, H, S_c, D], rows) -> [2B, rows, H, D], differentiable."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    deliver: Callable[[torch.Tensor, int], torch.Tensor]


def compress_chunks_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LighthouseConfig) -> ChunkEntries:
    """Pure-PyTorch twin: q [2B, C, H, D], k/v [2B, C, Hkv, D] with the chunk config."""
    chunk = q.shape[1]
    sel = select(q.detach(), k.detach(), cfg)  # [2B, H, S_c] chunk-local spans
    slots = sel.slots(chunk, cfg)
    q_entries = gather_entries(q, slots, cfg)  # [2B, H, S_c, D]
    k_entries = gather_entries(k, slots, cfg)  # per query head (selection is)
    v_entries = gather_entries(v, slots, cfg)
    return ChunkEntries(q_entries, k_entries, v_entries, lambda out, rows: scatter_entries(out, sel, rows, cfg))


def compress_chunks_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LighthouseConfig) -> ChunkEntries:
    """Triton twin (lh_cp.kernels.ops): same arguments, same selection."""
    from lh_cp.kernels.ops import gather_plan, scatter_plan, select_with_plan

    plan = select_with_plan(q, k, cfg)[0]
    q_entries, k_entries, v_entries = gather_plan(q, k, v, plan, cfg)  # [2B, H, S_c, D] each
    return ChunkEntries(q_entries, k_entries, v_entries, lambda out, rows: scatter_plan(out, plan, cfg, rows))


def compress_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LighthouseConfig) -> ChunkEntries:
    """The kernel twin where the kernels run (CUDA, kernel dtypes, Triton), else the reference."""
    if kernels.available(q, k, v):
        return compress_chunks_kernels(q, k, v, cfg)
    return compress_chunks_reference(q, k, v, cfg)
