"""Head-tail load balance of a causal sequence over the W ranks of a CP group.

The sequence is cut into 2W equal chunks; rank r holds chunk r followed by chunk 2W-1-r. Under
causal attention an early chunk is cheap and a late one expensive, so pairing them gives every
rank the same work. LIGHTHOUSE.md s.8.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.parallel.transport import all_gather, reduce_scatter


def local_chunk_ids(rank: int, world: int) -> tuple[int, int]:
    """Global indices of the two chunks rank `rank` of `world` holds, in local order."""
    return rank, 2 * world - 1 - rank


def chunk_owner(chunk: int, world: int) -> tuple[int, int]:
    """(rank, local slot 0 or 1) holding global chunk `chunk` of 2 * world."""
    return (chunk, 0) if chunk < world else (2 * world - 1 - chunk, 1)


def _check_divisible(n: int, world: int) -> None:
    if n % (2 * world) != 0:
        raise ValueError(
            f"head-tail sharding needs the sequence length to be a multiple of 2 * W: "
            f"N={n} is not a multiple of 2 * {world} = {2 * world}"
        )


def head_tail_positions(
    seq_len: int, rank: int, world: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global positions (int64 [seq_len / W]) of the tokens rank `rank` holds, in local order."""
    _check_divisible(seq_len, world)
    chunk = seq_len // (2 * world)
    first, second = local_chunk_ids(rank, world)
    return torch.cat(
        [
            torch.arange(first * chunk, (first + 1) * chunk, device=device),
            torch.arange(second * chunk, (second + 1) * chunk, device=device),
        ]
    )


def shard_positions(
    seq_len: int, group: dist.ProcessGroup, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global positions of this rank's shard of a `seq_len` sequence (for RoPE): int64 [N / W]."""
    return head_tail_positions(seq_len, dist.get_rank(group), dist.get_world_size(group), device)


def shard_sequence(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """This rank's head-tail shard of the full tensor x along `dim` (no communication).

    x [.., N, ..] -> [.., N / W, ..]: chunk r then chunk 2W-1-r of the 2W equal chunks.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    _check_divisible(x.shape[dim], world)
    chunks = x.chunk(2 * world, dim=dim)
    first, second = local_chunk_ids(rank, world)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def _gathered_to_sequence(gathered: torch.Tensor, world: int) -> torch.Tensor:
    """[W, 2, C, ...] (rank, slot, chunk rows) -> [2W * C, ...] in global chunk order."""
    order = [chunk_owner(chunk, world) for chunk in range(2 * world)]
    return torch.cat([gathered[rank, slot] for rank, slot in order], dim=0)


def _sequence_to_gathered(x: torch.Tensor, world: int) -> torch.Tensor:
    """Inverse of _gathered_to_sequence: [2W * C, ...] -> [W, 2, C, ...]."""
    chunks = x.chunk(2 * world, dim=0)
    per_rank = [
        torch.stack([chunks[a], chunks[b]])
        for a, b in (local_chunk_ids(r, world) for r in range(world))
    ]
    return torch.stack(per_rank)


class _Unshard(torch.autograd.Function):
    """All-gather of head-tail shards along dim 0; backward reduce-scatters the gradient.

    Reduce-scatter (a sum) is the adjoint of all-gather: if every rank's loss uses the full
    tensor, each shard's gradient is the sum of what every rank sends back for it.
    """

    @staticmethod
    def forward(ctx, x_loc, group):
        world = dist.get_world_size(group)
        ctx.group, ctx.world = group, world
        gathered = all_gather(x_loc, group, "unshard")  # [W, 2C, ...]
        gathered = gathered.view(world, 2, x_loc.shape[0] // 2, *x_loc.shape[1:])
        return _gathered_to_sequence(gathered, world)  # [2W * C, ...]

    @staticmethod
    def backward(ctx, grad):
        per_rank = _sequence_to_gathered(grad, ctx.world)  # [W, 2, C, ...]
        per_rank = per_rank.flatten(1, 2)  # [W, 2C, ...]
        return reduce_scatter(per_rank, ctx.group, "unshard_backward"), None


def unshard_sequence(x_loc: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """Full tensor from every rank's head-tail shard along `dim` (all-gather, differentiable)."""
    if x_loc.shape[dim] % 2 != 0:
        raise ValueError(
            f"a head-tail shard holds two equal chunks: its length {x_loc.shape[dim]} along dim {dim} must be even"
        )
    moved = x_loc.movedim(dim, 0).contiguous()  # [2C, ...]
    return _Unshard.apply(moved, group).movedim(0, dim)
