"""Triton selection: one program per (batch, head, tile) writes its entries in causal order.

Twin: lh_cp.ops.select.select_from_scores (the same scores give the identical selection).
The strictly causal selection (CAUSAL, LIGHTHOUSE.md s.11) replaces the radix select below
with cumulative sums over the candidates in index order against thresholds that the
reference's code computes (each tile's from the tile before); phase 2 is shared.

Per tile, coarse to fine (LIGHTHOUSE.md s.4): the b/2 candidates of largest query score, then
the b/2 of largest key score among the rest, are refined; their children are the next level's
candidates. "Largest b/2, ties to the lower index" is a radix select on a 55-bit key
(score bits << 24 | (2**24 - 1 - candidate number)): 55 rounds of "how many keys are >= this
prefix", each a vector compare and a sum, so no sort and no data-dependent control flow.
The refined entries of each level are written to a small scratch list in index order.

Causal position without a sort (s.5): an entry X of level l ending at token e is preceded by
every emitted entry ending before e and by the finer emitted entries ending at e, so

    rank(X) = sum_{m < l} F_m(e) + sum_{m >= l} F_m(e - 1),

where F_m(x) counts emitted level-m entries of the tile that end at or before x. At the top
level F_L(x) = (x - tile start) // c_L; below it the level-m entries are the children of the
refined level-(m+1) entries, so F_m(x) = P * (refined parents ending <= x) + the children of
the next parent that end <= x, found by a binary search in the sorted scratch list.
The entry's row in the gathered tensors is tile * E + rank, E the entries per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.entries import check_finite
from lh_cp.ops.kernels.launch import check_grid
from lh_cp.ops.kernels.selection_reference import causal_thresholds, thresholds_in_use
from lh_cp.ops.kernels.slot_plan import Plan
from lh_cp.ops.pyramid import level_offsets, reduce_levels

INDEX_BITS = 24  # candidate numbers per tile and level must stay below 2**24
MAX_TOP_IN_REGISTERS = 2048
TOP_CHUNK = 1024  # top-level candidates per step when they do not fit in registers


@triton.jit
def _packed(score, j, ok):
    """Order key: larger score first, then lower candidate number; -1 for non-candidates."""
    bits = score.to(tl.int32, bitcast=True).to(tl.int64)  # norms are >= 0: bits sort as floats
    return tl.where(ok, (bits << 24) | (16777215 - j.to(tl.int64)), -1)


@triton.jit
def _kth_largest(packed, k):
    """The k-th largest of the (distinct) keys held in registers."""
    thr = tl.full((), 0, tl.int64)
    for i in range(55):
        trial = thr | (tl.full((), 1, tl.int64) << (54 - i))
        count = tl.sum((packed >= trial).to(tl.int32), axis=0)
        thr = tl.where(count >= k, trial, thr)
    return thr


@triton.jit
def _kth_largest_chunked(
    q_base, k_base, c_top, thr_q, k, USE_KEY: tl.constexpr, BLOCK: tl.constexpr
):
    """As _kth_largest over the top-level candidates of a tile, reading them chunk by chunk.

    USE_KEY: rank the key scores of the candidates whose query key is below thr_q.
    """
    thr = tl.full((), 0, tl.int64)
    for i in range(55):
        trial = thr | (tl.full((), 1, tl.int64) << (54 - i))
        count = tl.full((), 0, tl.int32)
        for j0 in range(0, c_top, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            ok = j < c_top
            pq = _packed(tl.load(q_base + j, mask=ok, other=0.0), j, ok)
            if USE_KEY:
                pk = _packed(tl.load(k_base + j, mask=ok, other=0.0), j, ok & (pq < thr_q))
                count += tl.sum((pk >= trial).to(tl.int32), axis=0)
            else:
                count += tl.sum((pq >= trial).to(tl.int32), axis=0)
        thr = tl.where(count >= k, trial, thr)
    return thr


@triton.jit
def _causal_refine(
    q_score,
    k_score,
    refinable,
    thr_q,
    thr_k,
    seen_q,
    seen_k,
    seen_taken,
    seen_refinable,
    refinable_total,
    forced_before,
    BUD: tl.constexpr,
):
    """One block of candidates (index order) of the causal selection (LIGHTHOUSE.md s.11; twin:
    selection_reference.refine_causal). All flags are int32 0/1; the seen_* counters carry the block's
    predecessors in the same tile and level. Returns (refined, and the counters after it)."""
    half = BUD // 2
    q_pass = refinable * (q_score >= thr_q).to(tl.int32)
    cum_q = seen_q + tl.cumsum(q_pass, axis=0)
    q_take = q_pass * (cum_q <= half).to(tl.int32)
    k_pass = refinable * (1 - q_take) * (k_score >= thr_k).to(tl.int32)
    cum_k = seen_k + tl.cumsum(k_pass, axis=0)
    taken = q_take | (k_pass * (cum_k <= half).to(tl.int32))
    cum_taken = seen_taken + tl.cumsum(taken, axis=0)
    cum_refinable = seen_refinable + tl.cumsum(refinable, axis=0)
    from_here = refinable_total - cum_refinable + refinable
    must = refinable * (BUD - (cum_taken - taken) >= from_here).to(tl.int32)
    forced = ((forced_before + tl.cumsum(must, axis=0)) > 0).to(tl.int32) * refinable
    refined = taken | forced
    return (
        refined,
        seen_q + tl.sum(q_pass, axis=0),
        seen_k + tl.sum(k_pass, axis=0),
        seen_taken + tl.sum(taken, axis=0),
        seen_refinable + tl.sum(refinable, axis=0),
        forced_before + tl.sum(must, axis=0),
    )


@triton.jit
def _count_le(r_ptr, value, BUD: tl.constexpr, LOG_BUD: tl.constexpr):
    """Entries of the ascending list r_ptr[0:BUD] that are <= value (vector of int64 values)."""
    pos = tl.zeros_like(value)
    for i in range(LOG_BUD + 1):
        cand = pos + (tl.full((), 1, tl.int64) << (LOG_BUD - i))
        ok = cand <= BUD
        r = tl.load(r_ptr + cand - 1, mask=ok, other=0).to(tl.int64)
        pos = tl.where(ok & (r <= value), cand, pos)
    return pos


@triton.jit
def _children(refined_list, j, ok, P: tl.constexpr):
    """Candidates of the level below, as int64 indices: child j % P of entry j // P of a
    level's refined list (index order, so the children are in index order too)."""
    parent = tl.load(refined_list + j // P, mask=ok, other=0).to(tl.int64)
    return parent * P + j % P


@triton.jit
def _pow(base: tl.constexpr, exp: tl.constexpr):
    """base ** exp for a compile-time exp (a plain loop: also runs under TRITON_INTERPRET)."""
    result = 1
    for _ in tl.static_range(exp):
        result = result * base
    return result


@triton.jit
def _level_offset(n, LEVEL: tl.constexpr, P: tl.constexpr):
    """Start of level LEVEL in a flat level-major pyramid of n tokens."""
    off = n * 0
    span = 1
    for _ in tl.static_range(LEVEL - 1):
        off += n // span
        span = span * P
    return off


@triton.jit
def _rank(
    start,
    end,
    tb,
    scratch,
    LEVEL: tl.constexpr,
    P: tl.constexpr,
    L: tl.constexpr,
    BUD: tl.constexpr,
    LOG_BUD: tl.constexpr,
):
    """Causal rank inside the tile of level-LEVEL entries [start, end) (see module docstring)."""
    rank = (end - 1 - tb) // _pow(P, L - 1)  # m = L >= LEVEL: x = end - 1
    for m in tl.static_range(1, L):
        if m < LEVEL:
            x = end
        else:
            x = end - 1
        parents = scratch + (m - 1) * BUD  # R_{m+1}, spans P**m
        cnt = _count_le(parents, x // _pow(P, m) - 1, BUD, LOG_BUD)
        nxt = tl.load(parents + cnt, mask=cnt < BUD, other=0).to(tl.int64) * _pow(P, m)
        partial = tl.minimum(tl.maximum(x - nxt, 0) // (_pow(P, m - 1)), P)
        rank += P * cnt + tl.where(cnt < BUD, partial, 0)
    return rank


@triton.jit
def _emit(
    idx,
    ok,
    j_in_block,
    tb,
    tile,
    e_per_tile,
    scratch,
    bh,
    n,
    m_total,
    s,
    block_off,
    slot_map_ptr,
    index_ptr,
    position_ptr,
    start_ptr,
    level_ptr,
    internal_ptr,
    LEVEL: tl.constexpr,
    P: tl.constexpr,
    L: tl.constexpr,
    BUD: tl.constexpr,
    LOG_BUD: tl.constexpr,
):
    """Write the plan and the sorted fields of level-LEVEL candidates idx (int64, global index)."""
    span = _pow(P, LEVEL - 1)
    start = idx * span
    end = start + span
    if LEVEL > 1:
        own = scratch + (LEVEL - 2) * BUD  # R_LEVEL: the refined entries of this level
        cnt = _count_le(own, idx - 1, BUD, LOG_BUD)
        hit = tl.load(own + cnt, mask=ok & (cnt < BUD), other=-1).to(tl.int64)
        internal = (cnt < BUD) & (hit == idx)
    else:
        internal = idx < 0
    rank = _rank(start, end, tb, scratch, LEVEL, P, L, BUD, LOG_BUD)
    position = tile.to(tl.int64) * e_per_tile + rank
    row = bh.to(tl.int64) * s
    tl.store(
        slot_map_ptr + bh.to(tl.int64) * m_total + _level_offset(n, LEVEL, P) + idx,
        position.to(tl.int32),
        mask=ok,
    )
    tl.store(index_ptr + row + block_off + j_in_block, idx.to(tl.int32), mask=ok)
    tl.store(position_ptr + row + block_off + j_in_block, position.to(tl.int32), mask=ok)
    tl.store(start_ptr + row + position, start.to(tl.int32), mask=ok)
    tl.store(level_ptr + row + position, tl.full(idx.shape, LEVEL, tl.int8), mask=ok)
    tl.store(internal_ptr + row + position, internal.to(tl.int8), mask=ok)


@triton.jit
def _select_kernel(
    qs_ptr,
    ks_ptr,
    scratch_ptr,
    slot_map_ptr,
    index_ptr,
    position_ptr,
    start_ptr,
    level_ptr,
    internal_ptr,
    thresholds_ptr,
    n,
    tiles,
    heads,
    group,
    m_total,
    s,
    c_top,
    P: tl.constexpr,
    L: tl.constexpr,
    BUD: tl.constexpr,
    LOG_BUD: tl.constexpr,
    BLOCK_TOP: tl.constexpr,
    TOP_IN_REGISTERS: tl.constexpr,
    BLOCK_LOW: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid % tiles
    bh = pid // tiles
    b = bh // heads
    h = bh % heads
    kv_bh = b * (heads // group) + h // group
    q_pyr = qs_ptr + bh.to(tl.int64) * m_total
    k_pyr = ks_ptr + kv_bh.to(tl.int64) * m_total
    scratch = scratch_ptr + pid.to(tl.int64) * (BUD * L)  # R_l at (l - 2) * BUD, l = 2..L
    tb = tile.to(tl.int64) * (n // tiles)
    low_count = P * BUD
    e_per_tile = c_top + (L - 1) * low_count
    half = BUD // 2
    top_first = tile.to(tl.int64) * c_top  # global index of the tile's first top-level entry
    top_off = _level_offset(n, L, P)

    # Phase 1: refine, coarse to fine; the refined entries of level l go to R_l in index order.
    thr_base = thresholds_ptr + pid.to(tl.int64) * ((L - 1) * 2)  # [L-1, 2]: level l at l - 2
    if L > 1 and CAUSAL:
        # Top level: every candidate is refinable, scored by its first child (level L-1 at j * P).
        first_off = _level_offset(n, L - 1, P) + top_first * P
        thr_q = tl.load(thr_base + (L - 2) * 2)
        thr_k = tl.load(thr_base + (L - 2) * 2 + 1)
        zero = tl.full((), 0, tl.int32)
        seen_q, seen_k, seen_taken, seen_refinable, forced, written = (
            zero,
            zero,
            zero,
            zero,
            zero,
            zero,
        )
        for j0 in range(0, c_top, BLOCK_TOP):  # one step when the top level fits in registers
            j = j0 + tl.arange(0, BLOCK_TOP)
            ok = j < c_top
            qs = tl.load(q_pyr + first_off + j * P, mask=ok, other=0.0)
            ks = tl.load(k_pyr + first_off + j * P, mask=ok, other=0.0)
            refined, seen_q, seen_k, seen_taken, seen_refinable, forced = _causal_refine(
                qs,
                ks,
                ok.to(tl.int32),
                thr_q,
                thr_k,
                seen_q,
                seen_k,
                seen_taken,
                seen_refinable,
                c_top,
                forced,
                BUD,
            )
            slot = written + tl.cumsum(refined, axis=0) - 1
            tl.store(scratch + (L - 2) * BUD + slot, (top_first + j).to(tl.int32), mask=refined > 0)
            written += tl.sum(refined, axis=0)
        tl.debug_barrier()
        for i in tl.static_range(L - 2):
            # refines level L - 1 - i (levels L-1 .. 2); a first child (j % P == 0) never is
            j = tl.arange(0, BLOCK_LOW)
            ok = j < low_count
            idx = _children(scratch + (L - 2 - i) * BUD, j, ok, P)
            first_off = _level_offset(n, L - 2 - i, P)
            qs = tl.load(q_pyr + first_off + idx * P, mask=ok, other=0.0)
            ks = tl.load(k_pyr + first_off + idx * P, mask=ok, other=0.0)
            refinable = (ok & (j % P != 0)).to(tl.int32)
            thr_q = tl.load(thr_base + (L - 3 - i) * 2)
            thr_k = tl.load(thr_base + (L - 3 - i) * 2 + 1)
            zero = tl.full((), 0, tl.int32)
            refined, _, _, _, _, _ = _causal_refine(
                qs, ks, refinable, thr_q, thr_k, zero, zero, zero, zero, (P - 1) * BUD, zero, BUD
            )
            slot = tl.cumsum(refined, axis=0) - 1
            tl.store(scratch + (L - 3 - i) * BUD + slot, idx.to(tl.int32), mask=refined > 0)
            tl.debug_barrier()
    elif L > 1:
        if TOP_IN_REGISTERS:
            j = tl.arange(0, BLOCK_TOP)
            ok = j < c_top
            pq = _packed(tl.load(q_pyr + top_off + top_first + j, mask=ok, other=0.0), j, ok)
            thr_q = _kth_largest(pq, half)
            pk = _packed(
                tl.load(k_pyr + top_off + top_first + j, mask=ok, other=0.0), j, ok & (pq < thr_q)
            )
            thr_k = _kth_largest(pk, half)
            refined = (pq >= thr_q) | (pk >= thr_k)
            slot = tl.cumsum(refined.to(tl.int32), axis=0) - 1
            tl.store(scratch + (L - 2) * BUD + slot, (top_first + j).to(tl.int32), mask=refined)
        else:
            q_base = q_pyr + top_off + top_first
            k_base = k_pyr + top_off + top_first
            thr_q = _kth_largest_chunked(q_base, k_base, c_top, 0, half, False, BLOCK_TOP)
            thr_k = _kth_largest_chunked(q_base, k_base, c_top, thr_q, half, True, BLOCK_TOP)
            written = tl.full((), 0, tl.int32)
            for j0 in range(0, c_top, BLOCK_TOP):
                j = j0 + tl.arange(0, BLOCK_TOP)
                ok = j < c_top
                pq = _packed(tl.load(q_base + j, mask=ok, other=0.0), j, ok)
                pk = _packed(tl.load(k_base + j, mask=ok, other=0.0), j, ok & (pq < thr_q))
                refined = (pq >= thr_q) | (pk >= thr_k)
                slot = written + tl.cumsum(refined.to(tl.int32), axis=0) - 1
                tl.store(scratch + (L - 2) * BUD + slot, (top_first + j).to(tl.int32), mask=refined)
                written += tl.sum(refined.to(tl.int32), axis=0)
        tl.debug_barrier()
        for i in tl.static_range(L - 2):
            # refines level L - 1 - i: levels L-1 .. 2 (passed inline: constexprs cannot be reassigned)
            j = tl.arange(0, BLOCK_LOW)
            ok = j < low_count
            idx = _children(scratch + (L - 2 - i) * BUD, j, ok, P)
            off = _level_offset(n, L - 1 - i, P)
            pq = _packed(tl.load(q_pyr + off + idx, mask=ok, other=0.0), j, ok)
            thr_q = _kth_largest(pq, half)
            pk = _packed(tl.load(k_pyr + off + idx, mask=ok, other=0.0), j, ok & (pq < thr_q))
            thr_k = _kth_largest(pk, half)
            refined = (pq >= thr_q) | (pk >= thr_k)
            slot = tl.cumsum(refined.to(tl.int32), axis=0) - 1
            tl.store(scratch + (L - 3 - i) * BUD + slot, idx.to(tl.int32), mask=refined)
            tl.debug_barrier()

    # Phase 2: every candidate of every level is emitted once, at its causal position.
    top_block = (L - 1) * tiles * low_count
    for j0 in range(0, c_top, BLOCK_TOP):
        jt = j0 + tl.arange(0, BLOCK_TOP)
        _emit(
            top_first + jt,
            jt < c_top,
            tile.to(tl.int64) * c_top + jt,
            tb,
            tile,
            e_per_tile,
            scratch,
            bh,
            n,
            m_total,
            s,
            top_block,
            slot_map_ptr,
            index_ptr,
            position_ptr,
            start_ptr,
            level_ptr,
            internal_ptr,
            L,
            P,
            L,
            BUD,
            LOG_BUD,
        )
    for i in tl.static_range(L - 1):
        # emits level L - 1 - i: levels L-1 .. 1
        j = tl.arange(0, BLOCK_LOW)
        ok = j < low_count
        _emit(
            _children(scratch + (L - 2 - i) * BUD, j, ok, P),
            ok,
            tile.to(tl.int64) * low_count + j,
            tb,
            tile,
            e_per_tile,
            scratch,
            bh,
            n,
            m_total,
            s,
            (L - 2 - i) * tiles * low_count,
            slot_map_ptr,
            index_ptr,
            position_ptr,
            start_ptr,
            level_ptr,
            internal_ptr,
            L - 1 - i,
            P,
            L,
            BUD,
            LOG_BUD,
        )


def select_plan(
    query_scores: torch.Tensor,
    key_scores: torch.Tensor,
    cfg: LighthouseConfig,
    v: torch.Tensor | None = None,
    preceding: torch.Tensor | None = None,
    restart: torch.Tensor | None = None,
):
    """Selection from token scores: q [B, H, N], k [B, Hkv, N] float32 (H % Hkv == 0);
    `preceding` and `restart` as in selection_reference.select_from_scores (causal selection
    only).

    Returns (plan, start int32, level int8, internal int8), the last three [B, H, S] in causal
    order. Non-finite scores (and v, when given) raise, as in the reference (check_finite).
    """
    batch, heads, n = query_scores.shape
    kv_heads = key_scores.shape[1]
    tile = cfg.tile_size(n)
    check_finite(query_scores, key_scores, v)
    pool, levels, budget, tiles = cfg.pool, cfg.levels, cfg.tile_budget, cfg.tiles
    c_top = tile // cfg.coarsest_span
    low_count = pool * budget
    if c_top >= 2**INDEX_BITS or low_count >= 2**INDEX_BITS:
        raise ValueError(
            f"a tile has {max(c_top, low_count)} candidates in one level; the kernel allows < 2**{INDEX_BITS}"
        )
    s = cfg.selected_length(n)
    m_total = level_offsets(n, cfg)[-1]
    device = query_scores.device
    q_levels = reduce_levels(query_scores, cfg.pool, cfg.levels, "max", dim=2)
    k_levels = reduce_levels(key_scores, cfg.pool, cfg.levels, "max", dim=2)
    q_pyr = torch.cat(q_levels, dim=2).contiguous()
    k_pyr = torch.cat(k_levels, dim=2).contiguous()
    causal = cfg.uses_thresholds
    if causal:
        # [B, H, tiles, L-1, 2], computed by the reference's code: the kernel only reads them.
        if kv_heads != heads:
            k_levels = [x.repeat_interleave(heads // kv_heads, dim=1) for x in k_levels]
        thresholds = thresholds_in_use(
            causal_thresholds(q_levels, k_levels, cfg, tile), preceding, restart
        ).contiguous()
    else:
        thresholds = q_pyr  # not read
    scratch = torch.empty(batch * heads * tiles * budget * levels, dtype=torch.int32, device=device)
    slot_map = torch.full((batch, heads, m_total), -1, dtype=torch.int32, device=device)
    index = torch.empty((batch, heads, s), dtype=torch.int32, device=device)
    position = torch.empty_like(index)
    start = torch.empty_like(index)
    level = torch.empty((batch, heads, s), dtype=torch.int8, device=device)
    internal = torch.empty_like(level)
    top_in_registers = c_top <= MAX_TOP_IN_REGISTERS
    block_top = triton.next_power_of_2(c_top) if top_in_registers else TOP_CHUNK
    grid = check_grid(batch * heads * tiles)
    _select_kernel[grid](
        q_pyr,
        k_pyr,
        scratch,
        slot_map,
        index,
        position,
        start,
        level,
        internal,
        thresholds,
        n,
        tiles,
        heads,
        heads // kv_heads,
        m_total,
        s,
        c_top,
        P=pool,
        L=levels,
        BUD=budget,
        LOG_BUD=budget.bit_length() - 1,
        BLOCK_TOP=block_top,
        TOP_IN_REGISTERS=top_in_registers,
        BLOCK_LOW=triton.next_power_of_2(low_count),
        CAUSAL=causal,
        num_warps=8 if max(block_top, low_count) > 512 else 4,
    )
    return Plan(slot_map, index, position, n), start, level, internal
