"""Exchange of K/V between CP ranks: all-gather or ring, for compressed and dense attention alike.

Both take the rank's two head-tail chunks concatenated along the sequence in local order
(head chunk r, then tail chunk 2W-1-r; S entries each: compressed entries for Lighthouse,
tokens for dense attention): q [B, H, 2S, D], k and v [B, Hk, 2S, D]; and return the causal
attention of those queries over the whole sequence, [B, H, 2S, D].

The calls (blocks.py): the rank's own block is one square causal call (the tail chunk sees
all of the head chunk, the head chunk itself causally: the causal mask of the concatenation);
every other chunk a query chunk sees lies wholly in its past, and of any block of chunks in
ascending order it sees a prefix, so each query chunk makes one unmasked call per block and
merges it by log-sum-exp. At W = 1 the layer is that one square call, as on one device: no
merge, no float32 accumulator, no conversion.

With documents (documents.py; a ShardPlan per call) every remote call becomes one rectangle
per query piece, a block with no columns for any piece is not attended, and the own block is
causal inside each document's run. What travels: the all-gather sends every rank's whole block
(one collective of equal shares: the documents cannot make one rank's share smaller for some
peers only), so its bytes do not change with documents. The ring sends blocks one by one, so
with documents each block goes straight from its owner to each rank that attends to it, cut to
the columns that rank shares a document with (ring.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.ops.pyramid import accumulation_dtype
from lh_cp.parallel.headtail.blocks import (
    Accumulated,
    add_rows,
    backward_inputs,
    own_block_forward,
    remote_backward,
)
from lh_cp.parallel.headtail.documents import ShardPlan, whole_chunks
from lh_cp.parallel.headtail.ring import RingAttention
from lh_cp.parallel.headtail.sharding import chunk_owner, local_chunk_ids
from lh_cp.parallel.transport import all_gather_start, reduce_scatter_start


def _remote_chunk_ids(rank: int, world: int) -> list[int]:
    """Every global chunk not on `rank`, ascending."""
    return [c for c in range(2 * world) if c not in local_chunk_ids(rank, world)]


def _remote_sequence(kv_all: torch.Tensor, rank: int, world: int, length: int) -> torch.Tensor:
    """The gathered blocks [W, 2, B, Hk, 2S, D] -> the other ranks' chunks in ascending order
    along the sequence, [2, B, Hk, (2W-2)S, D]."""
    pieces = []
    for chunk in _remote_chunk_ids(rank, world):
        owner, slot = chunk_owner(chunk, world)
        pieces.append(kv_all[owner, :, :, :, slot * length : (slot + 1) * length])
    return torch.cat(pieces, dim=3)


def _sole_owner(rank: int, world: int) -> int | None:
    """The rank whose two chunks, in its local order, are all of `rank`'s remote chunks in
    ascending order, if there is one: the other rank at W = 2 (chunks 1, 2 for rank 0; 0, 3
    for rank 1), nobody from W = 3 on."""
    owners = [chunk_owner(c, world) for c in _remote_chunk_ids(rank, world)]
    only = owners[0][0] if owners else None
    return only if owners == [(only, 0), (only, 1)] else None


def _gradient_buffers(kv_remote: torch.Tensor, rank: int, world: int, length: int):
    """Zeroed float accumulators for the other ranks' dK/dV: the reduce-scatter's input
    [W, 2, B, Hk, 2S, D] (this rank's own row stays zero: its own gradient is added after the
    reduce-scatter) and the remote-order [2, B, Hk, (2W-2)S, D] one that remote_backward adds
    into. Where one rank owns all remote chunks in order (W = 2) the second is a view of the
    first, so nothing is copied between them."""
    dtype = accumulation_dtype(kv_remote.dtype)
    owners = kv_remote.new_zeros(
        (world, *kv_remote.shape[:3], 2 * length, kv_remote.shape[-1]), dtype=dtype
    )
    sole = _sole_owner(rank, world)
    if sole is not None:
        return owners, owners[sole]
    return owners, torch.zeros(kv_remote.shape, dtype=dtype, device=kv_remote.device)


def _to_owners(
    dkv_remote: torch.Tensor, owners: torch.Tensor, rank: int, world: int, length: int
) -> torch.Tensor:
    """Adjoint of _remote_sequence: the remote-order dK/dV [2, B, Hk, (2W-2)S, D] into the
    owners' rows of `owners` [W, 2, B, Hk, 2S, D] (nothing to do where it is a view of them)."""
    if _sole_owner(rank, world) is not None:
        return owners  # dkv_remote is a view of that owner's row (_gradient_buffers)
    for i, chunk in enumerate(_remote_chunk_ids(rank, world)):
        owner, slot = chunk_owner(chunk, world)
        owners[owner, :, :, :, slot * length : (slot + 1) * length] = dkv_remote[
            :, :, :, i * length : (i + 1) * length
        ]
    return owners


