"""Ranks agree before they communicate: on the run (recipe, world layout, versions) at start,
and on the shapes and configuration of a context-parallel attention call before its first
collective. A disagreement otherwise ends in a collective that never matches (a hang, or a
backend abort that names nothing); here every rank raises the same clear error instead.

These few integers and one small object per run are control messages, not the traffic that
transport.py meters.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.distributed as dist

from lh_cp.ops.documents import DocumentsError
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
                f"the ranks of the context-parallel group call attention with different inputs ({'; '.join(differing)}); "
                f"every rank must pass its shard of the same sequence with the same configuration"
            )


def _digest(bounds: list[int]) -> int:
    """A 56-bit digest of the boundaries: equal lists give equal digests on every process."""
    data = np.asarray(bounds, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=7).digest(), "little")


def agree_on_documents(
    bounds: list[int] | None,
    problem: DocumentsError | None,
    group: dist.ProcessGroup,
    device: torch.device,
) -> None:
    """Collective: every rank of `group` passes its checked document boundaries (or, where
    they failed the check, None and the DocumentsError); raise DocumentsError on every rank
    unless all are valid and equal. One all-gather of three integers per rank."""
    mine = (0, 0, 0) if problem is not None else (1, len(bounds), _digest(bounds))
    gathered = torch.empty(3 * dist.get_world_size(group), dtype=torch.int64, device=device)
    all_gather_flat(gathered, torch.tensor(mine, dtype=torch.int64, device=device), group=group)
    rows = gathered.view(-1, 3).tolist()
    if problem is not None:
        raise problem
    invalid = [rank for rank, row in enumerate(rows) if row[0] == 0]
    if invalid:
        raise DocumentsError(
            f"rank(s) {invalid} of the context-parallel group passed invalid documents (their "
            f"error names the rule); every rank must pass the same, valid global boundaries"
        )
    differing = [rank for rank, row in enumerate(rows) if row != rows[0]]
    if differing:
        raise DocumentsError(
            "the ranks of the context-parallel group pass different documents: "
            + "; ".join(f"rank {r}: {rows[r][1] - 1} documents" for r in [0, *differing])
            + " (or the same count at other boundaries); every rank must pass the same global "
            "tensor of the whole batch"
        )
