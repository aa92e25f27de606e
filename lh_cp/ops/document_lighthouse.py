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
  to each other only: one sequence of a varlen causal attention over all documents;
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
import torch.nn.functional as F

from lh_cp.ops.compress import compress
from lh_cp.ops.config import LighthouseConfig


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
class DocumentPlan:
    """Where every row of the packed causal attention comes from, for one batch.

    The packed stream holds the documents one after another, each in causal-key order: head
    tokens, region entries, tail tokens. token_rows / entry_rows: int64 flat indices into the
    batch's token rows (b * N + t) and entry rows (b * S + j, j in causal order); token_slots /
    entry_slots: their rows in the packed stream; bounds: int32 cumulative lengths of the
    packed documents; restart: bool [B, tiles], the first tile of each region (None when no
    document has a region, and the layer is dense).
    """

    token_rows: torch.Tensor
    token_slots: torch.Tensor
    entry_rows: torch.Tensor
    entry_slots: torch.Tensor
    bounds: torch.Tensor
    restart: torch.Tensor | None
    length: int
    longest: int


def plan_documents(
    bounds: list[int], batch: int, n: int, cfg: LighthouseConfig, device: torch.device
) -> DocumentPlan:
    """DocumentPlan of a checked batch (check_documents' bounds), built on the host with numpy."""
    tile = cfg.tile_size(n)
    per_tile = cfg.entries_per_tile(n)
    s = cfg.selected_length(n)
    regions = document_regions(bounds, batch, n, cfg)
    token_rows, token_slots, entry_rows, entry_slots, packed = [], [], [], [], [0]
    restart = np.zeros((batch, cfg.tiles), dtype=bool)
    for doc in regions:
        slot = packed[-1]
        base = doc.window * n
        head = np.arange(doc.start, doc.region_start) + base
        tail = np.arange(doc.region_end if doc.has_region else doc.start, doc.end) + base
        entries = np.arange(doc.region_start // tile * per_tile, doc.region_end // tile * per_tile)
        token_rows += [head, tail]
        token_slots += [
            slot + np.arange(len(head)),
            slot + len(head) + len(entries) + np.arange(len(tail)),
        ]
        entry_rows.append(entries + doc.window * s)
        entry_slots.append(slot + len(head) + np.arange(len(entries)))
        packed.append(slot + len(head) + len(entries) + len(tail))
        if doc.has_region:
            restart[doc.window, doc.region_start // tile] = True
    lengths = np.diff(packed)

    def tensor(parts: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(parts).astype(np.int64)).to(device)

    return DocumentPlan(
        token_rows=tensor(token_rows),
        token_slots=tensor(token_slots),
        entry_rows=tensor(entry_rows),
        entry_slots=tensor(entry_slots),
        bounds=torch.tensor(packed, dtype=torch.int32, device=device),
        restart=torch.from_numpy(restart).to(device) if restart.any() else None,
        length=int(packed[-1]),
        longest=int(lengths.max()),
    )


def packed_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, longest: int
) -> torch.Tensor:
    """Causal attention inside each packed sequence: q, k, v [P, H, D] -> [P, H, D]; `bounds`
    int32 cumulative lengths. CUDA: torch's varlen kernel; elsewhere one SDPA per sequence
    (exact: no row ever meets another sequence's values)."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, bounds, bounds, longest, longest, window_size=(-1, 0))
    outs = []
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        part = [x[lo:hi].transpose(0, 1).unsqueeze(0) for x in (q, k, v)]  # [1, H, len, D]
        outs.append(F.scaled_dot_product_attention(*part, is_causal=True)[0].transpose(0, 1))
    return torch.cat(outs)


def _packed_rows(
    tokens: torch.Tensor, entries: torch.Tensor | None, plan: DocumentPlan
) -> torch.Tensor:
    """The packed stream [P, H, D] from token rows [B*N, H, D] and entry rows [B*S, H, D]."""
    packed = tokens.new_zeros((plan.length, *tokens.shape[1:]))
    packed = packed.index_copy(0, plan.token_slots, tokens.index_select(0, plan.token_rows))
    if entries is not None:
        packed = packed.index_copy(0, plan.entry_slots, entries.index_select(0, plan.entry_rows))
    return packed


def lighthouse_documents(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LighthouseConfig, bounds: list[int]
) -> torch.Tensor:
    """Lighthouse attention with document masking (s.12) on one device: q [B, N, H, D], k/v
    [B, N, Hkv, D], `bounds` the checked document boundaries (check_documents) -> [B, N, H, D]."""
    batch, n, heads, dim = q.shape
    plan = plan_documents(bounds, batch, n, cfg, q.device)
    group = heads // k.shape[2]
    # [B*N, H, D]: a token entry of query head h reads kv head h // group, as entries do
    token_rows = [q.reshape(batch * n, heads, dim)] + [
        x.repeat_interleave(group, dim=2).reshape(batch * n, heads, dim) for x in (k, v)
    ]
    entry_rows = [None, None, None]
    if plan.restart is not None:
        entries = compress(q, k, v, cfg, restart=plan.restart)
        s = entries.q.shape[2]
        entry_rows = [
            x.transpose(1, 2).reshape(batch * s, heads, dim)
            for x in (entries.q, entries.k, entries.v)
        ]  # [B*S, H, D]
    packed = [_packed_rows(t, e, plan) for t, e in zip(token_rows, entry_rows)]
    out = packed_causal(*packed, plan.bounds, plan.longest)  # [P, H, D]
    rows = out.new_zeros((batch * n, heads, dim))
    rows = rows.index_copy(0, plan.token_rows, out.index_select(0, plan.token_slots))
    rows = rows.view(batch, n, heads, dim)
    if plan.restart is None:
        return rows
    out_entries = out.new_zeros((batch * s, heads, dim))
    out_entries = out_entries.index_copy(0, plan.entry_rows, out.index_select(0, plan.entry_slots))
    out_entries = (
        out_entries.view(batch, s, heads, dim).transpose(1, 2).contiguous()
    )  # [B, H, S, D]
    delivered, _ = entries.deliver(out_entries)
    return delivered + rows
