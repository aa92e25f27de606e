"""Ranks agree before they communicate: on the run (recipe, world layout, versions) at start,
and on the shapes and configuration of a context-parallel attention call before its first
collective. A disagreement otherwise ends in a collective that never matches (a hang, or a
backend abort that names nothing); here every rank raises the same clear error instead.

These few integers and one small object per run are control messages, not the traffic that
transport.py meters.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.parallel.transport import all_gather_flat


def first_difference(mine: dict, others: list[dict]) -> tuple[int, str, object, object] | None:
    """(rank, key, its value, rank 0's value) of the first key whose value differs from rank
    0's (rank order, then rank 0's key order, then keys only the other rank has); None if all agree."""
    for rank, theirs in enumerate(others):
        for key in list(mine) + [k for k in theirs if k not in mine]:
            if mine.get(key) != theirs.get(key):
                return rank, key, theirs.get(key, "<missing>"), mine.get(key, "<missing>")
    return None


def agree_on_run(fingerprint: dict, group: dist.ProcessGroup) -> None:
    """Collective: raise ValueError on every rank unless all ranks of `group` hold the same
    `fingerprint` (flat key -> value), naming the first differing key and both values."""
    gathered: list[dict] = [{} for _ in range(dist.get_world_size(group))]
    dist.all_gather_object(gathered, fingerprint, group=group)
    found = first_difference(gathered[0], gathered)
    if found is not None:
        rank, key, theirs, ours = found
        count = sum(
            1
            for other in gathered
            for k in set(other) | set(gathered[0])
            if other.get(k) != gathered[0].get(k)
        )
        raise ValueError(
            f"the ranks disagree on the run before it starts: rank {rank} has {key}={theirs!r}, rank 0 has "
            f"{key}={ours!r} ({count} differing key(s) in all); launch every rank with the same recipe file, "
            f"--set options and software"
        )


def agree_on_call(
    names: tuple[str, ...], values: tuple[int, ...], group: dist.ProcessGroup, device: torch.device
) -> None:
    """Collective: raise ValueError on every rank unless all ranks of `group` pass the same
    integers `values` (named by `names`: shapes, dtype, configuration)."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    gathered = torch.empty(
        dist.get_world_size(group) * len(values), dtype=torch.int64, device=device
    )
    all_gather_flat(gathered, mine, group=group)  # flat: gloo wants 1-D here
    rows = gathered.view(-1, len(values)).tolist()
    for rank, row in enumerate(rows):
        differing = [
            f"{name}: rank {rank} {a}, rank 0 {b}"
            for name, a, b in zip(names, row, rows[0])
            if a != b
        ]
        if differing:
            raise ValueError(
                "the ranks of the context-parallel group call attention with different inputs "
                f"({'; '.join(differing)}); "
                f"every rank must pass its shard of the same sequence with the same configuration"
            )
