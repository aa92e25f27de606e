"""Exchange of K/V between CP ranks: all-gather or ring, for compressed and dense attention alike.

Both take the rank's two head-tail chunks in the layout q [B, H, 2, S, D], k and v
[B, Hk, 2, S, D] (S entries per chunk: compressed entries for Lighthouse, tokens for dense
attention) and return the causal attention of those queries over the whole sequence,
[B, H, 2, S, D]: chunk i sees every chunk j < i without a mask and itself causally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.parallel.partial_attention import accumulate_backward, accumulate_forward
from lh_cp.parallel.ring import RingAttention
from lh_cp.parallel.sharding import local_chunk_ids
from lh_cp.parallel.transport import all_gather, reduce_scatter
from lh_cp.pyramid import accumulation_dtype

EXCHANGES = ("allgather", "ring")


def check_exchange(exchange: str) -> None:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange must be one of {EXCHANGES}, got exchange={exchange!r}")


class AllGatherAttention(torch.autograd.Function):
    """Gather every rank's K/V block once, then attend locally; backward reduce-scatters dK/dV.

    Saved for backward: q, the gathered K/V (needed for dq; re-gathering would cost a second
    all-gather), the float32 output and its LSE.
    """

    @staticmethod
    def forward(ctx, q, k, v, group):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        acc = accumulation_dtype(q.dtype)
        kv_all = all_gather(torch.stack([k, v]), group, "kv_forward")  # [W, 2, B, Hk, 2, S, D]
        q_ids = local_chunk_ids(rank, world)
        out = torch.zeros(q.shape, dtype=acc, device=q.device)  # [B, H, 2, S, D]
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)  # [B, H, 2, S]
        for source in range(world):
            accumulate_forward(q, kv_all[source, 0], kv_all[source, 1], q_ids, local_chunk_ids(source, world), out, lse)
        ctx.save_for_backward(q, kv_all, out, lse)
        ctx.group = group
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, kv_all, out, lse = ctx.saved_tensors
        group = ctx.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        acc = accumulation_dtype(q.dtype)
        dout = dout.to(acc)
        delta = (dout * out).sum(dim=-1)  # [B, H, 2, S]
        q_ids = local_chunk_ids(rank, world)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dkv_all = torch.zeros(kv_all.shape, dtype=acc, device=q.device)  # [W, 2, B, Hk, 2, S, D]
        for source in range(world):
            accumulate_backward(
                dout, q, kv_all[source, 0], kv_all[source, 1], out, lse, delta, q_ids,
                local_chunk_ids(source, world), dq, dkv_all[source, 0], dkv_all[source, 1],
            )
        dkv = reduce_scatter(dkv_all, group, "dkv_backward")  # [2, B, Hk, 2, S, D]
        return dq.to(q.dtype), dkv[0].to(q.dtype), dkv[1].to(q.dtype), None


def exchange_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, exchange: str
) -> torch.Tensor:
    """Causal attention of the local chunks over the full sequence: [B, H, 2, S, D]."""
    check_exchange(exchange)
    if exchange == "ring":
        return RingAttention.apply(q, k, v, group)
    return AllGatherAttention.apply(q, k, v, group)
