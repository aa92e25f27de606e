"""Document masking in the head-tail layout: which rows of a rank's chunks attend to which
columns of a block of earlier chunks, and the varlen segments of the rank's own block.

The sequence is cut into 2W chunks of S tokens (global chunk c holds window positions
[cS, (c+1)S)); a key block is some of them in ascending order, concatenated. Documents are
contiguous ranges of a window (lh_cp/ops/documents.py), so a query chunk shares a document with
an earlier chunk only through the document that holds its first token: every other document
of the chunk starts inside it. Hence, for each batch row:
- the queries of chunk c that see keys before the chunk are its first `rows` tokens (that
  document's part of the chunk), and they see every earlier key from the document's start on;
- in a key block of earlier chunks those keys are one contiguous range of columns, ending at
  the end of the chunks the query chunk sees (a document reaching back to position p holds
  everything between p and the chunk).
So a remote block stays one unmasked attention call per QueryPiece (a rectangle of rows x
columns), as without documents; a block with no columns for any piece is neither attended nor,
where the exchange sends blocks one by one (the ring), sent.

The rank's own block (its head chunk r and tail chunk 2W-1-r, concatenated in that local
order) is causal attention of the concatenation restricted to documents. The tokens of one
document are contiguous in local order as well: a document that runs from the head chunk
into the tail chunk holds the end of one and the start of the other, and everything between
lies on other ranks. So the own block is varlen causal attention over the runs of one document
in local order (OwnSegments): on GPUs one varlen kernel call (fused_blocks.py), in the
reference a same-document mask.

Without documents every batch row's only piece is the whole chunk (start 0: all earlier keys)
and the own block is plain causal: the unmasked exchange, unchanged.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from lh_cp.ops.documents import is_whole_windows
from lh_cp.parallel.headtail.sharding import local_chunk_ids


def visible_prefix(q_id: int, kv_ids: list[int] | tuple[int, ...]) -> int:
    """How many leading chunks of a key block (chunk ids kv_ids, ascending, none of them q_id)
    query chunk q_id sees: those before it. They always form a prefix of the block, so one
    unmasked call covers them."""
    seen = sum(1 for c in kv_ids if c < q_id)
    if any(c > q_id for c in kv_ids[:seen]) or q_id in kv_ids:
        raise ValueError(f"chunks {kv_ids} are not an ascending block of chunks other than {q_id}")
    return seen


@dataclass(frozen=True)
class QueryPiece:
    """Queries of one local chunk that attend to earlier chunks: the first `rows` tokens of
    chunk `slot` (0 head, 1 tail) in the batch rows `batch`, whose document starts at window
    position `start` (0 without documents: every earlier key)."""

    slot: int
    batch: slice
    rows: int
    start: int

    def key_columns(
        self, q_id: int, kv_ids: list[int] | tuple[int, ...], length: int
    ) -> tuple[int, int] | None:
        """Columns [first, last) of a key block (chunks kv_ids, ascending, `length` tokens
        each) that these queries of chunk q_id attend to; None when they attend to none."""
        seen = visible_prefix(q_id, kv_ids)
        for index, chunk in enumerate(kv_ids[:seen]):
            if (chunk + 1) * length > self.start:
                return index * length + max(0, self.start - chunk * length), seen * length
        return None

    def local_rows(self, length: int) -> slice:
        """The piece's rows among the rank's 2S local rows."""
        first = self.slot * length
        return slice(first, first + self.rows)

    def is_whole_chunk(self, length: int) -> bool:
        return self.batch == slice(None) and self.rows == length


def whole_chunks(length: int) -> tuple[QueryPiece, QueryPiece]:
    """The pieces without documents: each chunk whole, every batch row, every earlier key."""
    return tuple(QueryPiece(slot, slice(None), length, 0) for slot in (0, 1))


@dataclass(frozen=True)
class OwnSegments:
    """The rank's own block under documents: cu [runs + 1] int32, the cumulative lengths of the
    runs of one document over the B * 2S local tokens (flattened row by row, as varlen kernels
    take them), the longest run, and the batch size B."""

    cu: torch.Tensor
    longest: int
    batch: int

    def same_document(self) -> torch.Tensor:
        """bool [B, 2S, 2S]: True where query and key lie in one run (the reference's mask)."""
        lengths = (self.cu[1:] - self.cu[:-1]).long()
        ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=self.cu.device), lengths)
        ids = ids.view(self.batch, -1)  # [B, 2S]: each local token's run
        return ids[:, :, None] == ids[:, None, :]


