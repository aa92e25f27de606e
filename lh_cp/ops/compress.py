"""compress(q, k, v, cfg) -> Compressed: one Lighthouse layer's selection, pooled entries and
their delivery back to token rows; the one place that chooses the Triton kernels or the
pure-PyTorch reference.

Every Lighthouse path is compress -> causal attention over the entries -> deliver:
- one device (lh_cp/ops/attention.py): entries_sdpa over the entries, deliver onto the N rows;
- a context-parallel head-tail shard (lh_cp/parallel/headtail/attention.py): the two chunks
  as a batch of 2B sequences, the entries exchanged across ranks, delivered onto the C rows
  of each chunk and the c_L - 1 spill rows past it (which travel as a halo to the next chunk);
- compressed Ulysses (lh_cp/parallel/ulysses/compressed.py): one contiguous shard, the
  entries all-to-all'd to head groups and back, delivered with its spill likewise.

The two twins give the same selection and, up to float32 summation order, the same values:
- reference (CPU, float64, or kernels.disabled()): lh_cp.ops.select, gather_entries,
  scatter_entries;
- kernels (CUDA, kernel dtypes, Triton installed: lh_cp.ops.kernels.available): Triton norms and
  selection write the index plan directly, the row kernels gather and scatter.
Both refuse non-finite q, k or v (lh_cp.ops.select.check_finite) with the one host sync the
selection makes; with a selection given nothing is checked (attend_selected).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lh_cp.ops import kernels
from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.entries import Selection
from lh_cp.ops.kernels.selection_reference import carry_from_scores
from lh_cp.ops.pyramid import gather_entries
from lh_cp.ops.rope import RopeTables, check_rope, rotate_entries
from lh_cp.ops.scatter import scatter_entries
from lh_cp.ops.select import select, selection_scores


@dataclass(frozen=True)
class Compressed:
    """Pooled entries of q, k and v, [B, H, S, D] each (k and v per query head, as the
    selection is), sorted by the causal key, and deliver(out_entries [B, H, S, D], spill=0)
    -> (rows [B, N, H, D], spill rows [B, spill, H, D]), differentiable: the spill rows are
    what the last spans deliver past the end of the sequence, 0 <= spill < c_L (check_spill;
    spill = 0 clips them as the single-device layer does)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    deliver: Callable[
        ..., tuple[torch.Tensor, torch.Tensor]
    ]  # (out_entries, spill=0) -> (rows, spill rows)


def check_spill(spill: int, cfg: LighthouseConfig) -> None:
    """The last span of the coarsest level delivers at most c_L - 1 rows past the sequence end."""
    if not 0 <= spill < cfg.coarsest_span:
        raise ValueError(
            f"spill={spill}: the rows past the sequence end that receive deliveries are "
            f"0 .. c_L - 1 = {cfg.coarsest_span - 1} (c_L = pool**(levels-1))"
        )


def compress_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    selection: Selection | None = None,
    preceding: torch.Tensor | None = None,
    heads_outer: bool = False,
    restart: torch.Tensor | None = None,
    document_bounds: list[int] | None = None,
    rope: RopeTables | None = None,
) -> Compressed:
    """Pure-PyTorch twin: q [B, N, H, D], k/v [B, N, Hkv, D]; `selection` given or computed
    (`preceding`, `heads_outer`, `document_bounds`: see compress; the entries here are
    contiguous whatever the layout asked, which changes no value)."""
    n = q.shape[1]
    rope = check_rope(rope, cfg, q)
    sel = (
        select(q.detach(), k.detach(), cfg, v.detach(), preceding, restart, document_bounds)
        if selection is None
        else selection
    )  # [B, H, S]
    slots = sel.slots(n, cfg)  # [B, H, S] rows of the pooled pyramid
    entries = [
        gather_entries(x, slots, cfg) for x in (q, k, v)
    ]  # [B, H, S, D]; k, v via kv head h // group
    if rope is not None:
        entries[:2] = [rotate_entries(x, sel.end - 1, rope) for x in entries[:2]]

    def deliver(out: torch.Tensor, spill: int = 0):
        check_spill(spill, cfg)
        if spill == 0:
            rows = scatter_entries(out, sel, n, cfg)
            return rows, rows[:, n:]
        rows = scatter_entries(out, sel, n + cfg.coarsest_span, cfg)
        # Tensors of their own, as the kernel twin returns: the CP paths add halos in place.
        return rows[:, :n].clone(), rows[:, n : n + spill].clone()

    return Compressed(*entries, deliver)


