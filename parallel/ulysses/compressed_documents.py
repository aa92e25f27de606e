"""Compressed Ulysses over packed documents (LIGHTHOUSE.md s.12, exchange "ulysses_compressed").

The single-device definition cut at the shard boundaries. A contiguous shard holds whole tiles
(shard_config), so every region tile lies in one shard: each rank compresses its shard as the
unmasked compressed Ulysses does (the causal thresholds carried from the shard before,
restarting at each region's first tile) and packs, per window, the pieces of the documents that
meet the shard (ChunkStream: head tokens, region entries, tail tokens) into a stream of P_r rows
[P_r, H, D] of q, k and v (K/V heads repeated to the query heads, as the single-device stream
has them). A document's rows in the whole window are its pieces in shard order.

  rank r: q, k, v [B, C, H(kv), D] -> compress -> stream [P_r, 3, H, D]
  all-to-all of uneven rows (shards -> head groups): rank j gets every shard's stream of heads
    [j H/W, (j+1) H/W): [sum_i P_i, 3, H/W, D], shard by shard
  rows reordered window by window (B > 1; at B = 1 shard order is window order): each window's
    stream is its shards' streams in order, so every document is one contiguous run
  one varlen causal attention over those runs (lh_cp/ops/dense.py document_causal: torch's
    varlen kernel on CUDA, one SDPA per document elsewhere), each document one sequence
  back in shard order, all-to-all back (head groups -> shards): [P_r, H, D]
  unpack: token entries at their positions, region entries delivered; the spill of c_L - 1
    rows goes to rank r + 1 (halo), as in the unmasked layer

What travels, per rank and layer, in rows of H/W heads of D values (activation dtype):
forward its stream's q, k, v rows for the other head groups (3 (W-1) P_r rows) and the output
rows of the other shards for its heads (sum_i P_i - P_r rows); backward the gradients of both,
each the other way ((W-1) P_r and 3 (sum_i P_i - P_r) rows); plus the halo and, with the causal
selection, the thresholds, as without documents. The streams'
lengths P_i follow from the global boundaries, known to every rank, so no length is exchanged.
Short documents make P_r approach C (their tokens are entries of one token each), as on one
device. Counted by ulysses.traffic.compressed_ulysses_document_bytes, which the tests hold
equal to what the code sends.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from lh_cp.ops.attention import check_qkv
from lh_cp.ops.compress import compress, selection_carry
from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.dense import document_causal
from lh_cp.ops.document_lighthouse import (
    ChunkStream,
    chunk_stream,
    document_regions,
    entry_rows,
    packed_rows,
    plan_streams,
    token_rows,
    unpacked,
)
from lh_cp.ops.documents import is_whole_windows
from lh_cp.ops.rope import RopeTables, check_rope, rotate_tokens
from lh_cp.parallel.selection_carry import preceding_thresholds
from lh_cp.parallel.spill import add_to_first_rows
from lh_cp.parallel.ulysses.comm import all_to_all_uneven_rows, shift_to_next_rank
from lh_cp.parallel.ulysses.compressed import (
    check_heads_divisible,
    compressed_ulysses_attention,
    shard_config,
)


def shard_streams(
    bounds: list[int], batch: int, n: int, world: int, cfg: LighthouseConfig
) -> list[list[ChunkStream]]:
    """streams[b][i]: the ChunkStream of window b's shard i (tokens [iC, (i+1)C), C = n / W)."""
    shard = n // world
    regions = document_regions(bounds, batch, n, cfg)
    return [
        [chunk_stream(regions, b, i * shard, shard, cfg, n) for i in range(world)]
        for b in range(batch)
    ]


def window_order(streams: list[list[ChunkStream]]) -> tuple[np.ndarray | None, list[int]]:
    """Where the all-to-all puts the streams (shard by shard, each shard's windows in order)
    against where the attention wants them (window by window, each window's shards in order):
    the int64 index that reorders the received rows into window order (None at B = 1, where the
    two orders agree), and the cumulative bounds of the documents' runs in window order."""
    batch, world = len(streams), len(streams[0])
    shard_first, row = {}, 0
    for i in range(world):
        for b in range(batch):
            shard_first[b, i] = row
            row += streams[b][i].length
    index, bounds, previous = [], [0], None
    for b in range(batch):
        for i in range(world):
            index.append(shard_first[b, i] + np.arange(streams[b][i].length))
            for doc, lo, hi in streams[b][i].pieces:
                if doc == previous:
                    bounds[-1] += hi - lo
                else:
                    bounds.append(bounds[-1] + hi - lo)
                previous = doc
    return (np.concatenate(index) if batch > 1 else None), bounds


