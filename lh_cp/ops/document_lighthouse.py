"""Lighthouse attention over packed documents on one device (docs/LIGHTHOUSE.md s.12).

Each document d = [a, z) of a window keeps to itself:
- its *region* is the run of whole selection tiles inside it, [A, Z) (A the first tile start
  >= a, Z the last tile end <= z), less its last tile when d ends before the window does and
  fewer than c_L - 1 tokens follow Z (so that no delivery of the region reaches past z); a
  document shorter than cfg.min_document_tokens, or with no whole tile, has no region;
- the region is compressed as the unmasked op compresses those tiles (the causal selection's
  thresholds start afresh at A);
- the tokens of d outside its region (the head [a, A) and the tail [Z, z), or all of d) are
  entries of one token each;
- d's entries, in causal-key order (head tokens, region entries, tail tokens), attend causally
  to each other only: one sequence of a varlen causal attention over all documents
  (lh_cp/ops/dense.py: torch's varlen kernel on CUDA, one SDPA per document elsewhere);
- region entries deliver as in s.6 (into the tail too: never past z), token entries to their
  own position.

So the pooled entries of tiles that hold a document boundary are computed with the rest of the
window (one compress call for the whole batch) but never attended to or delivered: their
outputs are zeros. A batch whose every window is one document takes the unmasked op itself.

This file plans (host-side index arithmetic, DocumentPlan) and runs the single-device layer;
the CP path builds the same plan per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lh_cp.ops.compress import Compressed, compress
from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.dense import document_causal


@dataclass(frozen=True)
class DocumentRegion:
    """One document of one window: tokens [start, end) of window `window`; its region of whole
    tiles [region_start, region_end) (empty when region_start == region_end)."""

    window: int
    start: int
    end: int
    region_start: int
    region_end: int

    @property
    def has_region(self) -> bool:
        return self.region_end > self.region_start


def document_regions(
    bounds: list[int], batch: int, n: int, cfg: LighthouseConfig
) -> list[DocumentRegion]:
    """The documents of a checked batch (check_documents' bounds) with their regions (s.12)."""
    tile = cfg.tile_size(n)
    reach = cfg.coarsest_span - 1  # how far past a span's end its delivery runs
    regions = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        window, a = divmod(lo, n)
        z = hi - window * n
        first = -(-a // tile) * tile
        last = (z // tile) * tile
        if z < n and z - last < reach:
            last -= tile
        if z - a < cfg.min_document_tokens or last <= first:
            first = last = a
        regions.append(DocumentRegion(window, a, z, first, last))
    return regions


@dataclass(frozen=True)
class ChunkStream:
    """The packed rows of one chunk of one window (a whole window on one device, a head-tail
    chunk under CP): the pieces of the documents that meet the chunk, in order, each in
    causal-key order (head tokens, region entries, tail tokens).

    token_positions / token_slots: chunk-local positions of the token entries and their rows in
    the stream; entry_indices / entry_slots: chunk-local entry indices (tile i of the chunk holds
    entries [i E, (i+1) E) in causal order) and their rows; pieces: (document index, first row,
    end row) per document; restart_tiles: chunk-local tiles where a region starts."""

    token_positions: np.ndarray
    token_slots: np.ndarray
    entry_indices: np.ndarray
    entry_slots: np.ndarray
    pieces: list[tuple[int, int, int]]
    restart_tiles: list[int]
    length: int


def chunk_stream(
    regions: list[DocumentRegion],
    window: int,
    first: int,
    chunk: int,
    cfg: LighthouseConfig,
    n: int,
) -> ChunkStream:
    """The ChunkStream of window positions [first, first + chunk) (a multiple of the tile
    size T = cfg.tile_size(n) apart), from the window's document regions."""
    tile, per_tile = cfg.tile_size(n), cfg.entries_per_tile(n)
    end = first + chunk
    tokens, token_slots, entries, entry_slots, pieces, restart = [], [], [], [], [], []
    length = 0
    for index, doc in enumerate(regions):
        if doc.window != window or doc.end <= first or doc.start >= end:
            continue
        head = np.arange(max(doc.start, first), min(doc.region_start, end))
        region = np.arange(max(doc.region_start, first), min(doc.region_end, end), tile)
        tail_from = doc.region_end if doc.has_region else doc.start
        tail = np.arange(max(tail_from, first), min(doc.end, end))
        region_entries = (
            ((region - first) // tile * per_tile)[:, None] + np.arange(per_tile)
        ).ravel()
        lo = length
        tokens += [head - first, tail - first]
        token_slots += [
            lo + np.arange(len(head)),
            lo + len(head) + len(region_entries) + np.arange(len(tail)),
        ]
        entries.append(region_entries)
        entry_slots.append(lo + len(head) + np.arange(len(region_entries)))
        length = lo + len(head) + len(region_entries) + len(tail)
        pieces.append((index, lo, length))
        if doc.has_region and first <= doc.region_start < end:
            restart.append((doc.region_start - first) // tile)

    def joined(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    return ChunkStream(
        joined(tokens),
        joined(token_slots),
        joined(entries),
        joined(entry_slots),
        pieces,
        restart,
        length,
    )


@dataclass(frozen=True)
class DocumentPlan:
    """Where every row of the packed causal attention comes from, for the chunk rows of one
    call (the B windows on one device; a rank's 2B head-tail chunks under CP).

    The packed stream is the rows' ChunkStreams one after another. token_rows / entry_rows:
    int64 flat indices into the call's token rows (row * chunk + t) and entry rows (row * S +
    j, j in causal order); token_slots / entry_slots: their rows in the packed stream; pieces:
    (document index, first row, end row) of every document piece in the stream; restart: bool
    [rows, tiles], the first tile of each region (None when no piece has one: the layer is
    then dense).
    """

    token_rows: torch.Tensor
    token_slots: torch.Tensor
    entry_rows: torch.Tensor
    entry_slots: torch.Tensor
    pieces: list[tuple[int, int, int]]
    restart: torch.Tensor | None
    length: int

    @property
    def bounds(self) -> list[int]:
        """Cumulative lengths of the pieces (on one device every document is one piece)."""
        return [0] + [end for _, _, end in self.pieces]


def plan_streams(
    streams: list[ChunkStream], chunk: int, entries_per_row: int, tiles: int, device: torch.device
) -> DocumentPlan:
    """The DocumentPlan of chunk rows holding these streams, in row order."""
    token_rows, token_slots, entry_rows, entry_slots, pieces = [], [], [], [], []
    restart = np.zeros((len(streams), tiles), dtype=bool)
    offset = 0
    for row, stream in enumerate(streams):
        token_rows.append(stream.token_positions + row * chunk)
        token_slots.append(stream.token_slots + offset)
        entry_rows.append(stream.entry_indices + row * entries_per_row)
        entry_slots.append(stream.entry_slots + offset)
        pieces += [(doc, lo + offset, hi + offset) for doc, lo, hi in stream.pieces]
        restart[row, stream.restart_tiles] = True
        offset += stream.length

    def tensor(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts)).to(device)

    return DocumentPlan(
        token_rows=tensor(token_rows),
        token_slots=tensor(token_slots),
        entry_rows=tensor(entry_rows),
        entry_slots=tensor(entry_slots),
        pieces=pieces,
        restart=torch.from_numpy(restart).to(device) if restart.any() else None,
        length=offset,
    )


def plan_documents(
    bounds: list[int], batch: int, n: int, cfg: LighthouseConfig, device: torch.device
) -> DocumentPlan:
    """The single-device DocumentPlan of a checked batch (check_documents' bounds): each
    window one chunk, so each document one piece."""
    regions = document_regions(bounds, batch, n, cfg)
    streams = [chunk_stream(regions, b, 0, n, cfg, n) for b in range(batch)]
    return plan_streams(streams, n, cfg.selected_length(n), cfg.tiles, device)


def token_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
    """q, k, v [R, C, H or Hkv, D] as token entries [R*C, H, D]: a token entry of query head h
    reads kv head h // group, as the pooled entries do."""
    heads, dim = q.shape[2:]
    group = heads // k.shape[2]
    return [q.reshape(-1, heads, dim)] + [
        x.repeat_interleave(group, dim=2).reshape(-1, heads, dim) for x in (k, v)
    ]


def entry_rows(entries: Compressed) -> list[torch.Tensor]:
    """The pooled entries [R, H, S, D] of q, k, v as rows [R*S, H, D]."""
    heads, dim = entries.q.shape[1], entries.q.shape[3]
    return [x.transpose(1, 2).reshape(-1, heads, dim) for x in (entries.q, entries.k, entries.v)]


def packed_rows(
    tokens: torch.Tensor, entries: torch.Tensor | None, plan: DocumentPlan
) -> torch.Tensor:
    """The packed stream [P, H, D] from token rows [R*C, H, D] and entry rows [R*S, H, D]."""
    packed = tokens.new_zeros((plan.length, *tokens.shape[1:]))
    packed = packed.index_copy(0, plan.token_slots, tokens.index_select(0, plan.token_rows))
    if entries is not None:
        packed = packed.index_copy(0, plan.entry_slots, entries.index_select(0, plan.entry_rows))
    return packed


def unpacked(
    out: torch.Tensor,
    plan: DocumentPlan,
    rows: int,
    chunk: int,
    entries: Compressed | None,
    spill: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The packed attention output [P, H, D] back on the R = `rows` chunk rows of `chunk` tokens:
    token entries at their positions plus the region entries delivered (entries of tiles with
    a document boundary deliver zeros) -> ([R, C, H, D], the delivery's spill rows [R, spill,
    H, D] or None without entries)."""
    heads, dim = out.shape[1:]
    tokens = out.new_zeros((rows * chunk, heads, dim))
    tokens = tokens.index_copy(0, plan.token_rows, out.index_select(0, plan.token_slots))
    tokens = tokens.view(rows, chunk, heads, dim)
    if entries is None:
        return tokens, None
    s = entries.q.shape[2]
    placed = out.new_zeros((rows * s, heads, dim))
    placed = placed.index_copy(0, plan.entry_rows, out.index_select(0, plan.entry_slots))
    placed = placed.view(rows, s, heads, dim).transpose(1, 2).contiguous()  # [R, H, S, D]
    delivered, spill_rows = entries.deliver(placed, spill)
    return delivered + tokens, spill_rows


def lighthouse_documents(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LighthouseConfig, bounds: list[int]
) -> torch.Tensor:
    """Lighthouse attention with document masking (s.12) on one device: q [B, N, H, D], k/v
    [B, N, Hkv, D], `bounds` the checked document boundaries (check_documents) -> [B, N, H, D]."""
    batch, n = q.shape[:2]
    plan = plan_documents(bounds, batch, n, cfg, q.device)
    entries = None if plan.restart is None else compress(q, k, v, cfg, restart=plan.restart)
    sources = zip(token_rows(q, k, v), entry_rows(entries) if entries else [None] * 3)
    packed = [packed_rows(t, e, plan)[None] for t, e in sources]  # [1, P, H, D]
    cu = torch.tensor(plan.bounds, dtype=torch.int32, device=q.device)
    out = document_causal(*packed, cu, plan.bounds)[0]  # [P, H, D]: each document one sequence
    return unpacked(out, plan, batch, n, entries)[0]
