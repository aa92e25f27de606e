"""Pyramid pooling, scores and the gather of selected entries (pure-PyTorch reference).

A pyramid of a tensor x [B, R, Hx, D] has `levels` levels; level 1 is x itself and level l
reduces each run of `pool` consecutive level-(l-1) rows, so a level-l row spans pool**(l-1)
rows of x. Levels are stored level-major in one flat tensor [B, M, Hx, D] so that one integer
per entry (its "slot") addresses it; `level_offsets` gives where each level starts.

The gather below and the scatter in scatter.py are adjoint pairs of the same two moves:
reduce a sequence into its pyramid, and expand a pyramid back onto the sequence.
"""

from __future__ import annotations

import torch

from lh_cp.ops.config import LighthouseConfig


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Pooling and scatter sums run in float32 for low-precision inputs, float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduce_levels(
    x: torch.Tensor, pool: int, levels: int, mode: str, dim: int = 1
) -> list[torch.Tensor]:
    """[x, reduce(x), reduce(reduce(x)), ...] along `dim`, reducing `pool` rows at a time.

    mode "mean" builds the pooled vectors, "sum" block sums, "max" pooled scores. Reducing
    level by level is exact for max and sum and equal to the direct mean up to rounding.
    """
    out = [x]
    for _ in range(levels - 1):
        prev = out[-1]
        shape = prev.shape
        blocks = prev.view(*shape[:dim], shape[dim] // pool, pool, *shape[dim + 1 :])
        if mode == "mean":
            out.append(blocks.mean(dim=dim + 1))
        elif mode == "sum":
            out.append(blocks.sum(dim=dim + 1))
        elif mode == "max":
            out.append(blocks.amax(dim=dim + 1))
        else:
            raise ValueError(f"unknown reduce mode {mode!r}; expected 'mean', 'sum' or 'max'")
    return out


def expand_levels(pyramid: list[torch.Tensor], pool: int, child_scale: float) -> torch.Tensor:
    """Adjoint of reduce_levels for "sum" (child_scale=1) or "mean" (child_scale=1/pool).

    Returns the level-1-shaped sum over levels of each level's rows repeated onto the rows
    they span, multiplied by child_scale once per level descended.
    """
    acc = pyramid[-1]
    for finer in reversed(pyramid[:-1]):
        repeated = acc.unsqueeze(2).expand(acc.shape[0], acc.shape[1], pool, *acc.shape[2:])
        repeated = repeated.reshape(finer.shape)
        acc = finer + repeated * child_scale if child_scale != 1.0 else finer + repeated
    return acc


def level_offsets(rows: int, cfg: LighthouseConfig) -> list[int]:
    """Start of each level (index l-1) in a flat pyramid whose level 1 has `rows` rows."""
    offsets, total = [], 0
    for level in range(1, cfg.levels + 1):
        offsets.append(total)
        total += rows // cfg.span(level)
    offsets.append(total)
    return offsets


def _head_index(heads: int, x_heads: int, device: torch.device) -> torch.Tensor:
    """Which head of x each of `heads` selection heads reads (GQA: h // group)."""
    return (torch.arange(heads, device=device) // (heads // x_heads)).view(1, heads, 1)


class _PyramidGather(torch.autograd.Function):
    """Pooled vectors of the selected entries: x [B, N, Hx, D] -> [B, H, S, D].

    Saved for backward: only `slots` (int64 [B, H, S]); the pooled pyramid is rebuilt from
    nothing because the backward of a mean needs no input values, only shapes.
    """

    @staticmethod
    def forward(ctx, x, slots, cfg):
        batch, _, x_heads, _ = x.shape
        heads = slots.shape[1]
        acc = accumulation_dtype(x.dtype)
        pyramid = reduce_levels(x.to(acc), cfg.pool, cfg.levels, "mean")
        flat = torch.cat(pyramid, dim=1)  # [B, M, Hx, D]
        b_idx = torch.arange(batch, device=x.device).view(batch, 1, 1)
        h_idx = _head_index(heads, x_heads, x.device)
        ctx.save_for_backward(slots)
        ctx.shape, ctx.dtype, ctx.cfg = x.shape, x.dtype, cfg
        return flat[b_idx, slots, h_idx].to(x.dtype)  # [B, H, S, D]

    @staticmethod
    def backward(ctx, grad_entries):
        (slots,) = ctx.saved_tensors
        batch, n, x_heads, dim = ctx.shape
        heads = slots.shape[1]
        acc = accumulation_dtype(ctx.dtype)
        offsets = level_offsets(n, ctx.cfg)
        grad_flat = grad_entries.new_zeros((batch, offsets[-1], x_heads, dim), dtype=acc)
        b_idx = torch.arange(batch, device=slots.device).view(batch, 1, 1)
        h_idx = _head_index(heads, x_heads, slots.device)
        # accumulate: with GQA several query heads may pick the same key/value entry.
        grad_flat.index_put_((b_idx, slots, h_idx), grad_entries.to(acc), accumulate=True)
        per_level = [grad_flat[:, offsets[i] : offsets[i + 1]] for i in range(ctx.cfg.levels)]
        grad_x = expand_levels(per_level, ctx.cfg.pool, 1.0 / ctx.cfg.pool)
        return grad_x.to(ctx.dtype), None, None


def gather_entries(x: torch.Tensor, slots: torch.Tensor, cfg: LighthouseConfig) -> torch.Tensor:
    """Mean-pooled vectors of x [B, N, Hx, D] at pyramid `slots` [B, H, S] -> [B, H, S, D].

    H may be a multiple of Hx (GQA): selection head h reads head h // (H // Hx) of x.
    """
    return _PyramidGather.apply(x, slots, cfg)