def compress_kernels(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    selection: Selection | None = None,
    preceding: torch.Tensor | None = None,
    heads_outer: bool = False,
    restart: torch.Tensor | None = None,
    document_bounds: list[int] | None = None,
    rope: RopeTables | None = None,
) -> Compressed:
    """Triton twin (lh_cp.ops.kernels.ops): same arguments, same selection."""
    from lh_cp.ops.kernels.ops import gather_plan, scatter_plan, select_with_plan
    from lh_cp.ops.kernels.slot_plan import Plan

    rope = check_rope(rope, cfg, q)
    if selection is None:
        plan, start, level, _ = select_with_plan(q, k, cfg, v, preceding, restart, document_bounds)
    else:
        plan = Plan.from_selection(selection, q.shape[1], cfg)
    q_entries, k_entries, v_entries = gather_plan(
        q, k, v, plan, cfg, heads_outer
    )  # [B, H, S, D] each
    if rope is not None:
        # The last token of each entry, [B, H, S]: from the kernel selection's start and level.
        if selection is None:
            last = start.long() + cfg.pool ** (level.long() - 1) - 1
        else:
            last = selection.end - 1
        # A pass of its own over the S gathered entries, not fused into the gather kernel.
        q_entries, k_entries = (rotate_entries(x, last, rope) for x in (q_entries, k_entries))

    def deliver(out: torch.Tensor, spill: int = 0):
        check_spill(spill, cfg)
        return scatter_plan(out, plan, cfg, spill)

    return Compressed(q_entries, k_entries, v_entries, deliver)


def compress(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    selection: Selection | None = None,
    preceding: torch.Tensor | None = None,
    heads_outer: bool = False,
    restart: torch.Tensor | None = None,
    document_bounds: list[int] | None = None,
    rope: RopeTables | None = None,
) -> Compressed:
    """The kernel twin where the kernels run (CUDA, kernel dtypes, Triton), else the reference.

    `preceding` [B, H, L-1, 2] (cfg.selection "causal" only): the selection_carry of the piece
    of sequence just before this one (the previous CP chunk or shard); None where it starts.
    `heads_outer`: the kernels store the entries heads-outermost (lh_cp.ops.kernels.rows.empty_entries),
    so that a CP shard's chunk rows reach the exchange layout without a copy.
    `restart` [B, tiles] bool (causal selection only): tiles whose thresholds start afresh, the
    first whole tile of each packed document's region (LIGHTHOUSE.md s.12).
    `document_bounds` (check_documents' list): the packed documents of the batch, which the
    "dilated" and "gla" scorers keep apart (s.13); "norm" reads each token alone.
    `rope` (cfg.rope "entries" only, required then): the (cos, sin) tables of q's tokens,
    [N, D/2] or [B, N, D/2] (lh_cp.ops.rope.check_rope); q and k are then unrotated and each
    q and k entry is rotated at table row end - 1 (LIGHTHOUSE.md s.14)."""
    args = (q, k, v, cfg, selection, preceding, heads_outer, restart, document_bounds, rope)
    if kernels.available(q, k, v):
        return compress_kernels(*args)
    return compress_reference(*args)


def selection_carry(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LighthouseConfig
) -> torch.Tensor:
    """What the last tile of this piece (q [B, N, H, D], k [B, N, Hkv, D]) hands to the piece
    after it under the causal selection (LIGHTHOUSE.md s.11): [B, H, L-1, 2] float32, from the
    same token scores compress's selection reads, so that a CP chunk gets exactly the
    thresholds the single device computes there. Cheap: the norms of one tile. The "dilated"
    and "gla" scorers read the whole prefix, which a CP piece does not hold: refused."""
    if cfg.scorer != "norm":
        raise ValueError(
            f"scorer={cfg.scorer!r} scores a token from every earlier token of its sub-sequence: "
            f"a piece of the sequence cannot hand its selection on (only scorer='norm' can)"
        )
    tile = cfg.tile_size(q.shape[1])
    q_last, k_last = q.detach()[:, -tile:], k.detach()[:, -tile:]
    if kernels.available(q, k, v):
        from lh_cp.ops.kernels.scores import token_norms

        query_scores, key_scores = token_norms(q_last), token_norms(k_last)
        key_scores = key_scores.repeat_interleave(q.shape[2] // k.shape[2], dim=1)
    else:
        query_scores, key_scores = selection_scores(q_last, k_last)
    return carry_from_scores(query_scores, key_scores, cfg)


def entries_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention over entries [B, H, S, D] (equal head counts), scale 1/sqrt(D): the
    fastest fused backend where the kernels run (lh_cp/ops/kernels/sdpa.py), PyTorch's default
    dispatch elsewhere."""
    if kernels.available(q, k, v):
        from lh_cp.ops.kernels.sdpa import sdpa_causal_fast

        return sdpa_causal_fast(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)
