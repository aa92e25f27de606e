"""Halo of the Lighthouse scatter: deliveries that spill from one chunk into the next.

An entry covering [s, e) delivers to [e-1, e-1+c); for the last spans of a chunk that window
runs up to pool**(levels-1) - 1 positions past the chunk end, into the next chunk. Under
head-tail sharding the next chunk of rank r's first chunk (chunk r) is chunk r + 1 on rank
r + 1, except on the last rank, whose chunk W follows on the same rank; the next chunk of its
second chunk (2W-1-r) is chunk 2W-r on rank r - 1, and the spill of the last chunk (on rank 0)
leaves the sequence and is dropped, as the single-device scatter clips it.

So every rank sends at most two spills and receives at most two, all in one symmetric batch;
backward sends the gradients of the received spills back along the same edges. The halos are
added in place (parallel/spill.py), so the shard's output is the scatter's own rows, uncopied.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.parallel.spill import add_to_first_rows
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


class _HaloExchange(torch.autograd.Function):
    """Spill rows [B, h, H, D] of the two local chunks -> the halos [B, h, H, D] landing on
    them (linear, saves nothing); backward sends the halos' gradients back along the edges."""

    @staticmethod
    def forward(ctx, spill_first, spill_second, group):
        ctx.group = group
        return _halo_forward(spill_first.contiguous(), spill_second.contiguous(), group)

    @staticmethod
    def backward(ctx, grad_first, grad_second):
        return *_halo_backward(grad_first.contiguous(), grad_second.contiguous(), ctx.group), None


def add_halos(
    rows: torch.Tensor, spill_rows: torch.Tensor, group: dist.ProcessGroup
) -> torch.Tensor:
    """rows [2B, C, H, D] and spill rows [2B, h, H, D] of the two local chunks (row 2b + slot),
    as deliver(out, spill) returns them -> rows with each chunk's halo (its predecessor's
    spill) added to its first h rows, in place: the shard of the single-device scatter."""
    spills = spill_rows.unflatten(0, (rows.shape[0] // 2, 2))  # [B, 2, h, H, D]
    halo_first, halo_second = _HaloExchange.apply(spills[:, 0], spills[:, 1], group)
    return add_to_first_rows(rows, torch.stack([halo_first, halo_second], dim=1).flatten(0, 1))
