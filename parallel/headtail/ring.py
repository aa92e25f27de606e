"""Ring exchange: compressed (or dense) K/V blocks travel around the CP ring.

Step s of W: rank r holds the K/V block of rank r - s (its two chunks along the sequence,
[2, B, Hk, 2S, D], K and V stacked), attends its query chunks to it (step 0: the own block's
one square causal call; later: one unmasked call per query chunk that sees the block, see
exchange.py), merges by log-sum-exp, and meanwhile receives the next block from rank r - 1.
At most two K/V blocks are alive at once (the one in use and the one arriving); every rank
sends to r + 1 and receives from r - 1 in one batch_isend_irecv, so the pattern is symmetric
and cannot deadlock.

Backward runs the same ring again. Each block travels with its dK/dV accumulator: rank r adds
its contribution and passes the accumulator on, and after W hops it reaches its owner holding
the sum over all ranks. Gradients are accumulated and sent in float32 (float64 for float64)
so that low-precision inputs do not lose the sum over W partial gradients; dq too from W = 3
on, where a query chunk gets several remote parts (at W = 2 it gets at most one, added to the
own block's dq in the kernel's dtype: one rounding either way). Backward holds two
K/V blocks and up to three dK/dV buffers (one in flight, one arriving, one being computed):
the arriving accumulator is added after the local contribution, so its transfer overlaps
the compute. At W = 1 nothing travels: forward and backward are the own block's call.

With documents (a ShardPlan with documents, documents.py) step s still deals with the block of
rank r - s, but the block no longer travels around the ring: forwarded hop by hop it would
cross ranks that share no document with it (with short documents a rank attends only to its
neighbours' chunks, and under head-tail pairing one of those is W - 1 hops away). Instead its
owner sends it straight to rank r at step s, cut to the columns rank r's queries share a
document with (HeadTailDocuments.shared_columns; nothing at all when they share none), and in
backward rank r sends its dK/dV of those columns straight back to the owner. Still one
batch_isend_irecv per step and direction on every rank, so nothing can deadlock; at most two
received K/V pieces are alive at once, as in the ring.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.ops.pyramid import accumulation_dtype
from lh_cp.parallel.headtail.blocks import (
    Accumulated,
    add_rows,
    backward_inputs,
    merges_per_piece,
    own_block_forward,
    remote_backward,
)
from lh_cp.parallel.headtail.documents import ShardPlan, whole_chunks
from lh_cp.parallel.headtail.sharding import local_chunk_ids
from lh_cp.parallel.transport import Pending, exchange_p2p, ring_shift

# Distinct tags keep the K/V and the dK/dV transfers of one step apart on backends that match
# messages by tag (gloo); both are posted in the same order on every rank.
_KV_TAG, _GRAD_TAG = 11, 12


def _key_blocks(rank: int, world: int) -> list[tuple[int, int]]:
    """The chunk ids of the K/V blocks that reach `rank` at steps 1 .. W-1 (those of ranks
    r - 1, r - 2, ...), in order."""
    return [local_chunk_ids((rank - step) % world, world) for step in range(1, world)]


def ring_forward(q, k, v, group) -> Accumulated:
    """q [B, H, 2S, D], k and v [B, Hk, 2S, D] -> the merged output and LSE."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    length = q.shape[2] // 2
    kv = torch.stack([k, v]) if world > 1 else None  # [2, B, Hk, 2S, D], the travelling block
    pending = ring_shift(kv, group, _KV_TAG, "kv_forward") if world > 1 else None
    blocks = _key_blocks(rank, world)
    acc = Accumulated(*own_block_forward(q, k, v), local_chunk_ids(rank, world), blocks)
    for step, kv_ids in enumerate(blocks, start=1):
        (current,) = pending.wait()
        pending = ring_shift(current, group, _KV_TAG, "kv_forward") if step < world - 1 else None
        acc.add_remote(q, current, kv_ids, length)
    return acc


