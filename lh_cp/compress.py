"""compress(q, k, v, cfg) -> Compressed: one Lighthouse layer's selection, pooled entries and
their delivery back to token rows; the one place that chooses the Triton kernels or the
pure-PyTorch reference.

Every Lighthouse path is compress -> causal attention over the entries -> deliver:
- one device (lh_cp/attention.py): causal_sdpa over the entries, deliver onto N rows;
- a context-parallel head-tail shard (lh_cp/parallel/headtail/attention.py): the two chunks
  as a batch of 2B sequences, the entries exchanged across ranks, delivered onto C + c_L rows
  (the spill into the next chunk travels as a halo);
- compressed Ulysses (lh_cp/parallel/ulysses/compressed.py): one contiguous shard, the
  entries all-to-all'd to head groups and back, delivered onto C + c_L rows likewise.

The two twins give the same selection and, up to float32 summation order, the same values:
- reference (CPU, float64, or kernels.disabled()): lh_cp.select, gather_entries,
  scatter_entries;
- kernels (CUDA, kernel dtypes, Triton installed: lh_cp.kernels.available): Triton norms and
  selection write the index plan directly, the row kernels gather and scatter.
Both refuse non-finite q, k or v (lh_cp.select.check_finite) with the one host sync the
selection makes; with a selection given nothing is checked (attend_selected).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lh_cp import kernels
from lh_cp.config import LighthouseConfig
from lh_cp.pyramid import gather_entries
from lh_cp.scatter import scatter_entries
from lh_cp.select import Selection, select


@dataclass(frozen=True)
class Compressed:
    """Pooled entries of q, k and v, [B, H, S, D] each (k and v per query head, as the
    selection is), sorted by the causal key, and deliver(out_entries [B, H, S, D], rows) ->
    [B, rows, H, D] (differentiable; rows >= N keeps what the last spans deliver past the end
    of the sequence, rows = N clips it as the single-device layer does)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    deliver: Callable[[torch.Tensor, int], torch.Tensor]


def compress_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LighthouseConfig,
                       selection: Selection | None = None) -> Compressed:
    """Pure-PyTorch twin: q [B, N, H, D], k/v [B, N, Hkv, D]; `selection` given or computed."""
    n = q.shape[1]
    sel = select(q.detach(), k.detach(), cfg, v.detach()) if selection is None else selection  # [B, H, S]
    slots = sel.slots(n, cfg)  # [B, H, S] rows of the pooled pyramid
    entries = [gather_entries(x, slots, cfg) for x in (q, k, v)]  # [B, H, S, D]; k, v via kv head h // group
    return Compressed(*entries, lambda out, rows: scatter_entries(out, sel, rows, cfg))


def compress_kernels(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LighthouseConfig,
                     selection: Selection | None = None) -> Compressed:
    """Triton twin (lh_cp.kernels.ops): same arguments, same selection."""
    from lh_cp.kernels.ops import gather_plan, scatter_plan, select_with_plan
    from lh_cp.kernels.plan import Plan

    plan = select_with_plan(q, k, cfg, v)[0] if selection is None else Plan.from_selection(selection, q.shape[1], cfg)
    q_entries, k_entries, v_entries = gather_plan(q, k, v, plan, cfg)  # [B, H, S, D] each
    return Compressed(q_entries, k_entries, v_entries, lambda out, rows: scatter_plan(out, plan, cfg, rows))


def compress(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LighthouseConfig,
             selection: Selection | None = None) -> Compressed:
    """The kernel twin where the kernels run (CUDA, kernel dtypes, Triton), else the reference."""
    if kernels.available(q, k, v):
        return compress_kernels(q, k, v, cfg, selection)
    return compress_reference(q, k, v, cfg, selection)


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over entries [B, H, S, D] (equal head counts), scale 1/sqrt(D): the
    fastest fused backend where the kernels run (lh_cp/kernels/sdpa.py), PyTorch's default
    dispatch elsewhere."""
    if kernels.available(q, k, v):
        from lh_cp.kernels.sdpa import sdpa_causal_fast

        return sdpa_causal_fast(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
