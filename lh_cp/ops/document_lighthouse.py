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

import torch

from lh_cp.ops.compress import Compressed, compress
from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.dense import document_causal
from lh_cp.ops.rope import RopeTables, rotate_tokens


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

    token_segments / entry_segments: (first source row, first stream row, length) runs, the
    source rows chunk-local token positions or entry indices (tile i of the chunk holds entries
    [i E, (i+1) E) in causal order); pieces: (document index, first row, end row) per
    document; restart_tiles: chunk-local tiles where a region starts. At most three runs per
    document, so the plan stays small whatever the sequence length."""

    token_segments: list[tuple[int, int, int]]
    entry_segments: list[tuple[int, int, int]]
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
    tokens, entries, pieces, restart = [], [], [], []
    length = 0
    for index, doc in enumerate(regions):
        if doc.window != window or doc.end <= first or doc.start >= end:
            continue
        lo = length
        head = (max(doc.start, first), min(doc.region_start, end))
        region = (max(doc.region_start, first), min(doc.region_end, end))
        tail = (max(doc.region_end if doc.has_region else doc.start, first), min(doc.end, end))
        for (a, z), runs, source in (
            (head, tokens, head[0] - first),
            (region, entries, (region[0] - first) // tile * per_tile),
            (tail, tokens, tail[0] - first),
        ):
            count = max(0, z - a) if runs is tokens else max(0, z - a) // tile * per_tile
            if count:
                runs.append((source, length, count))
                length += count
        pieces.append((index, lo, length))
        if doc.has_region and first <= doc.region_start < end:
            restart.append((doc.region_start - first) // tile)
    return ChunkStream(tokens, entries, pieces, restart, length)


def expand_runs(segments: list[tuple[int, int, int]], device: torch.device):
    """(source rows, stream rows), int64 on `device`, of every row of the (source, stream,
    length) runs: one small host-to-device copy and a few kernels, never a host sync."""
    if not segments:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty
    runs = torch.tensor(segments, dtype=torch.int64)  # [R, 3]
    lengths = runs[:, 2]
    before = torch.cumsum(lengths, 0) - lengths  # rows of the earlier runs
    total = int(lengths.sum())
    shifts = torch.stack([runs[:, 0] - before, runs[:, 1] - before, lengths]).to(device)
    within = torch.arange(total, device=device)
    rows = within + torch.repeat_interleave(shifts[0], shifts[2], output_size=total)
    slots = within + torch.repeat_interleave(shifts[1], shifts[2], output_size=total)
    return rows, slots


@dataclass(frozen=True)
class DocumentPlan:
    """Where every row of the packed causal attention comes from, for the chunk rows of one
    call (the B windows on one device; a rank's 2B head-tail chunks under CP).

    The packed stream is the rows' ChunkStreams one after another. token_rows / entry_rows:
    int64 flat indices into the call's token rows (row * chunk + t) and entry rows (row * S +
    j, j in causal order); token_slots / entry_slots: their rows in the packed stream; pieces:
    (document index, first row, end row) of every document piece in the stream; sources: for
    every stream row its row in the token rows followed by the entry rows; restart: bool
    [rows, tiles], the first tile of each region (None when no piece has one: the layer is
    then dense).
    """

    token_rows: torch.Tensor
    token_slots: torch.Tensor
    entry_rows: torch.Tensor
    entry_slots: torch.Tensor
    sources: torch.Tensor
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
    token_runs, entry_runs, pieces = [], [], []
    restart = torch.zeros((len(streams), tiles), dtype=torch.bool)
    offset = 0
    for row, stream in enumerate(streams):
        token_runs += [(a + row * chunk, b + offset, c) for a, b, c in stream.token_segments]
        entry_runs += [
            (a + row * entries_per_row, b + offset, c) for a, b, c in stream.entry_segments
        ]
        pieces += [(doc, lo + offset, hi + offset) for doc, lo, hi in stream.pieces]
        restart[row, stream.restart_tiles] = True
        offset += stream.length
    token_rows, token_slots = expand_runs(token_runs, device)
    entry_rows, entry_slots = expand_runs(entry_runs, device)
    sources = torch.empty(offset, dtype=torch.int64, device=device)
    sources[token_slots] = token_rows
    sources[entry_slots] = entry_rows + len(streams) * chunk
    return DocumentPlan(
        token_rows=token_rows,
        token_slots=token_slots,
        entry_rows=entry_rows,
        entry_slots=entry_slots,
        sources=sources,
        pieces=pieces,
        restart=restart.to(device) if bool(restart.any()) else None,
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
    expanded = (k, v) if group == 1 else (x.repeat_interleave(group, dim=2) for x in (k, v))
    return [x.reshape(-1, heads, dim) for x in (q, *expanded)]


def entry_rows(entries: Compressed) -> list[torch.Tensor]:
    """The pooled entries [R, H, S, D] of q, k, v as rows [R*S, H, D]."""
    heads, dim = entries.q.shape[1], entries.q.shape[3]
    return [x.transpose(1, 2).reshape(-1, heads, dim) for x in (entries.q, entries.k, entries.v)]


def packed_rows(
    tokens: torch.Tensor, entries: torch.Tensor | None, plan: DocumentPlan
) -> torch.Tensor:
    """The packed stream [P, H, D] from token rows [R*C, H, D] and entry rows [R*S, H, D]: one
    gather (its backward one scatter-add) from the two sources side by side."""
    rows = tokens if entries is None else torch.cat([tokens, entries])
    return rows.index_select(0, plan.sources)


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
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    documents: torch.Tensor,
    bounds: list[int],
    rope: RopeTables | None = None,
) -> torch.Tensor:
    """Lighthouse attention with document masking (s.12) on one device: q [B, N, H, D], k/v
    [B, N, Hkv, D], `documents` and its checked boundaries `bounds` (check_documents) ->
    [B, N, H, D]. `rope`: the checked tables (check_rope) when cfg.rope = "entries": the
    entries are rotated at their last token, the head and tail tokens at their own (s.14)."""
    batch, n = q.shape[:2]
    plan = plan_documents(bounds, batch, n, cfg, q.device)
    if plan.restart is None:  # no document holds a whole tile: every entry is a token
        return document_causal(*rotate_tokens(q, k, rope), v, documents, bounds)
    entries = compress(q, k, v, cfg, restart=plan.restart, document_bounds=bounds, rope=rope)
    sources = zip(token_rows(*rotate_tokens(q, k, rope), v), entry_rows(entries))
    packed = [packed_rows(t, e, plan)[None] for t, e in sources]  # [1, P, H, D]
    cu = torch.tensor(plan.bounds, dtype=torch.int32, device=q.device)
    out = document_causal(*packed, cu, plan.bounds)[0]  # [P, H, D]: each document one sequence
    return unpacked(out, plan, batch, n, entries)[0]