def ring_backward(dout, q, k, v, out, lse, group):
    """Gradients: dq [B, H, 2S, D], dk and dv [B, Hk, 2S, D] of this rank's block."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    length = q.shape[2] // 2
    grads = backward_inputs(dout, q, out, lse)
    if world == 1:
        return grads.own_backward(k, v)
    acc = accumulation_dtype(q.dtype)
    current = torch.stack([k, v])
    kv_pending = ring_shift(current, group, _KV_TAG, "kv_backward")
    blocks = _key_blocks(rank, world)
    dq, dk, dv = grads.own_backward(k, v)
    q_ids = local_chunk_ids(rank, world)
    if max(merges_per_piece(whole_chunks(length), q_ids, blocks, length)) > 1:
        dq = dq.to(
            acc
        )  # several remote parts for a chunk: summed in float32, rounded once at the end
    contribution = torch.stack([dk, dv]).to(
        acc
    )  # [2, B, Hk, 2S, D], this rank's share of its own block
    grad_pending = ring_shift(contribution, group, _GRAD_TAG, "dkv_backward")
    for step, kv_ids in enumerate(blocks, start=1):
        (current,) = kv_pending.wait()
        kv_pending = (
            ring_shift(current, group, _KV_TAG, "kv_backward") if step < world - 1 else None
        )
        contribution = torch.zeros(current.shape, dtype=acc, device=q.device)
        add_rows(
            dq,
            remote_backward(
                grads, current, local_chunk_ids(rank, world), kv_ids, length, contribution
            ),
        )
        # The accumulator for this block arrives from rank r - 1 while we computed.
        (incoming,) = grad_pending.wait()
        contribution += incoming
        grad_pending = ring_shift(contribution, group, _GRAD_TAG, "dkv_backward")
    # After W hops the accumulator that arrives is the complete gradient of our own block.
    (dkv,) = grad_pending.wait()
    return dq, dkv[0], dkv[1]


class _Arriving:
    """A document step's K/V piece in flight: wait() -> (piece [2, B, Hk, M, D], its first
    column in the owner's block), or None where nothing comes."""

    def __init__(self, pending: Pending, first_column: int | None) -> None:
        self.pending, self.first_column = pending, first_column

    def wait(self):
        received = self.pending.wait()
        return (received[0], self.first_column) if self.first_column is not None else None


def _post_kv(kv: torch.Tensor, step: int, plan: ShardPlan, group, category: str) -> _Arriving:
    """Step `step` with documents: send this rank's block kv [2, B, Hk, 2S, D] (the columns the
    receiver shares) to rank r + step, receive rank r - step's block's columns this rank shares."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    target, source = (rank + step) % world, (rank - step) % world
    sending = plan.documents.shared_columns(target, rank)
    arriving = plan.documents.shared_columns(rank, source)
    sends, recvs = [], []
    if sending is not None:
        sends.append((kv[:, :, :, sending[0] : sending[1]], target, _KV_TAG))
    if arriving is not None:
        shape = (*kv.shape[:3], arriving[1] - arriving[0], kv.shape[-1])
        recvs.append((kv.new_empty(shape), source, _KV_TAG))
    pending = exchange_p2p(sends, recvs, group, category)
    return _Arriving(pending, None if arriving is None else arriving[0])


def _post_dkv(contribution, own: torch.Tensor, step: int, plan: ShardPlan, group):
    """Step `step` of the document backward: send this rank's dK/dV `contribution` for rank
    r - step's block back to it; receive rank r + step's for this rank's block (the columns it
    was sent), in own's dtype. Returns (Pending, the received columns' first one or None)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    target, source = (rank + step) % world, (rank - step) % world
    returned = plan.documents.shared_columns(target, rank)
    sends = [] if contribution is None else [(contribution, source, _GRAD_TAG)]
    recvs = []
    if returned is not None:
        shape = (*own.shape[:3], returned[1] - returned[0], own.shape[-1])
        recvs.append((own.new_empty(shape), target, _GRAD_TAG))
    pending = exchange_p2p(sends, recvs, group, "dkv_backward")
    return pending, None if returned is None else returned[0]


def _add_returned(dkv: torch.Tensor, posted) -> None:
    """Add a returned dK/dV part [2, B, Hk, M, D] into the rank's dkv [2, B, Hk, 2S, D]."""
    pending, first = posted
    received = pending.wait()
    if first is not None:
        dkv[:, :, :, first : first + received[0].shape[3]] += received[0]


