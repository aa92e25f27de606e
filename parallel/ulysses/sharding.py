"""Contiguous sequence shards, the layout both Ulysses variants expect.

Rank r of W holds tokens [r*C, (r+1)*C), C = N / W. Unlike the head-tail layout of the CP
code (sharding.py) there is no load balancing to do: after the all-to-all every rank attends
over the whole sequence of its heads, so causal work is equal whatever the shard order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.parallel.transport import all_gather


def _shard_length(n: int, world: int) -> int:
    if n % world != 0:
        raise ValueError(
            f"Ulysses shards the sequence contiguously: N={n} must be a multiple of W={world}"
        )
    return n // world


def ulysses_shard(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """This rank's contiguous shard of the full tensor x along `dim` (no communication)."""
    shard = _shard_length(x.shape[dim], dist.get_world_size(group))
    return x.narrow(dim, dist.get_rank(group) * shard, shard)


def ulysses_positions(
    n: int, group: dist.ProcessGroup, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global positions (int64 [N / W]) of this rank's tokens, for RoPE."""
    shard = _shard_length(n, dist.get_world_size(group))
    start = dist.get_rank(group) * shard
    return torch.arange(start, start + shard, device=device)


@torch.no_grad()
def ulysses_unshard(x_loc: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """Full tensor from every rank's contiguous shard along `dim` (all-gather; no gradient)."""
    gathered = all_gather(x_loc.movedim(dim, 0), group, "unshard")  # [W, C, ...]
    return gathered.flatten(0, 1).movedim(0, dim)
