"""Every byte the CP code sends goes through here: point-to-point batches and three collectives
(all-gather, reduce-scatter, and the all-to-all of uneven row counts).

Keeping the send paths in one file lets `SentBytes` count what each rank actually sends, which
the tests compare with the closed-form accounting of headtail/traffic.py and
ulysses/traffic.py. Peers are ranks *within* the given group; they are mapped to global ranks
here because P2P ops address global ranks.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

# Meters currently counting (innermost last). Instrumentation only: it never changes what is
# sent, and communication state (the group) is always passed explicitly.
_ACTIVE_METERS: list[SentBytes] = []


class SentBytes:
    """Context manager counting the bytes this rank sends, per category.

    Point-to-point sends count their tensor's bytes. Collectives count what a bandwidth-optimal
    ring algorithm makes each rank send: (W - 1) times its own share for all-gather and
    reduce-scatter alike, whatever algorithm the backend picks.
    """

    def __init__(self) -> None:
        self.by_category: dict[str, int] = defaultdict(int)

    def __enter__(self) -> SentBytes:
        _ACTIVE_METERS.append(self)
        return self

    def __exit__(self, *exc_info) -> None:
        _ACTIVE_METERS.remove(self)

    @property
    def total(self) -> int:
        return sum(self.by_category.values())


def _record(category: str, nbytes: int) -> None:
    for meter in _ACTIVE_METERS:
        meter.by_category[category] += nbytes


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Pending:
    """Outstanding point-to-point transfers; `wait()` returns the receive buffers in order.

    It keeps the send tensors referenced: an asynchronous send must not see its buffer freed.
    """

    def __init__(self, works: list, sent: list[torch.Tensor], received: list[torch.Tensor]) -> None:
        self._works, self._sent, self._received = works, sent, received

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._works, self._sent = [], []
        return self._received


def exchange_p2p(
    sends: list[tuple[torch.Tensor, int, int]],
    recvs: list[tuple[torch.Tensor, int, int]],
    group: dist.ProcessGroup,
    category: str,
) -> Pending:
    """Start one batch of sends and receives; each item is (tensor, peer rank in group, tag).

    All sends and receives are posted in a single batch_isend_irecv, so the order in which
    peers post them cannot deadlock. Two transfers between the same pair of ranks in the same
    direction must use distinct tags or be posted in the same order on both sides.
    """
    ops, sent = [], []
    for tensor, peer, tag in sends:
        tensor = tensor.contiguous()
        sent.append(tensor)
        ops.append(dist.P2POp(dist.isend, tensor, dist.get_global_rank(group, peer), group, tag))
        _record(category, _nbytes(tensor))
    for tensor, peer, tag in recvs:
        ops.append(dist.P2POp(dist.irecv, tensor, dist.get_global_rank(group, peer), group, tag))
    works = dist.batch_isend_irecv(ops) if ops else []
    return Pending(works, sent, [tensor for tensor, _, _ in recvs])


def ring_shift(x: torch.Tensor, group: dist.ProcessGroup, tag: int, category: str) -> Pending:
    """Send x to the next rank of the ring and receive the previous rank's tensor of x's shape.

    With a single rank the ring is that rank: the "received" tensor is x itself.
    """
    world = dist.get_world_size(group)
    if world == 1:
        return Pending([], [], [x])
    rank = dist.get_rank(group)
    received = torch.empty_like(x, memory_format=torch.contiguous_format)
    return exchange_p2p(
        [(x, (rank + 1) % world, tag)], [(received, (rank - 1) % world, tag)], group, category
    )


# torch 2.13 renamed the flat collectives (the *_into_tensor / *_tensor names warn there);
# torch 2.11, on the GPU machines, has only the old names. Raw: SentBytes does not see these.
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class PendingGather:
    """A collective in flight (all-gather or reduce-scatter); `wait()` returns its result."""

    def __init__(self, work, out: torch.Tensor, sent: torch.Tensor) -> None:
        self._work, self._out, self._sent = work, out, sent

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
        self._work, self._sent = None, None
        return self._out


def all_gather_start(x: torch.Tensor, group: dist.ProcessGroup, category: str) -> PendingGather:
    """Start gathering x of every rank, stacked in rank order ([*shape] -> [W, *shape]), so
    that the caller can compute while it travels."""
    world = dist.get_world_size(group)
    if world == 1:
        return PendingGather(None, x.unsqueeze(0), x)
    x = x.contiguous()
    out = x.new_empty((world, *x.shape))
    # The flat (concatenated) form is the layout every backend accepts.
    work = all_gather_flat(out.view(-1), x.view(-1), group=group, async_op=True)
    _record(category, (world - 1) * _nbytes(x))
    return PendingGather(work, out, x)


def all_gather(x: torch.Tensor, group: dist.ProcessGroup, category: str) -> torch.Tensor:
    """x of every rank stacked in rank order: [*shape] -> [W, *shape]."""
    return all_gather_start(x, group, category).wait()


def reduce_scatter_start(x: torch.Tensor, group: dist.ProcessGroup, category: str) -> PendingGather:
    """Start summing x [W, *shape] over ranks, rank r keeping row r; `wait()` returns [*shape],
    so that the caller can compute while it travels."""
    world = dist.get_world_size(group)
    if x.shape[0] != world:
        raise ValueError(
            f"reduce_scatter expects a leading dim equal to the group size {world}, got {tuple(x.shape)}"
        )
    if world == 1:
        return PendingGather(None, x[0], x)
    x = x.contiguous()
    out = x.new_empty(x.shape[1:])
    work = reduce_scatter_flat(out.view(-1), x.view(-1), group=group, async_op=True)
    _record(category, (world - 1) * _nbytes(out))
    return PendingGather(work, out, x)


def reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup, category: str) -> torch.Tensor:
    """Sum over ranks of x [W, *shape], rank r keeping row r: -> [*shape]."""
    return reduce_scatter_start(x, group, category).wait()


def all_to_all_uneven(
    x: torch.Tensor,
    send_rows: list[int],
    receive_rows: list[int],
    group: dist.ProcessGroup,
    category: str,
) -> torch.Tensor:
    """All-to-all of rows of uneven counts: the first send_rows[0] rows of x [sum(send_rows), ..]
    go to rank 0, the next send_rows[1] to rank 1, ...; the result [sum(receive_rows), ..] holds
    receive_rows[i] rows from rank i, in rank order. Counts the rows that leave the rank."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if len(send_rows) != world or len(receive_rows) != world or x.shape[0] != sum(send_rows):
        raise ValueError(
            f"all_to_all_uneven over {world} ranks needs {world} send and receive counts and "
            f"sum(send_rows) rows: got x {tuple(x.shape)}, send_rows {send_rows}, receive_rows "
            f"{receive_rows}"
        )
    if world == 1:
        return x
    x = x.contiguous()
    out = x.new_empty((sum(receive_rows), *x.shape[1:]))
    dist.all_to_all_single(
        out, x, output_split_sizes=receive_rows, input_split_sizes=send_rows, group=group
    )
    leaving = (sum(send_rows) - send_rows[rank]) * x[0].numel() * x.element_size()
    if leaving:
        _record(category, leaving)
    return out
