"""Collectives of the Ulysses layout: a differentiable all-to-all and the next-rank halo.

Ulysses (DeepSpeed-Ulysses) shards the sequence contiguously: rank r of W holds tokens
[r*C, (r+1)*C). The all-to-all trades sequence shards for head groups and back; the halo
carries the scatter's spill past a shard end to the next shard, which is on rank r + 1.
The head-tail halo of the CP code (halo.py) pairs two chunks per rank and cannot serve this
layout, but both send through transport.exchange_p2p, so the CP byte meters see this traffic;
the all-to-alls go through transport.all_to_all_uneven (even or uneven row counts) and are
metered as well.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.parallel.transport import all_to_all_uneven, exchange_p2p

# One tag for the spill of a shard to the next rank; a single message per pair and direction.
_HALO_TAG = 31


def _all_to_all_rows(x: torch.Tensor, group: dist.ProcessGroup, category: str) -> torch.Tensor:
    """Row j of x [W, ...] goes to rank j; row i of the result came from rank i (through
    transport, metered under `category`)."""
    world = dist.get_world_size(group)
    if x.shape[0] != world:
        raise ValueError(
            f"all-to-all expects a leading dim equal to the group size {world}, got {tuple(x.shape)}"
        )
    return all_to_all_uneven(x, [1] * world, [1] * world, group, category)


class _AllToAll(torch.autograd.Function):
    """Exchange of rows [W, ...] -> [W, ...]; saves nothing.

    The exchange is its own adjoint: the gradient of row j (sent to rank j, landing there as
    row r) is row r of rank j's output gradient, which the same exchange of the output
    gradients delivers back as row j.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all_rows(x, group, "alltoall_forward")

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all_rows(grad, ctx.group, "alltoall_backward"), None


def all_to_all_rows(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Differentiable all-to-all of x [W, ...]: row j goes to rank j, row i comes from rank i."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, group)


class _AllToAllUneven(torch.autograd.Function):
    """transport.all_to_all_uneven, differentiable: the gradient of the rows sent to rank j
    comes back from rank j by the same exchange with the counts swapped (its adjoint)."""

    @staticmethod
    def forward(ctx, x, send_rows, receive_rows, group):
        ctx.counts, ctx.group = (send_rows, receive_rows), group
        return all_to_all_uneven(x, send_rows, receive_rows, group, "alltoall_forward")

    @staticmethod
    def backward(ctx, grad):
        send_rows, receive_rows = ctx.counts
        returned = all_to_all_uneven(grad, receive_rows, send_rows, ctx.group, "alltoall_backward")
        return returned, None, None, None


def all_to_all_uneven_rows(
    x: torch.Tensor, send_rows: list[int], receive_rows: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Differentiable all-to-all of x [sum(send_rows), ..]: send_rows[j] rows to rank j, in
    order; returns [sum(receive_rows), ..], receive_rows[i] rows from rank i, in rank order.
    Through transport (metered as alltoall_forward, its gradient as alltoall_backward)."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllToAllUneven.apply(x, send_rows, receive_rows, group)


def _shift_forward(spill: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # Rank 0's first positions have no predecessor: its halo stays zero.
    halo = torch.zeros_like(spill, memory_format=torch.contiguous_format)
    sends = [(spill, rank + 1, _HALO_TAG)] if rank < world - 1 else []
    recvs = [(halo, rank - 1, _HALO_TAG)] if rank > 0 else []
    exchange_p2p(sends, recvs, group, "halo_forward").wait()
    return halo


def _shift_backward(grad_halo: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # The last rank's spill fell past the sequence end and was dropped: zero gradient.
    grad_spill = torch.zeros_like(grad_halo, memory_format=torch.contiguous_format)
    sends = [(grad_halo, rank - 1, _HALO_TAG)] if rank > 0 else []
    recvs = [(grad_spill, rank + 1, _HALO_TAG)] if rank < world - 1 else []
    exchange_p2p(sends, recvs, group, "halo_backward").wait()
    return grad_spill


class _ShiftToNextRank(torch.autograd.Function):
    """spill [B, h, H, D] of rank r -> halo [B, h, H, D] on rank r + 1; saves nothing (linear)."""

    @staticmethod
    def forward(ctx, spill, group):
        ctx.group = group
        return _shift_forward(spill.contiguous(), group)

    @staticmethod
    def backward(ctx, grad_halo):
        return _shift_backward(grad_halo.contiguous(), ctx.group), None


def shift_to_next_rank(spill: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Send this rank's spill to rank + 1 and return the one received from rank - 1.

    spill [B, h, H, D] -> halo [B, h, H, D]. Rank 0 receives zeros; the last rank's spill lies
    past the sequence end and is dropped, as the single-device scatter clips it.
    """
    if dist.get_world_size(group) == 1:
        return torch.zeros_like(spill)
    return _ShiftToNextRank.apply(spill, group)
