"""Exchange of K/V between CP ranks: all-gather or ring, for compressed and dense attention alike.

Both take the rank's two head-tail chunks chunk-major, q [2, B, H, S, D], k and v
[2, B, Hk, S, D] (S entries per chunk: compressed entries for Lighthouse, tokens for dense
attention; contiguous, so each chunk is a contiguous slice the block kernels take without a
copy) and return the causal attention of those queries over the whole sequence,
[2, B, H, S, D]: chunk i sees every chunk j < i without a mask and itself causally.
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
from lh_cp.parallel.headtail.ring import RingAttention
from lh_cp.parallel.headtail.sharding import local_chunk_ids
from lh_cp.parallel.transport import all_gather_start, reduce_scatter


class AllGatherAttention(torch.autograd.Function):
    """Gather every rank's K/V block once, then attend locally; backward reduce-scatters dK/dV.
    The gather travels while the rank attends to its own K/V block.

    Saved for backward: q, the gathered K/V (needed for dq; re-gathering would cost a second
    all-gather), the float32 output and its LSE.
    """

    @staticmethod
    def forward(ctx, q, k, v, group):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        gathering = all_gather_start(torch.stack([k, v]), group, "kv_forward")
        q_ids = local_chunk_ids(rank, world)
        out, lse = empty_accumulators(q)  # [2, B, H, S, D], [2, B, H, S]
        # The rank's own K/V first, while the others' travel.
        accumulate_forward(q, k, v, q_ids, q_ids, out, lse)
        kv_all = gathering.wait()  # [W, 2, 2, B, Hk, S, D]
        for source in range(world):
            if source != rank:
                accumulate_forward(q, kv_all[source, 0], kv_all[source, 1], q_ids, local_chunk_ids(source, world), out, lse)
        ctx.save_for_backward(q, kv_all, out, lse)
        ctx.group = group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, kv_all, out, lse = ctx.saved_tensors
        group = ctx.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        grads = backward_inputs(dout, q, out, lse)
        q_ids = local_chunk_ids(rank, world)
        dq = torch.zeros(q.shape, dtype=out.dtype, device=q.device)
        dkv_all = torch.zeros(kv_all.shape, dtype=out.dtype, device=q.device)  # [W, 2, 2, B, Hk, S, D]
        for source in range(world):
            accumulate_backward(
                grads, q, kv_all[source, 0], kv_all[source, 1], q_ids, local_chunk_ids(source, world),
                dq, dkv_all[source, 0], dkv_all[source, 1],
            )
        dkv = reduce_scatter(dkv_all, group, "dkv_backward")  # [2, 2, B, Hk, S, D]
        return dq.to(q.dtype), dkv[0].to(q.dtype), dkv[1].to(q.dtype), None


EXCHANGE_FUNCTIONS = {"allgather": AllGatherAttention, "ring": RingAttention}


def exchange_function(exchange: str):
    """The autograd Function of a head-tail exchange name; ValueError naming the choices."""
    function = EXCHANGE_FUNCTIONS.get(exchange)
    if function is None:
        raise ValueError(f"head-tail exchange must be one of {tuple(EXCHANGE_FUNCTIONS)}, got exchange={exchange!r}")
    return function


def exchange_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, exchange: str
) -> torch.Tensor:
    """Causal attention of the local chunks over the full sequence: [2, B, H, S, D]."""
    return exchange_function(exchange).apply(q, k, v, group)