class HeadTailDocuments:
    """What the documents of a batch of B windows of N tokens mean for every rank of a W-rank
    head-tail layout: each rank's query pieces and own-block segments, and which key columns
    of one rank's block another rank attends to (the ring sends those). Built from the checked
    global boundaries (lh_cp.ops.documents.check_documents), identically on every rank."""

    def __init__(self, bounds: list[int], batch: int, n: int, world: int) -> None:
        if n % (2 * world) != 0:
            raise ValueError(
                f"head-tail sharding needs N to be a multiple of 2 * W: N={n}, W={world}"
            )
        self.bounds, self.batch, self.n, self.world = bounds, batch, n, world
        self.length = n // (2 * world)
        self._pieces: dict[int, tuple[QueryPiece, ...]] = {}
        # Each window's documents as (start, end) window positions.
        self.windows: list[list[tuple[int, int]]] = [[] for _ in range(batch)]
        for a, b in zip(bounds[:-1], bounds[1:]):
            row = a // n
            self.windows[row].append((a - row * n, b - row * n))
        self._starts = [[start for start, _ in window] for window in self.windows]

    def _document_at(self, row: int, position: int) -> int:
        """Index in self.windows[row] of the document holding window position `position`."""
        return bisect.bisect_right(self._starts[row], position) - 1

    def pieces(self, rank: int) -> tuple[QueryPiece, ...]:
        """The query pieces of `rank`: per chunk and batch row, the rows of the chunk's first
        document, where that document began before the chunk (the only rows that see earlier
        chunks)."""
        if rank in self._pieces:
            return self._pieces[rank]
        found = []
        for slot, chunk in enumerate(local_chunk_ids(rank, self.world)):
            first = chunk * self.length
            for row in range(self.batch):
                start, end = self.windows[row][self._document_at(row, first)]
                if start < first:
                    found.append(
                        QueryPiece(slot, slice(row, row + 1), min(end - first, self.length), start)
                    )
        self._pieces[rank] = tuple(found)
        return self._pieces[rank]

    def segments(self, rank: int, device: torch.device) -> OwnSegments:
        """The runs of one document over the rank's local tokens (head chunk, then tail chunk)."""
        runs: list[int] = []
        for row in range(self.batch):
            window, previous = self.windows[row], None
            for chunk in local_chunk_ids(rank, self.world):
                begin, stop = chunk * self.length, (chunk + 1) * self.length
                for index in range(self._document_at(row, begin), len(window)):
                    start, end = window[index]
                    if start >= stop:
                        break
                    if index != previous:  # a new document: a new run
                        runs.append(0)
                        previous = index
                    runs[-1] += min(end, stop) - max(start, begin)
        cu = [0]
        for size in runs:
            cu.append(cu[-1] + size)
        return OwnSegments(
            torch.tensor(cu, dtype=torch.int32, device=device), max(runs), self.batch
        )

    def shared_columns(self, receiver: int, owner: int) -> tuple[int, int] | None:
        """Columns [first, last) of `owner`'s block (its two chunks, local order) that any query
        piece of `receiver` attends to, over all batch rows; None when none does."""
        kv_ids = local_chunk_ids(owner, self.world)
        q_ids = local_chunk_ids(receiver, self.world)
        ranges = [
            piece.key_columns(q_ids[piece.slot], kv_ids, self.length)
            for piece in self.pieces(receiver)
        ]
        ranges = [r for r in ranges if r is not None]
        if not ranges:
            return None
        return min(r[0] for r in ranges), max(r[1] for r in ranges)


@dataclass(frozen=True)
class ShardPlan:
    """How one rank runs the exchange: its query pieces, its own block's segments (None: plain
    causal) and, for the ring with documents, the plan of every rank (None without documents)."""

    pieces: tuple[QueryPiece, ...]
    segments: OwnSegments | None
    documents: HeadTailDocuments | None

    @property
    def masked(self) -> bool:
        return self.documents is not None


def shard_plan(
    bounds: list[int] | None,
    batch: int,
    n: int,
    rank: int,
    world: int,
    device: torch.device,
) -> ShardPlan:
    """The plan of `rank` for checked boundaries (None, or one document per window: the
    unmasked exchange)."""
    length = n // (2 * world)
    if bounds is None or is_whole_windows(bounds, batch, n):
        return ShardPlan(whole_chunks(length), None, None)
    documents = HeadTailDocuments(bounds, batch, n, world)
    return ShardPlan(documents.pieces(rank), documents.segments(rank, device), documents)
