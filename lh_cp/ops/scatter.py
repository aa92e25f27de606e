"""Scatter of attention outputs back to token positions (LIGHTHOUSE.md s.6), pure PyTorch.

An entry covering [s, e) with c = e - s adds its output to positions [e-1, e-1+c). In the
shifted coordinate u = t + 1 that window is exactly the c-aligned block [e, e+c), i.e. block
e/c of its own level. So each level's outputs are written into a per-level buffer of blocks
(one slot per entry: no two entries of a level share a slot), the buffers are expanded onto
the rows they span and summed, and positions u = 1..N are read off. Backward is the adjoint:
block sums of the shifted gradient, read at each entry's slot.
"""

from __future__ import annotations

import torch

from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.entries import Selection
from lh_cp.ops.pyramid import accumulation_dtype, expand_levels, level_offsets, reduce_levels


class _PyramidScatter(torch.autograd.Function):
    """Entry outputs [B, H, S, D] -> token outputs [B, N, H, D] (sum of deliveries).

    Saved for backward: only `slots` (int64 [B, H, S]); scatter is linear, so its backward
    needs no values from the forward.
    """

    @staticmethod
    def forward(ctx, entries, slots, n, cfg):
        batch, heads, _, dim = entries.shape
        acc = accumulation_dtype(entries.dtype)
        rows = n + cfg.coarsest_span
        offsets = level_offsets(rows, cfg)
        flat = entries.new_zeros((batch, offsets[-1], heads, dim), dtype=acc)
        b_idx = torch.arange(batch, device=entries.device).view(batch, 1, 1)
        h_idx = torch.arange(heads, device=entries.device).view(1, heads, 1)
        # Each (head, level, block) slot is written by at most one entry: a plain write.
        flat[b_idx, slots, h_idx] = entries.to(acc)
        per_level = [flat[:, offsets[i] : offsets[i + 1]] for i in range(cfg.levels)]
        shifted = expand_levels(per_level, cfg.pool, 1.0)  # [B, N + c_L, H, D], row u = t + 1
        ctx.save_for_backward(slots)
        ctx.n, ctx.cfg, ctx.dtype = n, cfg, entries.dtype
        return shifted[:, 1 : n + 1].to(entries.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (slots,) = ctx.saved_tensors
        n, cfg = ctx.n, ctx.cfg
        batch, _, heads, dim = grad_out.shape
        acc = accumulation_dtype(ctx.dtype)
        shifted = grad_out.new_zeros((batch, n + cfg.coarsest_span, heads, dim), dtype=acc)
        shifted[:, 1 : n + 1] = grad_out.to(acc)
        flat = torch.cat(reduce_levels(shifted, cfg.pool, cfg.levels, "sum"), dim=1)
        b_idx = torch.arange(batch, device=slots.device).view(batch, 1, 1)
        h_idx = torch.arange(heads, device=slots.device).view(1, heads, 1)
        return flat[b_idx, slots, h_idx].to(ctx.dtype), None, None, None


def scatter_entries(
    entries: torch.Tensor, sel: Selection, n: int, cfg: LighthouseConfig
) -> torch.Tensor:
    """Deliver entry outputs [B, H, S, D] to the n token positions: returns [B, n, H, D]."""
    # Row u = t + 1 of the shifted buffer; an entry's window is block end / span of its level.
    slots = sel.slots(n + cfg.coarsest_span, cfg, shift=1)
    return _PyramidScatter.apply(entries, slots, n, cfg)
