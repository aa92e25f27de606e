"""Halo of the Lighthouse scatter: deliveries that spill from one chunk into the next.

An entry covering [s, e) delivers to [e-1, e-1+c); for the last spans of a chunk that window
runs up to pool**(levels-1) - 1 positions past the chunk end, into the next chunk. Under
head-tail sharding the next chunk of rank r's first chunk (chunk r) is chunk r + 1 on rank
r + 1, except on the last rank, whose chunk W follows on the same rank; the next chunk of its
second chunk (2W-1-r) is chunk 2W-r on rank r - 1, and the spill of the last chunk (on rank 0)
leaves the sequence and is dropped, as the single-device scatter clips it.

So every rank sends at most two spills and receives at most two, all in one symmetric batch;
backward sends the gradients of the received spills back along the same edges.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.parallel.transport import exchange_p2p

# First-chunk spills travel to rank + 1, second-chunk spills to rank - 1: one tag each.
_FIRST_TAG, _SECOND_TAG = 21, 22


def _halo_forward(spill_first, spill_second, group):
    """Spills [B, h, H, D] of the two local chunks -> halos [B, h, H, D] landing on them."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    halo_first = torch.zeros_like(spill_first)  # chunk 0 (on rank 0) has no predecessor
    sends, recvs = [], []
    if rank < world - 1:
        sends.append((spill_first, rank + 1, _FIRST_TAG))
        halo_second = torch.empty_like(spill_second)
        recvs.append((halo_second, rank + 1, _SECOND_TAG))
    else:
        halo_second = spill_first.clone()  # chunk W-1 is followed by chunk W on this rank
    if rank > 0:
        sends.append((spill_second, rank - 1, _SECOND_TAG))
        recvs.append((halo_first, rank - 1, _FIRST_TAG))
    exchange_p2p(sends, recvs, group, "halo_forward").wait()
    return halo_first, halo_second


def _halo_backward(grad_first, grad_second, group):
    """Adjoint of _halo_forward: gradients of the halos -> gradients of the spills."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    grad_spill_second = torch.zeros_like(grad_second)  # rank 0's second spill was dropped
    sends, recvs = [], []
    if rank < world - 1:
        sends.append((grad_second, rank + 1, _SECOND_TAG))
        grad_spill_first = torch.empty_like(grad_first)
        recvs.append((grad_spill_first, rank + 1, _FIRST_TAG))
    else:
        grad_spill_first = grad_second.clone()
    if rank > 0:
        sends.append((grad_first, rank - 1, _FIRST_TAG))
        recvs.append((grad_spill_second, rank - 1, _SECOND_TAG))
    exchange_p2p(sends, recvs, group, "halo_backward").wait()
    return grad_spill_first, grad_spill_second


class SpillCombine(torch.autograd.Function):
    """Delivered rows [B, 2, R, H, D] of the two local chunks (R = C + spill + 1 rows: the chunk,
    its spill, one row nothing reaches) -> the shard's output [B, 2C, H, D]: each chunk's own C
    rows plus, on its first `spill` rows, the halo its predecessor chunk sent.

    One pass over the rows each way: forward copies the own rows once and adds the halos in
    place; backward writes the gradient into one [B, 2, R, H, D] buffer, the spill rows'
    gradients coming back along the halo edges. Saves nothing: the map is linear.
    """

    @staticmethod
    def forward(ctx, delivered, chunk, spill, group):
        batch, _, rows, heads, dim = delivered.shape
        ctx.group, ctx.chunk, ctx.spill, ctx.rows = group, chunk, spill, rows
        out = delivered[:, :, :chunk].contiguous()  # [B, 2, C, H, D]
        spills = delivered[:, :, chunk : chunk + spill]
        halo_first, halo_second = _halo_forward(spills[:, 0].contiguous(), spills[:, 1].contiguous(), group)
        out[:, 0, :spill] += halo_first
        out[:, 1, :spill] += halo_second
        return out.view(batch, 2 * chunk, heads, dim)

    @staticmethod
    def backward(ctx, grad_out):
        chunk, spill = ctx.chunk, ctx.spill
        batch, _, heads, dim = grad_out.shape
        grad_own = grad_out.reshape(batch, 2, chunk, heads, dim)
        grad = grad_out.new_empty(batch, 2, ctx.rows, heads, dim)
        grad[:, :, :chunk] = grad_own
        grad[:, :, chunk + spill :] = 0
        spill_first, spill_second = _halo_backward(
            grad_own[:, 0, :spill].contiguous(), grad_own[:, 1, :spill].contiguous(), ctx.group
        )
        grad[:, 0, chunk : chunk + spill] = spill_first
        grad[:, 1, chunk : chunk + spill] = spill_second
        return grad, None, None, None


def combine_spills(delivered: torch.Tensor, chunk: int, spill: int, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, 2, R, H, D] delivered rows (own C, then the spill into the next chunk) -> [B, 2C, H, D]
    with every chunk's halo added: the shard of the single-device scatter."""
    return SpillCombine.apply(delivered, chunk, spill, group)