def document_ring_forward(q, k, v, group, plan: ShardPlan) -> Accumulated:
    """The ring's forward with documents: q [B, H, 2S, D], k and v [B, Hk, 2S, D] -> the
    merged output and LSE; step s's block comes straight from rank r - s, cut to the columns
    this rank shares a document with."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    length = q.shape[2] // 2
    blocks = _key_blocks(rank, world)
    kv = torch.stack([k, v]) if world > 1 else None  # [2, B, Hk, 2S, D], sent piece by piece
    acc = Accumulated(
        *own_block_forward(q, k, v, plan.segments),
        local_chunk_ids(rank, world),
        blocks,
        plan.pieces,
    )
    pending = _post_kv(kv, 1, plan, group, "kv_forward") if world > 1 else None
    for step, kv_ids in enumerate(blocks, start=1):
        received = pending.wait()
        pending = _post_kv(kv, step + 1, plan, group, "kv_forward") if step < world - 1 else None
        if received is not None:
            acc.add_remote(q, received[0], kv_ids, length, first_column=received[1])
    return acc


def document_ring_backward(dout, q, k, v, out, lse, group, plan: ShardPlan):
    """Gradients with documents: dq [B, H, 2S, D], dk and dv [B, Hk, 2S, D] of this rank's
    block. The K/V pieces travel again as in forward; each rank's dK/dV of a piece goes back
    straight to the piece's owner, in float32 (float64 for float64)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    length = q.shape[2] // 2
    grads = backward_inputs(dout, q, out, lse)
    if world == 1:
        return grads.own_backward(k, v, plan.segments)
    acc = accumulation_dtype(q.dtype)
    q_ids, blocks = local_chunk_ids(rank, world), _key_blocks(rank, world)
    kv = torch.stack([k, v])
    kv_pending = _post_kv(kv, 1, plan, group, "kv_backward")
    dq, dk, dv = grads.own_backward(k, v, plan.segments)
    if max(merges_per_piece(plan.pieces, q_ids, blocks, length), default=0) > 1:
        dq = dq.to(acc)  # several remote parts for a piece: summed in float32, rounded once
    dkv = torch.stack([dk, dv]).to(acc)  # [2, B, Hk, 2S, D]: the own block's, then the others'
    returning = None
    for step, kv_ids in enumerate(blocks, start=1):
        received = kv_pending.wait()
        kv_pending = (
            _post_kv(kv, step + 1, plan, group, "kv_backward") if step < world - 1 else None
        )
        contribution = None
        if received is not None:
            contribution = torch.zeros(received[0].shape, dtype=acc, device=q.device)
            add_rows(
                dq,
                remote_backward(
                    grads,
                    received[0],
                    q_ids,
                    kv_ids,
                    length,
                    contribution,
                    plan.pieces,
                    received[1],
                ),
            )
        previous, returning = returning, _post_dkv(contribution, dkv, step, plan, group)
        if previous is not None:  # the previous step's returns travelled while this one computed
            _add_returned(dkv, previous)
    _add_returned(dkv, returning)
    return dq, dkv[0], dkv[1]


class RingAttention(torch.autograd.Function):
    """Causal attention of the local chunks against the whole sequence, by ring exchange.

    q [B, H, 2S, D], k and v [B, Hk, 2S, D] (this rank's two head-tail chunks) -> out
    [B, H, 2S, D] in q's dtype; plan: the rank's ShardPlan with documents (None: unmasked).
    Saved for backward: q, k, v, the output in the form the block backward reads and its LSE.
    """

    @staticmethod
    def forward(ctx, q, k, v, group, plan=None):
        masked = plan is not None and plan.masked
        acc = (
            document_ring_forward(q, k, v, group, plan) if masked else ring_forward(q, k, v, group)
        )
        ctx.save_for_backward(q, k, v, acc.saved_output(q), acc.lse)
        ctx.group, ctx.plan = group, plan if masked else None
        return acc.out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        if ctx.plan is not None:
            dq, dk, dv = document_ring_backward(dout, q, k, v, out, lse, ctx.group, ctx.plan)
        else:
            dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.group)
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None, None
