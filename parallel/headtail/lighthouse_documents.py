"""Lighthouse attention over packed documents under CP, head-tail layout (LIGHTHOUSE.md s.12).

The single-device definition cut at the chunk boundaries. Chunks hold whole tiles, so every
region tile lies in one chunk: each rank compresses its two chunks as the unmasked CP layer
does (the causal thresholds carried from the chunk before, restarting at each region's first
tile) and packs, per chunk, the pieces of the documents that meet it (ChunkStream: head
tokens, region entries, tail tokens). A document's rows in the whole window are its pieces in
chunk order, so a piece's queries see the document's rows in every earlier chunk and, causally,
its own piece.

Exchange "allgather": the packed K and V of every chunk are all-gathered (padded to the
longest rank's stream); each rank then attends its pieces to the gathered rows of their
documents up to the piece: one varlen attention whose key sequence ends with the query piece
(causal, aligned at the end). The backward is the all-gather's adjoint, a reduce-scatter of the
K/V gradients. Every rank sends its whole (padded) stream to every other rank.
Exchange "ring" (stream_ring.py): the rank's own stream first, causally inside each document,
then at step s the rows of rank r - s's stream that this rank's pieces attend to, sent straight
from their owner, merged by log-sum-exp; the dK/dV of those rows go back to their owner. A rank
receives only rows of documents its chunks continue, and nothing from ranks it shares none with.
Deliveries run as in the unmasked layer, with the halo carrying spills into the next chunk
(the tail rule keeps every region's deliveries inside its document).

Every rank computes every chunk's stream from the global boundaries (the same on all ranks),
so the layout needs no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lh_cp.ops.compress import compress
from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.document_lighthouse import (
    ChunkStream,
    chunk_stream,
    document_regions,
    entry_rows,
    expand_runs,
    packed_rows,
    plan_streams,
    token_rows,
    unpacked,
)
from lh_cp.ops.documents import is_whole_windows
from lh_cp.ops.rope import RopeTables, check_rope, rotate_tokens
from lh_cp.parallel.headtail.attention import (
    chunk_config,
    chunk_preceding,
    chunk_tables,
    lighthouse_attention_cp,
)
from lh_cp.parallel.headtail.exchange import exchange_function
from lh_cp.parallel.headtail.halo import add_halos
from lh_cp.parallel.headtail.sharding import chunk_owner, local_chunk_ids
from lh_cp.parallel.headtail.stream_ring import (
    stream_offsets,
    stream_ring_attention,
    stream_ring_plan,
)
from lh_cp.parallel.transport import all_gather, reduce_scatter


class _GatherRows(torch.autograd.Function):
    """Every rank's rows [P, H, D] stacked in rank order -> [W, P, H, D]; the gradient comes back
    summed over the ranks that read each row (reduce-scatter)."""

    @staticmethod
    def forward(ctx, rows, group):
        ctx.group = group
        return all_gather(rows, group, "kv_forward")

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter(grad, ctx.group, "dkv_backward"), None


def _attend_prefixes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    query_bounds: list[int],
    key_bounds: list[int],
) -> torch.Tensor:
    """Per sequence i: queries q[query_bounds[i]:query_bounds[i+1]] attend to keys
    k[key_bounds[i]:key_bounds[i+1]] whose last rows are the queries' own, causally (aligned at
    the end). q [Pq, H, D], k, v [Pk, H, D] -> [Pq, H, D]."""
    longest_q = max(b - a for a, b in zip(query_bounds[:-1], query_bounds[1:]))
    longest_k = max(b - a for a, b in zip(key_bounds[:-1], key_bounds[1:]))
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention.varlen import varlen_attn

        device = q.device
        cu_q = torch.tensor(query_bounds, dtype=torch.int32, device=device)
        cu_k = torch.tensor(key_bounds, dtype=torch.int32, device=device)
        # Flash attention's causal mask is aligned at the end when keys outnumber queries.
        return varlen_attn(q, k, v, cu_q, cu_k, longest_q, longest_k, window_size=(-1, 0))
    outs = []
    for (q0, q1), (k0, k1) in zip(
        zip(query_bounds[:-1], query_bounds[1:]), zip(key_bounds[:-1], key_bounds[1:])
    ):
        rows, cols = q1 - q0, k1 - k0
        visible = torch.ones(rows, cols, dtype=torch.bool, device=q.device).tril(cols - rows)
        part = [x.transpose(0, 1).unsqueeze(0) for x in (q[q0:q1], k[k0:k1], v[k0:k1])]
        out = F.scaled_dot_product_attention(*part, attn_mask=visible)  # [1, H, rows, D]
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs)


def _gathered_attention(
    packed: list[torch.Tensor],
    streams: list[list[ChunkStream]],
    rank: int,
    world: int,
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """The "allgather" exchange: every rank's packed K and V all-gathered (padded to the longest
    rank's stream), then each query piece attends to its document's rows up to it in one varlen
    call. packed: this rank's q, k, v [P, H, D] -> out [P, H, D]."""
    offsets = stream_offsets(streams, world)
    longest = max(
        sum(chunks[c].length for chunks in streams for c in local_chunk_ids(r, world))
        for r in range(world)
    )
    padding = longest - packed[0].shape[0]
    gathered = [
        _GatherRows.apply(F.pad(x, (0, 0, 0, 0, 0, padding)), group).flatten(0, 1)
        for x in packed[1:]
    ]  # K, V of every rank: [W * longest, H, D]

    # Each query piece's keys: its document's rows in the chunks before it, then its own.
    key_runs, query_bounds, key_bounds, keys = [], [0], [0], 0
    for b, chunks in enumerate(streams):
        for c in local_chunk_ids(rank, world):
            for doc, lo, hi in chunks[c].pieces:
                for earlier in range(c + 1):
                    owner = chunk_owner(earlier, world)[0]
                    offset = offsets[owner, b, earlier]
                    for other, first, end in chunks[earlier].pieces:
                        if other == doc:
                            key_runs.append((owner * longest + offset + first, keys, end - first))
                            keys += end - first
                query_bounds.append(query_bounds[-1] + hi - lo)
                key_bounds.append(keys)
    index, _ = expand_runs(key_runs, packed[0].device)
    return _attend_prefixes(
        packed[0],
        gathered[0].index_select(0, index),
        gathered[1].index_select(0, index),
        query_bounds,
        key_bounds,
    )


