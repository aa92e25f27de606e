"""Triton row kernels: pool (gather forward, scatter backward) and expand (gather backward,
scatter forward). Twins: rows_reference.py, same arguments and results.

`pool_rows` pools levels of span <= 256 by token blocks (pool_blocks.py) and any coarser
level with the per-level kernel below (each entry reads its own span; measured slow, ~0.8
TB/s, and only reached with pool**(levels-1) > 256). `expand_rows` reads, per output token,
one slot-map entry per level.

Under context parallelism a chunk's scatter runs past the chunk end into the next chunk
(LIGHTHOUSE.md s.8): scatter forward writes the chunk's N rows and, in a second small launch
(`expand_rows(..., first_row=N)`), the spill rows past N; scatter backward pools the
gradient of the N rows followed by the spill rows' gradient (`pool_rows(..., tail=...)`),
without concatenating them. The plan still describes the chunk's N tokens; rows past N
receive only what the last entries of each level deliver.

Both write every output row exactly once from a fixed-order fp32 sum: no atomics, so the same
input gives the same bits. All memory offsets are int64 (N * H * D passes 2**31 at 2M tokens);
grids are one-dimensional (axis 0 allows 2**31 - 1 programs, axes 1 and 2 only 65535).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.kernels.launch import check_grid
from lh_cp.ops.kernels.pool_blocks import block_levels, launch_pool_blocks
from lh_cp.ops.kernels.rows_reference import check_row_window
from lh_cp.ops.kernels.slot_plan import Plan, level_block_offsets

ROWS_PER_PROGRAM = 32  # rows of D values loaded per step of the per-level pool kernel (fallback)
TOKENS_PER_PROGRAM = 32  # output rows per program of the expand kernel


@triton.jit
def _pool_one(x_ptr, rows, row_ok, x_head_off, stride_n, cols, col_ok, CHUNK: tl.constexpr):
    """Sum over the CHUNK axis of x rows [BLOCK_E, CHUNK] at one head: [BLOCK_E, BLOCK_D] fp32."""
    ptr = x_ptr + x_head_off + rows.to(tl.int64)[:, :, None] * stride_n + cols[None, None, :]
    vals = tl.load(ptr, mask=row_ok[:, :, None] & col_ok[None, None, :], other=0.0)
    return tl.sum(vals.to(tl.float32), axis=1)


@triton.jit
def _pool_rows_of(
    x_ptr,
    tail_ptr,
    rows,
    e_ok,
    n_x,
    n_rows,
    x_off,
    tail_off,
    sx_n,
    st_n,
    cols,
    col_ok,
    HAS_TAIL: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """_pool_one over token rows that are x's below n_x and, with HAS_TAIL, the tail's from n_x on."""
    acc = _pool_one(x_ptr, rows, e_ok[:, None] & (rows < n_x), x_off, sx_n, cols, col_ok, CHUNK)
    if HAS_TAIL:
        in_tail = e_ok[:, None] & (rows >= n_x) & (rows < n_rows)
        acc += _pool_one(tail_ptr, rows - n_x, in_tail, tail_off, st_n, cols, col_ok, CHUNK)
    return acc


@triton.jit
def _pool_rows_kernel(
    x1_ptr,
    x2_ptr,
    x3_ptr,
    tail_ptr,
    y1_ptr,
    y2_ptr,
    y3_ptr,
    index_ptr,
    position_ptr,
    n,
    n_x,
    n_rows,
    heads,
    group,
    count,
    block_offset,
    s,
    sx1_b,
    sx1_n,
    sx1_h,
    sx2_b,
    sx2_n,
    sx2_h,
    st_b,
    st_n,
    st_h,
    sy_b,
    sy_h,
    sy_s,
    SPAN: tl.constexpr,
    SHIFT: tl.constexpr,
    MEAN: tl.constexpr,
    NT: tl.constexpr,
    HAS_TAIL: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """y[b, h, position[e]] = sum_{r < SPAN} x[b, index[e]*SPAN + SHIFT*(SPAN-1) + r, head] (/SPAN),
    token rows past n_rows read as 0; rows from n_x on are the tail's (HAS_TAIL, NT == 1 only).

    One program: BLOCK_E entries of one level (one span) of one (b, h). x1 is read at head h,
    x2 and x3 (NT == 3: k and v) at head h // group.
    """
    pid = tl.program_id(0)
    blocks = tl.cdiv(count, BLOCK_E)
    bh = pid // blocks
    e = (pid % blocks) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < count
    b = bh // heads
    h = bh % heads
    list_off = bh.to(tl.int64) * s + block_offset
    index = tl.load(index_ptr + list_off + e, mask=e_ok, other=0).to(tl.int64)
    position = tl.load(position_ptr + list_off + e, mask=e_ok, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    first = index * SPAN + SHIFT * (SPAN - 1)  # [BLOCK_E]
    acc1 = tl.zeros([BLOCK_E, BLOCK_D], tl.float32)
    acc2 = tl.zeros([BLOCK_E, BLOCK_D], tl.float32)
    acc3 = tl.zeros([BLOCK_E, BLOCK_D], tl.float32)
    off1 = b.to(tl.int64) * sx1_b + h.to(tl.int64) * sx1_h
    off2 = b.to(tl.int64) * sx2_b + (h // group).to(tl.int64) * sx2_h
    tail_off = b.to(tl.int64) * st_b + h.to(tl.int64) * st_h  # the tail continues x1
    for r0 in range(0, SPAN, CHUNK):
        rows = first[:, None] + r0 + tl.arange(0, CHUNK)[None, :]  # [BLOCK_E, CHUNK] int64
        row_ok = e_ok[:, None] & (rows < n_x)
        acc1 += _pool_rows_of(
            x1_ptr,
            tail_ptr,
            rows,
            e_ok,
            n_x,
            n_rows,
            off1,
            tail_off,
            sx1_n,
            st_n,
            cols,
            col_ok,
            HAS_TAIL,
            CHUNK,
        )
        if NT == 3:
            acc2 += _pool_one(x2_ptr, rows, row_ok, off2, sx2_n, cols, col_ok, CHUNK)
            acc3 += _pool_one(x3_ptr, rows, row_ok, off2, sx2_n, cols, col_ok, CHUNK)
    if MEAN:
        acc1 = acc1 / SPAN
        acc2 = acc2 / SPAN
        acc3 = acc3 / SPAN
    out_off = (
        b.to(tl.int64) * sy_b + h.to(tl.int64) * sy_h + position[:, None] * sy_s + cols[None, :]
    )
    out_ok = e_ok[:, None] & col_ok[None, :]
    tl.store(y1_ptr + out_off, acc1.to(y1_ptr.dtype.element_ty), mask=out_ok)
    if NT == 3:
        tl.store(y2_ptr + out_off, acc2.to(y2_ptr.dtype.element_ty), mask=out_ok)
        tl.store(y3_ptr + out_off, acc3.to(y3_ptr.dtype.element_ty), mask=out_ok)


def empty_entries(
    batch: int,
    heads: int,
    s: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device,
    heads_outer: bool = False,
) -> torch.Tensor:
    """An uninitialised [B, H, S, D] entry tensor: contiguous, or heads-outer (memory laid out
    [H, B, S, D]). Heads-outer is how a CP shard's 2B chunk rows (row 2b + slot) are stored:
    the exchange's [B, H, 2S, D] layout, the two chunks of a head side by side, is then a
    view (a reshape without copy), and at B = 1 a contiguous one."""
    if not heads_outer:
        return torch.empty((batch, heads, s, dim), dtype=dtype, device=device)
    return torch.empty((heads, batch, s, dim), dtype=dtype, device=device).transpose(0, 1)


def pool_rows(
    xs: list[torch.Tensor],
    plan: Plan,
    cfg: LighthouseConfig,
    shift: int,
    mean: bool,
    group: int = 1,
    tail: torch.Tensor | None = None,
    outs: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Triton twin of pool_rows_reference for one tensor, or three (q at head h; k, v at h // group).

    xs: [B, R, Hx, D] tensors, R >= plan.n rows; `tail` [B, R', Hx, D] (one tensor only): rows
    R .. R + R' - 1 of the token tensor (the spill rows' gradient of a CP chunk's scatter).
    Returns [B, H, S, D] each: contiguous, or written into `outs` (one per x, equal strides with
    a unit last one, e.g. empty_entries(..., heads_outer=True)). Levels of span <= 256 are
    pooled by token blocks (pool_blocks.py: each row read once); coarser levels, if any, by the
    per-level kernel above (each entry reads its span).
    """
    if len(xs) not in (1, 3):
        raise ValueError(f"pool_rows takes 1 or 3 tensors, got {len(xs)}")
    if tail is not None and len(xs) != 1:
        raise ValueError(f"pool_rows takes a tail only with one tensor, got {len(xs)}")
    xs = [x if x.stride(-1) == 1 else x.contiguous() for x in xs]
    if len(xs) == 3 and xs[1].stride() != xs[2].stride():
        xs = [xs[0], xs[1].contiguous(), xs[2].contiguous()]
    batch, n_x, _, dim = xs[0].shape
    n = plan.n
    if n_x < n:
        raise ValueError(f"pool_rows needs at least the plan's {n} rows, got {n_x}")
    if tail is not None:
        if tail.shape[0] != batch or tail.shape[2:] != xs[0].shape[2:]:
            raise ValueError(
                f"pool_rows: tail {tuple(tail.shape)} must match x {tuple(xs[0].shape)} but in rows"
            )
        tail = tail if tail.stride(-1) == 1 else tail.contiguous()
    n_rows = n_x + (0 if tail is None else tail.shape[1])
    heads, s = plan.level_index.shape[1], plan.level_index.shape[2]
    if outs is None:
        ys = [torch.empty((batch, heads, s, dim), dtype=x.dtype, device=x.device) for x in xs]
    else:
        ys = list(outs)
        shapes_ok = len(ys) == len(xs) and all(y.shape == (batch, heads, s, dim) for y in ys)
        if not shapes_ok or any(y.stride() != ys[0].stride() or y.stride(-1) != 1 for y in ys):
            raise ValueError(
                f"pool_rows writes {len(xs)} x [{batch}, {heads}, {s}, {dim}] with equal strides and a "
                f"unit last one, got {[(tuple(y.shape), y.stride()) for y in ys]}"
            )
    levels_here, rows_per_block = block_levels(cfg.pool, cfg.levels)
    for i, (x, y) in enumerate(zip(xs, ys)):
        x_group = (
            1 if (i == 0 and len(xs) == 3) else group
        )  # q: its own head; k, v: shared by group
        launch_pool_blocks(
            x,
            tail,
            y,
            plan.slot_map,
            n,
            x_group,
            cfg.pool,
            levels_here,
            rows_per_block,
            shift,
            mean,
            check_grid,
        )
    x2 = xs[1] if len(xs) == 3 else xs[0]
    x3 = xs[2] if len(xs) == 3 else xs[0]
    y2 = ys[1] if len(ys) == 3 else ys[0]
    y3 = ys[2] if len(ys) == 3 else ys[0]
    t = xs[0] if tail is None else tail
    blocks = level_block_offsets(n, cfg)
    block_d = triton.next_power_of_2(dim)
    for level in range(levels_here + 1, cfg.levels + 1):
        span = cfg.span(level)
        chunk = min(span, ROWS_PER_PROGRAM)
        block_e = max(1, ROWS_PER_PROGRAM // chunk)
        count = blocks[level] - blocks[level - 1]
        grid = check_grid(batch * heads * triton.cdiv(count, block_e))
        _pool_rows_kernel[grid](
            xs[0],
            x2,
            x3,
            t,
            ys[0],
            y2,
            y3,
            plan.level_index,
            plan.level_position,
            n,
            n_x,
            n_rows,
            heads,
            group,
            count,
            blocks[level - 1],
            s,
            xs[0].stride(0),
            xs[0].stride(1),
            xs[0].stride(2),
            x2.stride(0),
            x2.stride(1),
            x2.stride(2),
            t.stride(0),
            t.stride(1),
            t.stride(2),
            ys[0].stride(0),
            ys[0].stride(1),
            ys[0].stride(2),
            SPAN=span,
            SHIFT=shift,
            MEAN=mean,
            NT=len(xs),
            HAS_TAIL=tail is not None,
            D=dim,
            BLOCK_D=block_d,
            BLOCK_E=block_e,
            CHUNK=chunk,
            num_warps=8 if len(xs) == 3 else 4,
        )
    return ys


@triton.jit
def _expand_one(
    src_ptr,
    map_ptr,
    bh_src,
    src_off,
    t,
    t_ok,
    n,
    m,
    ss_s,
    cols,
    col_ok,
    acc,
    P: tl.constexpr,
    L: tl.constexpr,
    SHIFT: tl.constexpr,
    MEAN: tl.constexpr,
):
    """acc += sum over levels of src[bh_src, slot_map[bh_src, level slot of t]] (* 1/span).

    Tokens t >= n (spill rows) only find the slots that exist: slot < n // span."""
    map_base = map_ptr + bh_src.to(tl.int64) * m
    src_base = src_ptr + src_off
    level_start = t * 0  # int64 zeros: slots of the levels below
    span = 1
    for _level in tl.static_range(L):
        slot = (t + SHIFT) // span - SHIFT
        ok = t_ok & (slot >= 0) & (slot < n // span)
        position = tl.load(map_base + level_start + slot, mask=ok, other=-1)
        has = position >= 0
        vals = tl.load(
            src_base + position.to(tl.int64)[:, None] * ss_s + cols[None, :],
            mask=has[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        if MEAN:
            vals = vals / span
        acc += vals
        level_start += n // span
        span *= P
    return acc


@triton.jit
def _expand_rows_kernel(
    s1_ptr,
    s2_ptr,
    o1_ptr,
    o2_ptr,
    map_ptr,
    n,
    t0,
    n_out,
    out_heads,
    group,
    m,
    ss_b,
    ss_h,
    ss_s,
    so_b,
    so_n,
    so_h,
    P: tl.constexpr,
    L: tl.constexpr,
    SHIFT: tl.constexpr,
    MEAN: tl.constexpr,
    NT: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """out[b, t, hx] = sum_{g < group} sum_levels src[b, hx*group + g, slot_map[...]] (* 1/span).

    src tensors are [B, H, S, D] (H = out_heads * group) with strides ss_b, ss_h, ss_s and a
    unit last stride (contiguous, or a CP shard's heads-outer entries); output row i holds token
    t0 + i, i < n_out (t0 = 0, n_out = n: the sequence; t0 = n: the spill rows past it); one
    program writes BLOCK_T rows of one (b, hx) of each output once.
    """
    pid = tl.program_id(0)
    blocks = tl.cdiv(n_out, BLOCK_T)
    bhx = pid // blocks
    i = ((pid % blocks) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t = i + t0
    t_ok = i < n_out
    b = bhx // out_heads
    hx = bhx % out_heads
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc1 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    acc2 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for g in range(group):
        h_src = hx * group + g
        bh_src = b * out_heads * group + h_src
        src_off = b.to(tl.int64) * ss_b + h_src.to(tl.int64) * ss_h
        acc1 = _expand_one(
            s1_ptr,
            map_ptr,
            bh_src,
            src_off,
            t,
            t_ok,
            n,
            m,
            ss_s,
            cols,
            col_ok,
            acc1,
            P,
            L,
            SHIFT,
            MEAN,
        )
        if NT == 2:
            acc2 = _expand_one(
                s2_ptr,
                map_ptr,
                bh_src,
                src_off,
                t,
                t_ok,
                n,
                m,
                ss_s,
                cols,
                col_ok,
                acc2,
                P,
                L,
                SHIFT,
                MEAN,
            )
    out_off = b.to(tl.int64) * so_b + hx.to(tl.int64) * so_h + i[:, None] * so_n + cols[None, :]
    out_ok = t_ok[:, None] & col_ok[None, :]
    tl.store(o1_ptr + out_off, acc1.to(o1_ptr.dtype.element_ty), mask=out_ok)
    if NT == 2:
        tl.store(o2_ptr + out_off, acc2.to(o2_ptr.dtype.element_ty), mask=out_ok)


def expand_rows(
    srcs: list[torch.Tensor],
    plan: Plan,
    cfg: LighthouseConfig,
    shift: int,
    mean: bool,
    group: int = 1,
    rows: int | None = None,
    first_row: int = 0,
) -> list[torch.Tensor]:
    """Triton twin of expand_rows_reference for one or two [B, H, S, D] tensors (same plan;
    any strides with a unit last one, the two tensors' equal).

    Returns [B, R, H // group, D] contiguous tensors holding token rows first_row ..
    first_row + R - 1, R = rows: first_row = 0 and R >= plan.n (default) for the sequence,
    first_row = plan.n for the spill rows of a CP chunk's scatter.
    """
    if len(srcs) not in (1, 2):
        raise ValueError(f"expand_rows takes 1 or 2 tensors, got {len(srcs)}")
    srcs = [x if x.stride(-1) == 1 else x.contiguous() for x in srcs]
    if len(srcs) == 2 and srcs[0].stride() != srcs[1].stride():
        srcs = [x.contiguous() for x in srcs]
    batch, heads, s, dim = srcs[0].shape
    n, out_heads = plan.n, heads // group
    rows = n if rows is None else rows
    check_row_window(n, rows, first_row)
    m = plan.slot_map.shape[-1]
    outs = [
        torch.empty((batch, rows, out_heads, dim), dtype=x.dtype, device=x.device) for x in srcs
    ]
    s2 = srcs[1] if len(srcs) == 2 else srcs[0]
    o2 = outs[1] if len(outs) == 2 else outs[0]
    block_t = TOKENS_PER_PROGRAM // len(srcs)  # two accumulators: half the rows, no spills
    grid = check_grid(batch * out_heads * triton.cdiv(rows, block_t))
    _expand_rows_kernel[grid](
        srcs[0],
        s2,
        outs[0],
        o2,
        plan.slot_map,
        n,
        first_row,
        rows,
        out_heads,
        group,
        m,
        srcs[0].stride(0),
        srcs[0].stride(1),
        srcs[0].stride(2),
        outs[0].stride(0),
        outs[0].stride(1),
        outs[0].stride(2),
        P=cfg.pool,
        L=cfg.levels,
        SHIFT=shift,
        MEAN=mean,
        NT=len(srcs),
        D=dim,
        BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_T=block_t,
        num_warps=8,
    )
    return outs
