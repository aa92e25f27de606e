"""Triton pooling by token blocks: each input row is read once, each selected entry written once.

One program takes TB consecutive rows of one head of x (TB a multiple of every span it handles).
Level 1 is the rows themselves; levels 2..LB come out of one tensor-core product
pooled = A @ x, where A[r, t] = 1 if token t of the block lies in the span of stacked row r
(level-2 rows first, then level 3, ...): A is 0/1, so products are exact and sums accumulate in
float32. For each level the block's slots are looked up in the plan's slot map and the rows
whose entry was selected are written to their causal positions, for every query head reading
this head (GQA). Used for gather forward (mean, shift 0) and scatter backward (sum over the
window an entry delivers to: in u = t + 1 coordinates that window is the aligned block of the
entry's successor, so shift 1 reads rows u0 - 1 ... and the entry index is the block index - 1).

Measured on the H100 (benchmarks/NOTES.md): summing the levels in registers instead
(tl.reshape + tl.sum) ran at 0.35 TB/s; the product runs at 2.6 TB/s, a copy at 3.0 TB/s.
Levels whose span exceeds 256 tokens (pool=4 with levels >= 6, pool=8 with levels >= 4) go to the per-level kernel in
rows.py. Twin: rows_reference.pool_rows_reference (the same sums).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_BLOCK_TOKENS = (
    256  # at most this many rows of one head per program (spans pooled here are <= it)
)


@triton.jit
def _store_selected(
    vals, y_ptr, map_ptr, slot, ok, b, hx, group, heads, m, sy_b, sy_h, sy_s, cols, col_ok
):
    """Write the rows `vals` to the causal positions of their entries (`slot` indexes the plan's
    slot map, which holds -1 for an entry not selected), once per query head reading head hx.
    y is [B, H, S, D] with strides sy_b, sy_h, sy_s (a unit last stride): contiguous, or the
    heads-outer layout of a CP shard's entries (lh_cp.ops.kernels.rows.empty_entries)."""
    for g in range(group):
        bh = (b * heads + hx * group + g).to(tl.int64)
        position = tl.load(map_ptr + bh * m + slot, mask=ok, other=-1).to(tl.int64)
        row = b.to(tl.int64) * sy_b + (hx * group + g).to(tl.int64) * sy_h + position * sy_s
        tl.store(
            y_ptr + row[:, None] + cols[None, :],
            vals,
            mask=(position >= 0)[:, None] & col_ok[None, :],
        )