def lighthouse_documents_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    bounds: list[int],
    group: dist.ProcessGroup,
    exchange: str = "allgather",
    rope: RopeTables | None = None,
) -> torch.Tensor:
    """This rank's head-tail shard q [B, 2C, H, D], k/v [B, 2C, Hkv, D] with the global checked
    boundaries `bounds` (check_documents over B windows of 2CW tokens) -> [B, 2C, H, D];
    exchange "allgather" or "ring" (stream_ring.py). One document per window is the unmasked
    layer (as on one device). `rope` (cfg.rope = "entries"): the shard's tables; entries and
    head/tail tokens are rotated here, before the exchange (LIGHTHOUSE.md s.14)."""
    exchange_function(exchange)  # a head-tail exchange, or ValueError naming them
    rope = check_rope(rope, cfg, q)
    batch, n_local, heads, dim = q.shape
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = n_local * world
    if is_whole_windows(bounds, batch, n):
        return lighthouse_attention_cp(q, k, v, cfg, group, exchange, rope)
    chunk = n_local // 2
    local_cfg = chunk_config(cfg, n, world)
    regions = document_regions(bounds, batch, n, cfg)
    streams = [
        [chunk_stream(regions, b, c * chunk, chunk, cfg, n) for c in range(2 * world)]
        for b in range(batch)
    ]
    mine = local_chunk_ids(rank, world)
    entries_per_chunk = local_cfg.selected_length(chunk)
    plan = plan_streams(
        [streams[b][c] for b in range(batch) for c in mine],
        chunk,
        entries_per_chunk,
        local_cfg.tiles,
        q.device,
    )
    q_rows = q.reshape(2 * batch, chunk, heads, dim)  # chunk row 2b + slot
    k_rows, v_rows = (x.reshape(2 * batch, chunk, *x.shape[2:]) for x in (k, v))
    preceding = chunk_preceding(q_rows, k_rows, v_rows, local_cfg, group)  # [2B, H, L-1, 2]
    rope_rows = chunk_tables(rope, q)  # [2B, C, D/2] each, or None
    entries = compress(
        q_rows, k_rows, v_rows, local_cfg, preceding=preceding, restart=plan.restart, rope=rope_rows
    )
    sources = zip(
        token_rows(*rotate_tokens(q_rows, k_rows, rope_rows), v_rows), entry_rows(entries)
    )
    packed = [packed_rows(t, e, plan) for t, e in sources]  # [P, H, D]
    if exchange == "ring":
        ring_plan = stream_ring_plan(streams, plan.pieces, rank, world, q.device)
        out = stream_ring_attention(*packed, group, ring_plan)  # [P, H, D]
    else:
        out = _gathered_attention(packed, streams, rank, world, group)  # [P, H, D]
    spill = local_cfg.coarsest_span - 1
    rows, spill_rows = unpacked(out, plan, 2 * batch, chunk, entries, spill)  # [2B, C, H, D]
    if spill > 0:
        rows = add_halos(rows, spill_rows, group)
    return rows.reshape(batch, n_local, heads, dim)