class AllGatherAttention(torch.autograd.Function):
    """Gather every rank's K/V block once, then attend locally; backward reduce-scatters dK/dV.

    The gather travels while the rank computes its own block; in backward the reduce-scatter
    of the other ranks' gradients travels while the rank computes its own block's backward.
    Saved for backward: q, k, v, the other ranks' chunks (re-gathering would cost a second
    all-gather), the output in the form the block backward reads and its LSE.
    """

    @staticmethod
    def forward(ctx, q, k, v, group, plan=None):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        length = q.shape[2] // 2
        plan = plan or ShardPlan(whole_chunks(length), None, None)
        gathering = (
            all_gather_start(torch.stack([k, v]), group, "kv_forward") if world > 1 else None
        )
        remote_ids = _remote_chunk_ids(rank, world)
        acc = Accumulated(
            *own_block_forward(q, k, v, plan.segments),
            local_chunk_ids(rank, world),
            [remote_ids] if world > 1 else [],
            plan.pieces,
        )
        kv_remote = q.new_empty(0)
        if gathering is not None:
            kv_remote = _remote_sequence(gathering.wait(), rank, world, length)
            acc.add_remote(q, kv_remote, remote_ids, length)
        ctx.save_for_backward(q, k, v, kv_remote, acc.saved_output(q), acc.lse)
        ctx.group, ctx.plan = group, plan
        return acc.out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, kv_remote, out, lse = ctx.saved_tensors
        group, plan = ctx.group, ctx.plan
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        length = q.shape[2] // 2
        grads = backward_inputs(dout, q, out, lse)
        pending, dq_parts = None, []
        if world > 1:
            owners, dkv_remote = _gradient_buffers(kv_remote, rank, world, length)
            dq_parts = remote_backward(
                grads,
                kv_remote,
                local_chunk_ids(rank, world),
                _remote_chunk_ids(rank, world),
                length,
                dkv_remote,
                plan.pieces,
            )
            pending = reduce_scatter_start(
                _to_owners(dkv_remote, owners, rank, world, length), group, "dkv_backward"
            )
        # The own block, while the others' sums travel.
        dq, dk, dv = grads.own_backward(k, v, plan.segments)
        # One remote call per query chunk: its dq is added to the own block's in place (a bf16
        # add computes in float32 and rounds once, as a float32 sum converted at the end would).
        add_rows(dq, dq_parts)
        if pending is not None:
            dkv = (
                pending.wait()
            )  # [2, B, Hk, 2S, D]: what every other rank's queries gave this block
            dk, dv = dkv[0] + dk, dkv[1] + dv
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), None, None


EXCHANGE_FUNCTIONS = {"allgather": AllGatherAttention, "ring": RingAttention}


def exchange_function(exchange: str):
    """The autograd Function of a head-tail exchange name; ValueError naming the choices."""
    function = EXCHANGE_FUNCTIONS.get(exchange)
    if function is None:
        raise ValueError(
            f"head-tail exchange must be one of {tuple(EXCHANGE_FUNCTIONS)}, got exchange={exchange!r}"
        )
    return function


def exchange_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    exchange: str,
    plan: ShardPlan | None = None,
) -> torch.Tensor:
    """Causal attention of the local chunks over the full sequence: [B, H, 2S, D]; plan: this
    rank's ShardPlan with documents (None: the unmasked exchange)."""
    return exchange_function(exchange).apply(q, k, v, group, plan)
