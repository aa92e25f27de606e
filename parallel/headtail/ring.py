"""Ring exchange: compressed (or dense) K/V blocks travel around the CP ring.

Step s of W: rank r holds the K/V block of rank r - s, attends its two query chunks to it,
merges by log-sum-exp, and meanwhile receives the next block from rank r - 1. At most two K/V
blocks are alive at once (the one in use and the one arriving); every rank sends to r + 1 and
receives from r - 1 in one batch_isend_irecv, so the pattern is symmetric and cannot deadlock.

Backward runs the same ring again. Each block travels with its dK/dV accumulator: rank r adds
its contribution and passes the accumulator on, and after W hops it reaches its owner holding
the sum over all ranks. Gradients are accumulated and sent in float32 (float64 for float64)
so that low-precision inputs do not lose the sum over W partial gradients. Backward holds two
K/V blocks and up to three dK/dV buffers (one in flight, one arriving, one being computed):
the arriving accumulator is added after the local contribution, so its transfer overlaps
the compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.parallel.headtail.blocks import (
    accumulate_backward,
    accumulate_forward,
    backward_inputs,
    empty_accumulators,
)
from lh_cp.parallel.headtail.sharding import local_chunk_ids
from lh_cp.parallel.transport import ring_shift

# Distinct tags keep the K/V and the dK/dV transfers of one step apart on backends that match
# messages by tag (gloo); both are posted in the same order on every rank.
_KV_TAG, _GRAD_TAG = 11, 12


def ring_forward(q, kv, group):
    """q [2, B, H, S, D], kv [2, 2, B, Hk, S, D] (stacked K and V) -> out, lse (accumulation dtype)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    q_ids = local_chunk_ids(rank, world)
    out, lse = empty_accumulators(q)  # [2, B, H, S, D], [2, B, H, S]
    current = kv
    for step in range(world):
        pending = ring_shift(current, group, _KV_TAG, "kv_forward") if step < world - 1 else None
        source = (rank - step) % world
        accumulate_forward(q, current[0], current[1], q_ids, local_chunk_ids(source, world), out, lse)
        if pending is not None:
            (current,) = pending.wait()
    return out, lse


def ring_backward(dout, q, kv, out, lse, group):
    """Gradients (accumulation dtype): dq [2, B, H, S, D] and dkv [2, 2, B, Hk, S, D] of this rank's block."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    q_ids = local_chunk_ids(rank, world)
    grads = backward_inputs(dout, q, out, lse)
    dq = torch.zeros(q.shape, dtype=out.dtype, device=q.device)
    current = kv
    grad_pending = None
    for step in range(world):
        kv_pending = ring_shift(current, group, _KV_TAG, "kv_backward") if step < world - 1 else None
        source = (rank - step) % world
        contribution = torch.zeros(kv.shape, dtype=out.dtype, device=kv.device)  # [2, 2, B, Hk, S, D]
        accumulate_backward(
            grads, q, current[0], current[1], q_ids, local_chunk_ids(source, world), dq, contribution[0], contribution[1],
        )
        # The accumulator for this block arrives from rank r - 1 while we computed.
        if grad_pending is not None:
            (incoming,) = grad_pending.wait()
            contribution += incoming
        grad_pending = ring_shift(contribution, group, _GRAD_TAG, "dkv_backward")
        if kv_pending is not None:
            (current,) = kv_pending.wait()
    # After W hops the accumulator that arrives is the complete gradient of our own block.
    (dkv,) = grad_pending.wait()
    return dq, dkv


class RingAttention(torch.autograd.Function):
    """Causal attention of the local chunks against the whole sequence, by ring exchange.

    q [2, B, H, S, D], k and v [2, B, Hk, S, D] (this rank's two head-tail chunks) -> out
    [2, B, H, S, D] in q's dtype. Saved for backward: q, the stacked K/V, the float32 output
    and its LSE.
    """

    @staticmethod
    def forward(ctx, q, k, v, group):
        kv = torch.stack([k, v])  # [2, 2, B, Hk, S, D]
        out, lse = ring_forward(q, kv, group)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.group = group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, kv, out, lse = ctx.saved_tensors
        dq, dkv = ring_backward(dout, q, kv, out, lse, ctx.group)
        return dq.to(q.dtype), dkv[0].to(q.dtype), dkv[1].to(q.dtype), None
