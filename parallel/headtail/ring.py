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
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.ops.pyramid import accumulation_dtype
from lh_cp.parallel.headtail.blocks import (
    Accumulated,
    add_rows,
    backward_inputs,
    merges_per_chunk,
    own_block_forward,
    remote_backward,
)
from lh_cp.parallel.headtail.sharding import local_chunk_ids
from lh_cp.parallel.transport import ring_shift

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
        return grads.block_backward(k, v, True)
    acc = accumulation_dtype(q.dtype)
    current = torch.stack([k, v])
    kv_pending = ring_shift(current, group, _KV_TAG, "kv_backward")
    blocks = _key_blocks(rank, world)
    dq, dk, dv = grads.block_backward(k, v, True)
    if max(merges_per_chunk(local_chunk_ids(rank, world), blocks)) > 1:
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


class RingAttention(torch.autograd.Function):
    """Causal attention of the local chunks against the whole sequence, by ring exchange.

    q [B, H, 2S, D], k and v [B, Hk, 2S, D] (this rank's two head-tail chunks) -> out
    [B, H, 2S, D] in q's dtype. Saved for backward: q, k, v, the output in the form the block
    backward reads and its LSE.
    """

    @staticmethod
    def forward(ctx, q, k, v, group):
        acc = ring_forward(q, k, v, group)
        ctx.save_for_backward(q, k, v, acc.saved_output(q), acc.lse)
        ctx.group = group
        return acc.out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout, q, k, v, out, lse, ctx.group)
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None
