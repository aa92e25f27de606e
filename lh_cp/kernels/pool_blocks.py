"""Triton pooling by token blocks: each input row is read once, each selected entry written once.

One program takes TB consecutive rows of one head of x (TB a multiple of every span it
handles), sums them level by level in registers (level l+1 = sums of P consecutive level-l
rows) and, for each level, looks the block's slots up in the plan's slot map and writes the
rows whose entry was selected to their causal positions, for every query head that reads this
head (GQA). Used for gather forward (mean, shift 0) and scatter backward (sum over the window an
entry delivers to: in u = t + 1 coordinates that window is the aligned block of the entry's
successor, so shift 1 reads rows u0 - 1 ... and the entry index is the block index minus 1).

Levels whose span exceeds TB (only when pool**(levels-1) > 64) go to the per-level kernel
in rows.py. Twin: rows_reference.pool_rows_reference (the same sums).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_BLOCK_TOKENS = 64  # rows of one head per program; the levels pooled here have spans <= this
USE_TENSOR_CORES = False  # levels 2.. as one 0/1 matrix product (see _store_levels_dot)


@triton.jit
def _reduce_rows(cur, NB: tl.constexpr, P: tl.constexpr, BLOCK_D: tl.constexpr):
    """[NB, BLOCK_D] -> [NB // P, BLOCK_D]: sums of P consecutive rows, in a fixed order."""
    return tl.sum(tl.reshape(cur, [NB // P, P, BLOCK_D]), axis=1)


@triton.jit
def _store_level(cur, y_ptr, map_ptr, level_start, b, hx, group, heads, n, m, s, u0, sy_s, cols, col_ok,
                 NB: tl.constexpr, SPAN: tl.constexpr, SHIFT: tl.constexpr, MEAN: tl.constexpr):
    """Write the NB pooled rows of one level to the positions of the selected entries."""
    j = u0 // SPAN + tl.arange(0, NB) - SHIFT  # entry index inside the level
    ok = (j >= 0) & (j < n // SPAN)
    if MEAN:
        cur = cur * (1.0 / SPAN)  # SPAN is a power of two: exact, and no division per element
    vals = cur.to(y_ptr.dtype.element_ty)
    for g in range(group):
        bh = (b * heads + hx * group + g).to(tl.int64)
        position = tl.load(map_ptr + bh * m + level_start + j, mask=ok, other=-1).to(tl.int64)
        row = (bh * s + position) * sy_s
        tl.store(y_ptr + row[:, None] + cols[None, :], vals, mask=(position >= 0)[:, None] & col_ok[None, :])


@triton.jit
def _store_levels_dot(x, y_ptr, map_ptr, b, hx, group, heads, n, m, s, u0, sy_s, cols, col_ok,
                      P: tl.constexpr, LB: tl.constexpr, TB: tl.constexpr, R: tl.constexpr,
                      SHIFT: tl.constexpr, MEAN: tl.constexpr, BLOCK_D: tl.constexpr):
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
        pooled = pooled * (1.0 / span[:, None].to(tl.float32))  # one reciprocal per row, exact for 2**k
    j = u0 // span + index - SHIFT
    ok = valid & (j >= 0) & (j < n // span)
    vals = pooled.to(y_ptr.dtype.element_ty)
    for g in range(group):
        bh = (b * heads + hx * group + g).to(tl.int64)
        position = tl.load(map_ptr + bh * m + level_start + j, mask=ok, other=-1).to(tl.int64)
        row = (bh * s + position) * sy_s
        tl.store(y_ptr + row[:, None] + cols[None, :], vals, mask=(position >= 0)[:, None] & col_ok[None, :])


@triton.jit
def _pool_tensor(x_ptr, y_ptr, map_ptr, base, rows, row_ok, b, hx, group, heads, n, m, s, u0, sx_n, sy_s,
                 cols, col_ok, P: tl.constexpr, LB: tl.constexpr, TB: tl.constexpr, SHIFT: tl.constexpr,
                 MEAN: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr, R: tl.constexpr):
    """Pool one head's TB rows into LB levels and store them (levels unrolled by hand: shapes
    must be compile-time constants, and Triton constexprs cannot be reassigned in a loop)."""
    ptr = x_ptr + base + rows[:, None] * sx_n + cols[None, :]
    raw = tl.load(ptr, mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [TB, BLOCK_D]
    c1 = raw.to(tl.float32)
    _store_level(c1, y_ptr, map_ptr, 0, b, hx, group, heads, n, m, s, u0, sy_s, cols, col_ok, TB, 1, SHIFT, MEAN)
    if USE_DOT:
        if LB > 1:
            _store_levels_dot(raw, y_ptr, map_ptr, b, hx, group, heads, n, m, s, u0, sy_s, cols, col_ok,
                              P, LB, TB, R, SHIFT, MEAN, BLOCK_D)
        return
    start = n * 0
    if LB > 1:
        start += n
        c2 = _reduce_rows(c1, TB, P, BLOCK_D)
        _store_level(c2, y_ptr, map_ptr, start, b, hx, group, heads, n, m, s, u0, sy_s, cols, col_ok,
                     TB // P, P, SHIFT, MEAN)
    if LB > 2:
        start += n // P
        c3 = _reduce_rows(c2, TB // P, P, BLOCK_D)
        _store_level(c3, y_ptr, map_ptr, start, b, hx, group, heads, n, m, s, u0, sy_s, cols, col_ok,
                     TB // (P * P), P * P, SHIFT, MEAN)
    if LB > 3:
        start += n // (P * P)
        c4 = _reduce_rows(c3, TB // (P * P), P, BLOCK_D)
        _store_level(c4, y_ptr, map_ptr, start, b, hx, group, heads, n, m, s, u0, sy_s, cols, col_ok,
                     TB // (P * P * P), P * P * P, SHIFT, MEAN)
    if LB > 4:
        start += n // (P * P * P)
        c5 = _reduce_rows(c4, TB // (P * P * P), P, BLOCK_D)
        _store_level(c5, y_ptr, map_ptr, start, b, hx, group, heads, n, m, s, u0, sy_s, cols, col_ok,
                     TB // (P * P * P * P), P * P * P * P, SHIFT, MEAN)
    if LB > 5:
        start += n // (P * P * P * P)
        c6 = _reduce_rows(c5, TB // (P * P * P * P), P, BLOCK_D)
        _store_level(c6, y_ptr, map_ptr, start, b, hx, group, heads, n, m, s, u0, sy_s, cols, col_ok,
                     TB // (P * P * P * P * P), P * P * P * P * P, SHIFT, MEAN)
    if LB > 6:
        start += n // (P * P * P * P * P)
        c7 = _reduce_rows(c6, TB // (P * P * P * P * P), P, BLOCK_D)
        _store_level(c7, y_ptr, map_ptr, start, b, hx, group, heads, n, m, s, u0, sy_s, cols, col_ok,
                     TB // (P * P * P * P * P * P), P * P * P * P * P * P, SHIFT, MEAN)


@triton.jit
def _pool_blocks_kernel(
    x1_ptr, x2_ptr, y1_ptr, y2_ptr, map_ptr, n, x_heads, group, m, s, blocks,
    sx_b, sx_n, sx_h, sy_s,
    P: tl.constexpr, LB: tl.constexpr, TB: tl.constexpr, SHIFT: tl.constexpr, MEAN: tl.constexpr,
    NT: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, USE_DOT: tl.constexpr, R: tl.constexpr,
):
    """x1 (and x2 when NT == 2, same strides) [B, N, Hx, D] -> y [B, Hx * group, S, D] rows."""
    pid = tl.program_id(0)
    bhx = pid // blocks
    u0 = (pid % blocks).to(tl.int64) * TB
    b = bhx // x_heads
    hx = bhx % x_heads
    heads = x_heads * group
    rows = u0 - SHIFT + tl.arange(0, TB)
    row_ok = (rows >= 0) & (rows < n)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    base = b.to(tl.int64) * sx_b + hx.to(tl.int64) * sx_h
    _pool_tensor(x1_ptr, y1_ptr, map_ptr, base, rows, row_ok, b, hx, group, heads, n, m, s, u0, sx_n, sy_s,
                 cols, col_ok, P, LB, TB, SHIFT, MEAN, BLOCK_D, USE_DOT, R)
    if NT == 2:
        _pool_tensor(x2_ptr, y2_ptr, map_ptr, base, rows, row_ok, b, hx, group, heads, n, m, s, u0, sx_n, sy_s,
                     cols, col_ok, P, LB, TB, SHIFT, MEAN, BLOCK_D, USE_DOT, R)


def block_levels(pool: int, levels: int) -> tuple[int, int]:
    """(levels pooled by token blocks, rows per block): every span up to MAX_BLOCK_TOKENS."""
    handled = 1
    while handled < levels and pool**handled <= MAX_BLOCK_TOKENS:
        handled += 1
    return handled, max(32, pool ** (handled - 1))


def launch_pool_blocks(xs, ys, slot_map, n, group, pool, levels_here, rows_per_block, shift, mean, check_grid,
                       use_dot=None, num_warps=None):
    """Launch the block kernel on one or two [B, N, Hx, D] tensors (same strides) -> ys."""
    use_dot = USE_TENSOR_CORES if use_dot is None else use_dot
    stacked = sum(rows_per_block // pool**level for level in range(1, levels_here))
    if num_warps is None:
        num_warps = 8 if rows_per_block * xs[0].shape[-1] >= 8192 else 4
    batch, _, x_heads, dim = xs[0].shape
    s, m = ys[0].shape[2], slot_map.shape[-1]
    blocks = triton.cdiv(n + shift, rows_per_block)  # shift 1: one more block for the last deliveries
    x2 = xs[1] if len(xs) == 2 else xs[0]
    y2 = ys[1] if len(ys) == 2 else ys[0]
    grid = check_grid(batch * x_heads * blocks)
    _pool_blocks_kernel[grid](
        xs[0], x2, ys[0], y2, slot_map, n, x_heads, group, m, s, blocks,
        xs[0].stride(0), xs[0].stride(1), xs[0].stride(2), ys[0].stride(2),
        P=pool, LB=levels_here, TB=rows_per_block, SHIFT=shift, MEAN=mean, NT=len(xs),
        D=dim, BLOCK_D=triton.next_power_of_2(dim), USE_DOT=use_dot, R=max(16, triton.next_power_of_2(stacked)),
        num_warps=num_warps,
    )
