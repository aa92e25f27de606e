"""Pure-PyTorch twins of the two row kernels in rows.py (same arguments, same results).

Gather and scatter are each one of two moves over a Plan, and each one's backward is the other:

- pool: for every selected entry (index i of level l, span c), the sum (or mean) of the rows
  i*c + shift*(c-1) + [0, c) of a token tensor, clipped to its rows (N, or more: see below),
  written to the entry's causal position. shift=0 pools an entry's own span (gather forward,
  mean); shift=1 sums the window an entry delivers to (scatter backward).
- expand: for every token t, the sum over levels of the entry in slot (t + shift) // c - shift of
  that level, if selected, times 1/c (gather backward) or 1 (scatter forward, shift=1); with
  GQA the `group` query heads that share a key/value head are summed too.

Under context parallelism a chunk's scatter runs past the chunk end (LIGHTHOUSE.md s.8): the
token tensor of expand (output) and pool (input) then holds rows past N, the spill into the
next chunk: expand writes them apart (first_row=N), pool reads them from a `tail` after x's
rows; the plan still describes the N tokens of the chunk.
"""

from __future__ import annotations

import torch

from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.kernels.slot_plan import Plan, level_block_offsets
from lh_cp.ops.pyramid import accumulation_dtype, level_offsets


def check_row_window(n: int, rows: int, first_row: int) -> None:
    """The rows an expand writes: the whole sequence (first_row 0, rows >= n, so that nothing
    is clipped) or rows past it (first_row n, rows >= 1: a CP chunk's spill)."""
    if first_row == 0 and rows < n:
        raise ValueError(
            f"expand_rows writes at least the plan's {n} rows from row 0, got rows={rows}"
        )
    if first_row not in (0, n) or rows < 1:
        raise ValueError(
            f"expand_rows writes rows from 0 or from the plan's n={n} on, at least one: "
            f"got first_row={first_row}, rows={rows}"
        )


def pool_rows_reference(
    x: torch.Tensor,
    plan: Plan,
    cfg: LighthouseConfig,
    shift: int,
    mean: bool,
    group: int = 1,
    tail: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [B, R, Hx, D] (R >= plan.n rows), then `tail` [B, R', Hx, D] rows if given ->
    [B, H, S, D]; entry head h reads head h // group of x."""
    if tail is not None:
        x = torch.cat([x, tail], dim=1)
    batch, rows_total, _, dim = x.shape
    n = plan.n
    heads, s = plan.level_index.shape[1], plan.level_index.shape[2]
    acc = accumulation_dtype(x.dtype)
    out = torch.zeros((batch, heads, s, dim), dtype=acc, device=x.device)
    blocks = level_block_offsets(n, cfg)
    b_idx = torch.arange(batch, device=x.device).view(batch, 1, 1, 1)
    h_idx = (torch.arange(heads, device=x.device) // group).view(1, heads, 1, 1)
    for level in range(1, cfg.levels + 1):
        span = cfg.span(level)
        index = plan.level_index[..., blocks[level - 1] : blocks[level]].to(torch.int64)
        position = plan.level_position[..., blocks[level - 1] : blocks[level]].to(torch.int64)
        rows = index.unsqueeze(-1) * span + shift * (span - 1) + torch.arange(span, device=x.device)
        valid = (
            rows < rows_total
        )  # [B, H, count, span]; only the scatter window can run past the end
        values = x[b_idx, rows.clamp(max=rows_total - 1), h_idx].to(acc) * valid.unsqueeze(-1)
        total = values.sum(dim=3)  # [B, H, count, D]
        if mean:
            total = total / span
        out.scatter_(2, position.unsqueeze(-1).expand(-1, -1, -1, dim), total)
    return out.to(x.dtype)


def expand_rows_reference(
    src: torch.Tensor,
    plan: Plan,
    cfg: LighthouseConfig,
    shift: int,
    mean: bool,
    group: int = 1,
    rows: int | None = None,
    first_row: int = 0,
) -> torch.Tensor:
    """src [B, H, S, D] -> [B, R, H // group, D] (R = rows, default plan.n) holding token rows
    first_row .. first_row + R - 1 (check_row_window): per token, the sum over levels (and
    group heads)."""
    batch, heads, _, dim = src.shape
    n = plan.n
    rows = n if rows is None else rows
    check_row_window(n, rows, first_row)
    acc = accumulation_dtype(src.dtype)
    offsets = level_offsets(n, cfg)
    tokens = torch.arange(first_row, first_row + rows, device=src.device)
    out = torch.zeros((batch, rows, heads, dim), dtype=acc, device=src.device)
    padded = torch.cat([src.to(acc), src.new_zeros((batch, heads, 1, dim), dtype=acc)], dim=2)
    for level in range(1, cfg.levels + 1):
        span = cfg.span(level)
        slot = (tokens + shift) // span - shift  # [R]
        has_slot = (slot >= 0) & (
            slot < n // span
        )  # past the chunk end: only the last slots deliver
        lookup = plan.slot_map[..., offsets[level - 1] + slot.clamp(min=0, max=n // span - 1)].to(
            torch.int64
        )  # [B, H, R]
        lookup = torch.where(has_slot & (lookup >= 0), lookup, padded.shape[2] - 1)  # zero row
        found = padded.gather(2, lookup.unsqueeze(-1).expand(-1, -1, -1, dim))  # [B, H, R, D]
        out += found.transpose(1, 2) / span if mean else found.transpose(1, 2)
    out = out.view(batch, rows, heads // group, group, dim).sum(dim=3)
    return out.to(src.dtype)
