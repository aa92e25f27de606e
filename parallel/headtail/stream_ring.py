"""Ring exchange of packed document streams: Lighthouse with documents, exchange "ring".

Lighthouse with documents under CP (lighthouse_documents.py, LIGHTHOUSE.md s.12) packs each
rank's two head-tail chunks into one stream of rows [P, H, D]: per batch row, the ChunkStream of
its head chunk then that of its tail chunk (each a run of document pieces: head tokens, region
entries, tail tokens). A document's rows in the whole window are its pieces in chunk order, and
every row of a piece in an earlier chunk precedes every row of a piece in a later one. So a
query piece attends to its document's rows in every earlier chunk without a mask, and to
itself causally. Here the K/V rows of the other ranks arrive step by step; the partial results
merge by their log-sum-exp (merge_into), as in the unmasked ring (ring.py).

Step 0, the rank's own stream: causal attention inside each run of one document. A document
that meets both local chunks of a batch row has its two pieces adjacent in the stream (the last
piece of the head chunk's stream, the first of the tail chunk's), and its tail piece sees all of
its head piece: causal attention of the run. One varlen call.

Step s = 1 .. W-1, the stream of rank o = r - s: documents are contiguous, so the only document
of a query chunk c that began before c is the one holding c's first token; in an earlier chunk
e that document is e's whole stream (it covers e) or the last piece of it (it starts in e).
Under head-tail pairing either o < r, and then only o's head chunk precedes r's chunks (o's tail
chunk follows both), or o > r, and then both of o's chunks precede r's tail chunk only. So, per
batch row, the rows that r's queries attend to form one contiguous run of what arrives, and the
query pieces that attend to it are pieces of one document (in r's head chunk, in its tail
chunk, or both, seeing the same rows): one rectangle each, one unmasked varlen call per step.
The plan checks these facts instead of assuming them (StreamRingPlan).

What travels, and why not hop by hop: forwarded around the ring, every stream would reach every
rank (W - 1 hops of the whole stream, as the all-gather sends), though with short documents a
rank attends to almost none of it. As the dense ring with documents does (ring.py), step s sends
each rank's rows straight to rank r + s, only the rows rank r + s attends to (those of the
documents its query chunks continue, in its owner's chunks before them), and nothing where it
attends to none. Still one batch_isend_irecv per step and direction on every rank (nothing can
deadlock), the next step's transfer posted before this step's compute (overlap), and at most
two received pieces alive at once (memory of one block in flight). Backward runs the same steps:
the K/V rows travel again (forward keeps only q, k, v, out and lse), and the dK/dV of the rows a
rank received go straight back to their owner, in float32 (float64 for float64), the return of
step s travelling while step s + 1 computes. The bytes: traffic.lighthouse_documents_cp_bytes.

Kernels: fused_blocks.fused_segments_forward / _backward (flash attention's varlen kernel, which
takes separate query and key segments and returns the LSE; the backward runs from the final
merged out and LSE) on CUDA half precision, blocks.segments_forward / _backward elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from lh_cp.ops.document_lighthouse import ChunkStream
from lh_cp.ops.pyramid import accumulation_dtype
from lh_cp.parallel.headtail.blocks import merge_into, segments_backward, segments_forward
from lh_cp.parallel.headtail.fused_blocks import (
    fused_segments_backward,
    fused_segments_forward,
    fused_supported,
)
from lh_cp.parallel.headtail.sharding import local_chunk_ids
from lh_cp.parallel.transport import exchange_p2p

# Distinct tags keep the K/V and the dK/dV transfers of one step apart (gloo matches by tag).
_KV_TAG, _GRAD_TAG = 13, 14


@dataclass(frozen=True)
class Segments:
    """The segments of one varlen call: cumulative query and key row bounds (host lists), the
    same as int32 tensors on the device (the fused kernel's cu_seqlens) and the longest of each."""

    query_bounds: list[int]
    key_bounds: list[int]
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    longest_q: int
    longest_k: int

    @classmethod
    def of(cls, query_bounds: list[int], key_bounds: list[int], device) -> Segments:
        def cu(bounds: list[int]) -> torch.Tensor:
            return torch.tensor(bounds, dtype=torch.int32, device=device)

        def longest(bounds: list[int]) -> int:
            return max(b - a for a, b in zip(bounds[:-1], bounds[1:]))

        return cls(
            query_bounds,
            key_bounds,
            cu(query_bounds),
            cu(key_bounds),
            longest(query_bounds),
            longest(key_bounds),
        )


@dataclass(frozen=True)
class StreamStep:
    """Step s of the ring for one rank r. send_rows: int64 rows of r's stream that rank r + s
    attends to, ascending (None: nothing is sent); arriving: how many rows come from rank r - s
    (0: nothing); query_rows: int64 rows of r's stream whose queries attend to them, segment by
    segment; segments: those query rows against the arriving rows (which they tile, in order)."""

    send_rows: torch.Tensor | None
    arriving: int
    query_rows: torch.Tensor | None
    segments: Segments | None


@dataclass(frozen=True)
class StreamRingPlan:
    """How one rank runs the ring: its own stream's runs of one document (causal segments) and
    its W - 1 steps."""

    own: Segments
    steps: list[StreamStep]


def stream_offsets(streams: list[list[ChunkStream]], world: int) -> dict:
    """(rank, batch row, chunk) -> the first row of that chunk's stream in the rank's packed
    stream (per batch row the head chunk's stream, then the tail chunk's)."""
    offsets = {}
    for rank in range(world):
        row = 0
        for b, chunks in enumerate(streams):
            for c in local_chunk_ids(rank, world):
                offsets[rank, b, c] = row
                row += chunks[c].length
    return offsets


def attended_rows(
    streams: list[list[ChunkStream]], offsets: dict, world: int, receiver: int, owner: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(query rows of `receiver`'s stream, key rows of `owner`'s stream) for every query piece
    of `receiver` that attends to some of `owner`'s rows: its document's pieces in `owner`'s
    chunks before the piece's chunk, in chunk order."""
    found = []
    for b, chunks in enumerate(streams):
        owned = [
            (e, {doc: (lo, hi) for doc, lo, hi in chunks[e].pieces})
            for e in local_chunk_ids(owner, world)
        ]
        for c in local_chunk_ids(receiver, world):
            for doc, lo, hi in chunks[c].pieces:
                keys = [
                    offsets[owner, b, e] + np.arange(*pieces[doc])
                    for e, pieces in owned
                    if e < c and doc in pieces
                ]
                if keys:
                    first = offsets[receiver, b, c]
                    found.append((np.arange(first + lo, first + hi), np.concatenate(keys)))
    return found


def _sent_rows(found: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The owner's rows that some query piece attends to, ascending: what travels."""
    return np.unique(np.concatenate([keys for _, keys in found]))


def _step_segments(
    found: list[tuple[np.ndarray, np.ndarray]], receiver: int, owner: int
) -> tuple[np.ndarray, list[int], list[int]]:
    """The receiver's query rows and the segment bounds (query side, key side over the arriving
    rows) of one step. Query pieces that see the same rows become one segment; the segments'
    key runs must be contiguous in what arrives and tile it (the module docstring's argument)."""
    sent = _sent_rows(found)
    runs: dict[tuple[int, int], list[np.ndarray]] = {}
    for queries, keys in found:
        positions = np.searchsorted(sent, keys)
        first, last = int(positions[0]), int(positions[-1]) + 1
        if last - first != keys.size or not np.array_equal(positions, np.arange(first, last)):
            raise RuntimeError(
                f"rank {receiver}'s query rows {queries[0]}..{queries[-1]} attend to rows of rank "
                f"{owner} that are not one run of what it sends: the ring's plan assumes "
                f"contiguous documents in head-tail chunks"
            )
        runs.setdefault((first, last), []).append(queries)
    query_rows, query_bounds, key_bounds = [], [0], [0]
    for first, last in sorted(runs):
        if first != key_bounds[-1]:
            raise RuntimeError(
                f"rows {key_bounds[-1]}..{first} of what rank {owner} sends to rank {receiver} "
                f"overlap or miss a segment: the ring's plan assumes contiguous documents"
            )
        rows = np.concatenate(runs[first, last])
        query_rows.append(rows)
        query_bounds.append(query_bounds[-1] + rows.size)
        key_bounds.append(last)
    return np.concatenate(query_rows), query_bounds, key_bounds


def own_runs(pieces: list[tuple[int, int, int]]) -> list[int]:
    """Cumulative bounds of the runs of one document over a stream, from its pieces (document,
    first row, end row) in stream order: adjacent pieces of one document are one run."""
    bounds, previous = [0], None
    for doc, _, end in pieces:
        if doc == previous:
            bounds[-1] = end
        else:
            bounds.append(end)
        previous = doc
    return bounds


def stream_ring_plan(
    streams: list[list[ChunkStream]],
    pieces: list[tuple[int, int, int]],
    rank: int,
    world: int,
    device: torch.device,
) -> StreamRingPlan:
    """The plan of `rank` from every chunk's stream (streams[b][c], built from the global
    boundaries: the same on every rank) and the pieces of its own packed stream
    (DocumentPlan.pieces)."""
    offsets = stream_offsets(streams, world)
    bounds = own_runs(pieces)
    steps = []
    for step in range(1, world):
        target, source = (rank + step) % world, (rank - step) % world
        outgoing = attended_rows(streams, offsets, world, target, rank)
        incoming = attended_rows(streams, offsets, world, rank, source)
        send_rows = torch.from_numpy(_sent_rows(outgoing)).to(device) if outgoing else None
        if not incoming:
            steps.append(StreamStep(send_rows, 0, None, None))
            continue
        query_rows, query_bounds, key_bounds = _step_segments(incoming, rank, source)
        steps.append(
            StreamStep(
                send_rows,
                key_bounds[-1],
                torch.from_numpy(query_rows).to(device),
                Segments.of(query_bounds, key_bounds, device),
            )
        )
    return StreamRingPlan(Segments.of(bounds, bounds, device), steps)


def _segments_forward(q, k, v, segments: Segments, causal: bool):
    """out [Tq, H, D] (the kernel's dtype) and lse [Tq, H] (float32 or float64)."""
    if fused_supported(q):
        return fused_segments_forward(
            q, k, v, segments.cu_q, segments.cu_k, segments.longest_q, segments.longest_k, causal
        )
    return segments_forward(q, k, v, segments.query_bounds, segments.key_bounds, causal)


def _segments_backward(dout, q, k, v, out, lse, delta, segments: Segments, causal: bool):
    """dq [Tq, H, D], dk and dv [Tk, H, D] given the final out, lse (and delta, reference)."""
    if fused_supported(q):
        return fused_segments_backward(
            dout,
            q,
            k,
            v,
            out,
            lse,
            segments.cu_q,
            segments.cu_k,
            segments.longest_q,
            segments.longest_k,
            causal,
        )
    return segments_backward(
        dout, q, k, v, lse, delta, segments.query_bounds, segments.key_bounds, causal
    )


def _post_kv(kv: torch.Tensor, step: int, plan: StreamRingPlan, group, category: str):
    """Step `step`: send this rank's rows that rank r + step attends to (kv [2, P, H, D], K and
    V) and receive those of rank r - step this rank attends to. Returns the Pending transfer."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    entry = plan.steps[step - 1]
    sends, recvs = [], []
    if entry.send_rows is not None:
        sends.append((kv.index_select(1, entry.send_rows), (rank + step) % world, _KV_TAG))
    if entry.arriving:
        shape = (2, entry.arriving, *kv.shape[2:])
        recvs.append((kv.new_empty(shape), (rank - step) % world, _KV_TAG))
    return exchange_p2p(sends, recvs, group, category)


def merge_rows(out_acc, lse_acc, rows: torch.Tensor, out: torch.Tensor, lse: torch.Tensor):
    """Fold a partial result (out [M, H, D], lse [M, H]) of the stream's rows `rows` into the
    running out_acc [P, H, D] and lse_acc [P, H], in place."""
    running, running_lse = out_acc.index_select(0, rows), lse_acc.index_select(0, rows)
    dim = out.shape[-1]
    # As [1, 1, M * H, D] rows: the merge kernel's programs take 16 rows of one (b, h) each.
    merge_into(
        running.view(1, 1, -1, dim),
        running_lse.view(1, 1, -1),
        out.reshape(1, 1, -1, dim),
        lse.to(running_lse.dtype).reshape(1, 1, -1),
    )
    out_acc.index_copy_(0, rows, running)
    lse_acc.index_copy_(0, rows, running_lse)


def stream_ring_forward(q, k, v, group, plan: StreamRingPlan):
    """q, k, v [P, H, D] (this rank's packed stream) -> out [P, H, D] and lse [P, H], in the
    accumulation dtype."""
    world = dist.get_world_size(group)
    acc = accumulation_dtype(q.dtype)
    kv = torch.stack([k, v]) if world > 1 else None  # [2, P, H, D], sent row by row
    pending = _post_kv(kv, 1, plan, group, "kv_forward") if world > 1 else None
    out, lse = _segments_forward(q, k, v, plan.own, True)
    out, lse = out.to(acc), lse.to(acc)
    for step in range(1, world):
        received = pending.wait()
        pending = _post_kv(kv, step + 1, plan, group, "kv_forward") if step < world - 1 else None
        entry = plan.steps[step - 1]
        if entry.arriving:
            keys, values = received[0]
            part = _segments_forward(
                q.index_select(0, entry.query_rows), keys, values, entry.segments, False
            )
            merge_rows(out, lse, entry.query_rows, *part)
    return out, lse


def _post_dkv(contribution, dkv: torch.Tensor, step: int, plan: StreamRingPlan, group):
    """Backward step `step`: send this rank's dK/dV of rank r - step's rows back to it; receive
    rank r + step's of the rows this rank sent it. Returns (Pending, those rows or None)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    entry = plan.steps[step - 1]
    sends = [] if contribution is None else [(contribution, (rank - step) % world, _GRAD_TAG)]
    recvs = []
    if entry.send_rows is not None:
        shape = (2, entry.send_rows.numel(), *dkv.shape[2:])
        recvs.append((dkv.new_empty(shape), (rank + step) % world, _GRAD_TAG))
    return exchange_p2p(sends, recvs, group, "dkv_backward"), entry.send_rows


def _add_returned(dkv: torch.Tensor, posted) -> None:
    """Add the returned dK/dV [2, M, H, D] of the rows sent at one step into dkv [2, P, H, D]."""
    pending, rows = posted
    received = pending.wait()
    if rows is not None:
        dkv.index_add_(1, rows, received[0])


def stream_ring_backward(dout, q, k, v, out, lse, group, plan: StreamRingPlan):
    """dq, dk, dv [P, H, D] (accumulation dtype) of this rank's stream, given the final out and
    lse of the forward."""
    world = dist.get_world_size(group)
    acc = accumulation_dtype(q.dtype)
    fused = fused_supported(q)
    dout = dout.to(q.dtype if fused else acc)
    delta = None if fused else (dout * out).sum(dim=-1)  # [P, H], the reference's rowsum
    kv = torch.stack([k, v]) if world > 1 else None
    kv_pending = _post_kv(kv, 1, plan, group, "kv_backward") if world > 1 else None
    dq, dk, dv = (
        x.to(acc) for x in _segments_backward(dout, q, k, v, out, lse, delta, plan.own, True)
    )
    dkv = torch.stack([dk, dv])  # [2, P, H, D]: the own stream's, then what the others return
    returning = None
    for step in range(1, world):
        received = kv_pending.wait()
        kv_pending = (
            _post_kv(kv, step + 1, plan, group, "kv_backward") if step < world - 1 else None
        )
        entry = plan.steps[step - 1]
        contribution = None
        if entry.arriving:
            rows = entry.query_rows
            keys, values = received[0]
            part_dq, part_dk, part_dv = _segments_backward(
                dout.index_select(0, rows),
                q.index_select(0, rows),
                keys,
                values,
                out.index_select(0, rows),
                lse.index_select(0, rows),
                None if delta is None else delta.index_select(0, rows),
                entry.segments,
                False,
            )
            dq.index_add_(0, rows, part_dq.to(acc))
            contribution = torch.stack([part_dk, part_dv]).to(acc)  # [2, M, H, D]
        previous, returning = returning, _post_dkv(contribution, dkv, step, plan, group)
        if previous is not None:  # the previous step's returns travelled while this one computed
            _add_returned(dkv, previous)
    if returning is not None:
        _add_returned(dkv, returning)
    return dq, dkv[0], dkv[1]


class StreamRing(torch.autograd.Function):
    """Attention of this rank's packed stream q, k, v [P, H, D] over the documents' rows of the
    whole window, by the ring of this file -> out [P, H, D] in q's dtype. Saved for backward:
    q, k, v, the output in the form the backward kernel reads (q's dtype for the fused kernel,
    the accumulation dtype for the reference) and the LSE [P, H]."""

    @staticmethod
    def forward(ctx, q, k, v, group, plan):
        out, lse = stream_ring_forward(q, k, v, group, plan)
        saved = out.to(q.dtype) if fused_supported(q) else out
        ctx.save_for_backward(q, k, v, saved, lse)
        ctx.group, ctx.plan = group, plan
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = stream_ring_backward(dout, q, k, v, out, lse, ctx.group, ctx.plan)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def stream_ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    plan: StreamRingPlan,
) -> torch.Tensor:
    """Causal attention of this rank's packed stream q, k, v [P, H, D] inside its documents over
    the whole window (StreamRing) -> [P, H, D]."""
    return StreamRing.apply(q, k, v, group, plan)