def _heads_to_groups(rows: torch.Tensor, world: int) -> torch.Tensor:
    """[P, X, H, D] -> [W * P, X, H/W, D]: head group j's rows, for rank j, one after another."""
    length, extra, heads, dim = rows.shape
    return (
        rows.view(length, extra, world, heads // world, dim)
        .permute(2, 0, 1, 3, 4)
        .reshape(world * length, extra, heads // world, dim)
    )


def _groups_to_heads(rows: torch.Tensor, world: int) -> torch.Tensor:
    """[W * P, h, D] (head group j's rows from rank j, one after another) -> [P, W * h, D]."""
    _, group_heads, dim = rows.shape
    return (
        rows.view(world, -1, group_heads, dim).transpose(0, 1).reshape(-1, world * group_heads, dim)
    )


def compressed_ulysses_documents(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    bounds: list[int],
    group: dist.ProcessGroup,
    rope: RopeTables | None = None,
) -> torch.Tensor:
    """Lighthouse with documents of rank r's contiguous shard: q [B, C, H, D], k/v [B, C, Hkv, D]
    with the global checked boundaries `bounds` (check_documents over B windows of W C tokens)
    -> [B, C, H, D], rank r's shard of the single-device layer. One document per window is the
    unmasked compressed Ulysses (as on one device). Shape rules are checked before any
    communication."""
    check_qkv(q, k, v)
    rope = check_rope(rope, cfg, q)  # the shard's tables (cfg.rope = "entries", s.14)
    batch, shard, heads, _ = q.shape
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    check_heads_divisible(heads, world)
    local_cfg = shard_config(cfg, shard, world)
    n = shard * world
    if is_whole_windows(bounds, batch, n):
        return compressed_ulysses_attention(q, k, v, cfg, group, rope)
    streams = shard_streams(bounds, batch, n, world, cfg)
    plan = plan_streams(
        [streams[b][rank] for b in range(batch)],
        shard,
        local_cfg.selected_length(shard),
        local_cfg.tiles,
        q.device,
    )
    preceding = None
    if local_cfg.uses_thresholds:
        # The causal selection's first tile of shard r starts from shard r-1's last tile.
        carry = selection_carry(q, k, v, local_cfg).unsqueeze(0)  # [1, B, H, L-1, 2]
        preceding = preceding_thresholds(carry, [rank], lambda s: (s, 0), group)[0]
    entries = compress(q, k, v, local_cfg, preceding=preceding, restart=plan.restart, rope=rope)
    sources = zip(token_rows(*rotate_tokens(q, k, rope), v), entry_rows(entries))
    packed = torch.stack([packed_rows(t, e, plan) for t, e in sources], dim=1)  # [P_r, 3, H, D]

    lengths = [sum(streams[b][i].length for b in range(batch)) for i in range(world)]  # P_i
    received = all_to_all_uneven_rows(
        _heads_to_groups(packed, world), [plan.length] * world, lengths, group
    )  # [sum P_i, 3, H/W, D], shard by shard
    order, runs = window_order(streams)
    if order is not None:
        order = torch.from_numpy(order).to(q.device)
        received = received.index_select(0, order)  # window by window
    cu = torch.tensor(runs, dtype=torch.int32, device=q.device)
    out = document_causal(*(received[None, :, i] for i in range(3)), cu, runs)[0]  # [T, H/W, D]
    if order is not None:
        out = torch.empty_like(out).index_copy(0, order, out)  # back to shard by shard
    out = _groups_to_heads(
        all_to_all_uneven_rows(out, lengths, [plan.length] * world, group), world
    )  # [P_r, H, D]

    spill = local_cfg.coarsest_span - 1
    rows, spill_rows = unpacked(out, plan, batch, shard, entries, spill)  # [B, C, H, D]
    if spill == 0:
        return rows
    return add_to_first_rows(rows, shift_to_next_rank(spill_rows, group))