@triton.jit
def _store_level(
    cur,
    y_ptr,
    map_ptr,
    level_start,
    b,
    hx,
    group,
    heads,
    n,
    m,
    sy_b,
    sy_h,
    u0,
    sy_s,
    cols,
    col_ok,
    NB: tl.constexpr,
    SPAN: tl.constexpr,
    SHIFT: tl.constexpr,
    MEAN: tl.constexpr,
):
    """Write the NB pooled rows of one level to the positions of the selected entries."""
    j = u0 // SPAN + tl.arange(0, NB) - SHIFT  # entry index inside the level
    ok = (j >= 0) & (j < n // SPAN)
    if MEAN:
        cur = cur * (1.0 / SPAN)  # SPAN is a power of two: exact, and no division per element
    _store_selected(
        cur.to(y_ptr.dtype.element_ty),
        y_ptr,
        map_ptr,
        level_start + j,
        ok,
        b,
        hx,
        group,
        heads,
        m,
        sy_b,
        sy_h,
        sy_s,
        cols,
        col_ok,
    )


@triton.jit
def _store_levels_dot(
    x,
    y_ptr,
    map_ptr,
    b,
    hx,
    group,
    heads,
    n,
    m,
    sy_b,
    sy_h,
    u0,
    sy_s,
    cols,
    col_ok,
    P: tl.constexpr,
    LB: tl.constexpr,
    TB: tl.constexpr,
    R: tl.constexpr,
    SHIFT: tl.constexpr,
    MEAN: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Levels 2..LB at once on the tensor cores: pooled = A @ x with A[r, t] = 1 if token t of
    the block lies in the span of stacked row r (rows of level 2 first, then level 3, ...).
    A is 0/1, so the products are exact and the sums accumulate in float32."""
    r = tl.arange(0, R)
    span = tl.zeros([R], tl.int64) + 1
    index = tl.zeros([R], tl.int64)
    level_start = tl.zeros([R], tl.int64)
    valid = r < 0
    first = 0
    lvl_span = 1
    lvl_start = n * 0
    for _ in tl.static_range(LB - 1):
        lvl_start += n // lvl_span
        lvl_span = lvl_span * P
        count = TB // lvl_span
        inside = (r >= first) & (r < first + count)
        span = tl.where(inside, lvl_span, span)
        index = tl.where(inside, r - first, index)
        level_start = tl.where(inside, lvl_start, level_start)
        valid = valid | inside
        first = first + count
    t = tl.arange(0, TB)
    a = ((t[None, :] // span[:, None]) == index[:, None]) & valid[:, None]
    if x.dtype == tl.float32:
        pooled = tl.dot(a.to(tl.float32), x, input_precision="ieee")
    else:
        pooled = tl.dot(a.to(x.dtype), x, out_dtype=tl.float32)  # [R, BLOCK_D]
    if MEAN:
        pooled = pooled * (
            1.0 / span[:, None].to(tl.float32)
        )  # one reciprocal per row, exact for 2**k
    j = u0 // span + index - SHIFT
    ok = valid & (j >= 0) & (j < n // span)
    _store_selected(
        pooled.to(y_ptr.dtype.element_ty),
        y_ptr,
        map_ptr,
        level_start + j,
        ok,
        b,
        hx,
        group,
        heads,
        m,
        sy_b,
        sy_h,
        sy_s,
        cols,
        col_ok,
    )


@triton.jit
def _pool_blocks_kernel(
    x_ptr,
    tail_ptr,
    y_ptr,
    map_ptr,
    n,
    n_x,
    n_rows,
    x_heads,
    group,
    m,
    blocks,
    sx_b,
    sx_n,
    sx_h,
    st_b,
    st_n,
    st_h,
    sy_b,
    sy_h,
    sy_s,
    P: tl.constexpr,
    LB: tl.constexpr,
    TB: tl.constexpr,
    R: tl.constexpr,
    SHIFT: tl.constexpr,
    MEAN: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Token rows [B, n_rows, Hx, D] -> rows of y [B, Hx * group, S, D] for levels 1..LB.

    n (the plan's tokens) sizes the levels and their slots. Rows 0 .. n_x - 1 are x's; with
    HAS_TAIL rows n_x .. n_rows - 1 are the tail's (a CP chunk's scatter gradient: the chunk's
    rows, then the gradient of its spill rows, without concatenating them)."""
    pid = tl.program_id(0)
    bhx = pid // blocks
    u0 = (pid % blocks).to(tl.int64) * TB
    b = bhx // x_heads
    hx = bhx % x_heads
    heads = x_heads * group
    rows = u0 - SHIFT + tl.arange(0, TB)
    row_ok = (rows >= 0) & (rows < n_x)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ptr = (
        x_ptr
        + b.to(tl.int64) * sx_b
        + hx.to(tl.int64) * sx_h
        + rows[:, None] * sx_n
        + cols[None, :]
    )
    x = tl.load(ptr, mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [TB, BLOCK_D]
    if HAS_TAIL:
        in_tail = (rows >= n_x) & (rows < n_rows)
        tail = (
            tail_ptr
            + b.to(tl.int64) * st_b
            + hx.to(tl.int64) * st_h
            + (rows - n_x)[:, None] * st_n
            + cols[None, :]
        )
        x += tl.load(tail, mask=in_tail[:, None] & col_ok[None, :], other=0.0)
    _store_level(
        x.to(tl.float32),
        y_ptr,
        map_ptr,
        0,
        b,
        hx,
        group,
        heads,
        n,
        m,
        sy_b,
        sy_h,
        u0,
        sy_s,
        cols,
        col_ok,
        TB,
        1,
        SHIFT,
        MEAN,
    )
    if LB > 1:
        _store_levels_dot(
            x,
            y_ptr,
            map_ptr,
            b,
            hx,
            group,
            heads,
            n,
            m,
            sy_b,
            sy_h,
            u0,
            sy_s,
            cols,
            col_ok,
            P,
            LB,
            TB,
            R,
            SHIFT,
            MEAN,
            BLOCK_D,
        )


def block_levels(pool: int, levels: int) -> tuple[int, int]:
    """(levels pooled by token blocks, rows per block): every span up to MAX_BLOCK_TOKENS."""
    handled = 1
    while handled < levels and pool**handled <= MAX_BLOCK_TOKENS:
        handled += 1
    return handled, max(32, pool ** (handled - 1))


def launch_pool_blocks(
    x, tail, y, slot_map, n, group, pool, levels_here, rows_per_block, shift, mean, check_grid
):
    """Launch the block kernel on one [B, R, Hx, D] tensor, followed by `tail` [B, R', Hx, D]
    rows when not None -> rows of y [B, Hx * group, S, D]."""
    batch, n_x, x_heads, dim = x.shape
    t = x if tail is None else tail
    n_rows = n_x + (0 if tail is None else tail.shape[1])
    m = slot_map.shape[-1]
    blocks = triton.cdiv(
        n_rows + shift, rows_per_block
    )  # shift 1: one more block for the last deliveries
    stacked = sum(rows_per_block // pool**level for level in range(1, levels_here))
    grid = check_grid(batch * x_heads * blocks)
    _pool_blocks_kernel[grid](
        x,
        t,
        y,
        slot_map,
        n,
        n_x,
        n_rows,
        x_heads,
        group,
        m,
        blocks,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        t.stride(0),
        t.stride(1),
        t.stride(2),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        P=pool,
        LB=levels_here,
        TB=rows_per_block,
        R=max(16, triton.next_power_of_2(stacked)),
        SHIFT=shift,
        MEAN=mean,
        HAS_TAIL=tail is not None,
        D=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        num_warps=8 if rows_per_block * dim >= 8192 else 4,
    )
