"""Pure-PyTorch twin of selection.py: the selection of LIGHTHOUSE.md s.4-5 (tile top-k) and
s.11 (causal), from per-token scores. It is also the path CPU and float64 inputs take.

Vectorised over batch, heads and tiles; the only Python loop is over pyramid levels.
"""

from __future__ import annotations

import torch

from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.entries import Selection, check_finite
from lh_cp.ops.pyramid import reduce_levels


def _top_half_budget(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Slots of the `count` largest scores along the last dim; ties go to the lower slot."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :count]


def _kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value along the last dim (a value: ties do not matter)."""
    return torch.topk(x, k, dim=-1).values[..., -1]


def causal_thresholds(
    q_pyramid: list[torch.Tensor], k_pyramid: list[torch.Tensor], cfg: LighthouseConfig, tile: int
) -> torch.Tensor:
    """What each tile hands to the next under the causal selection (LIGHTHOUSE.md s.11):
    [B, H, tiles, L-1, 2], for levels 2..L (index l-2) and the query (0) and key (1) score, the
    k-th largest first-child score (cfg.threshold_rank) over the tile's eligible level-l spans
    (every span at the top level; below it, the spans that are not a first child). It reads
    the tile's own tokens only and no selection, so tiles need nothing from each other.
    """
    batch, heads = q_pyramid[0].shape[:2]
    per_level = []
    for level in range(2, cfg.levels + 1):
        # [B, H, 2, N / c_l]: the first-child score of each level-l span, query then key, so
        # that one top-k call serves both
        first_child = torch.stack(
            [pyramid[level - 2][..., :: cfg.pool] for pyramid in (q_pyramid, k_pyramid)], dim=2
        )
        spans = first_child.reshape(
            batch, heads, 2, -1, tile // cfg.span(level)
        )  # [B, H, 2, tiles, spans]
        if level < cfg.levels:
            spans = spans.unflatten(-1, (-1, cfg.pool))[..., 1:].flatten(-2)
        per_level.append(
            _kth_largest(spans, cfg.threshold_rank(level, tile)).transpose(2, 3)
        )  # [B, H, tiles, 2]
    return torch.stack(per_level, dim=-2)


def thresholds_in_use(
    provided: torch.Tensor, preceding: torch.Tensor | None, restart: torch.Tensor | None = None
) -> torch.Tensor:
    """Tile i uses what tile i-1 provided; the first tile uses `preceding` ([B, H, L-1, 2], what
    the tile before the sequence piece provided: the previous CP chunk's last tile), or -inf
    where the sequence starts (nothing precedes it: its first candidates are refined).
    `restart` [B, tiles] bool: tiles where a sequence starts afresh (the first whole tile of a
    packed document's region, LIGHTHOUSE.md s.12): they use -inf whatever came before."""
    first = (
        torch.full_like(provided[:, :, 0], float("-inf"))
        if preceding is None
        else preceding.to(provided)
    )
    used = torch.cat([first.unsqueeze(2), provided[:, :, :-1]], dim=2)  # [B, H, tiles, L-1, 2]
    if restart is not None:
        used = used.masked_fill(restart[:, None, :, None, None], float("-inf"))
    return used


def carry_from_scores(
    query_scores: torch.Tensor, key_scores: torch.Tensor, cfg: LighthouseConfig
) -> torch.Tensor:
    """Thresholds one tile's token scores [B, H, T] hand to the tile after it: [B, H, L-1, 2]."""
    tile = query_scores.shape[-1]
    one_tile = [
        reduce_levels(x, cfg.pool, cfg.levels, "max", dim=2) for x in (query_scores, key_scores)
    ]
    return causal_thresholds(*one_tile, cfg, tile)[:, :, 0]


def refine_causal(
    q_score: torch.Tensor,
    k_score: torch.Tensor,
    refinable: torch.Tensor,
    thresholds: torch.Tensor,
    budget: int,
) -> torch.Tensor:
    """Exactly `budget` refined candidates per tile, decided left to right (LIGHTHOUSE.md s.11).

    q_score, k_score [B, H, tiles, W]: first-child scores of the candidates in index order;
    refinable: bool, broadcastable to them; thresholds [B, H, tiles, 2] (query, key). A
    candidate is taken by query score if its score reaches the query threshold while fewer than
    b/2 were taken so, else by key score likewise; once the refinable candidates left are no
    more than the budget left, all of them are refined. Each decision reads only its own and
    earlier candidates, and cumulative sums make it parallel.
    """
    half = budget // 2
    refinable = refinable.expand_as(q_score)
    q_pass = refinable & (q_score >= thresholds[..., :1])
    q_take = q_pass & (q_pass.cumsum(-1) <= half)
    k_pass = refinable & ~q_take & (k_score >= thresholds[..., 1:])
    taken = q_take | (k_pass & (k_pass.cumsum(-1) <= half))
    taken_before = taken.cumsum(-1) - taken.long()
    refinable_from_here = refinable.sum(-1, keepdim=True) - refinable.cumsum(-1) + refinable.long()
    must_fill = refinable & (budget - taken_before >= refinable_from_here)
    forced = must_fill.long().cummax(-1).values.bool() & refinable
    return taken | forced


def select_from_scores(
    query_scores: torch.Tensor,
    key_scores: torch.Tensor,
    cfg: LighthouseConfig,
    v: torch.Tensor | None = None,
    preceding: torch.Tensor | None = None,
    restart: torch.Tensor | None = None,
) -> Selection:
    """Selection from per-token scores [B, H, N] (float32), one set per selection head;
    `v` (the values, when given) is checked for finiteness with the scores (check_finite).
    `preceding` [B, H, L-1, 2]: for cfg.selection "causal", the thresholds of the tile before
    this sequence piece (carry_from_scores of the previous CP chunk); None where it starts.
    `restart` [B, tiles] bool: tiles whose causal thresholds start afresh (thresholds_in_use)."""
    batch, heads, n = query_scores.shape
    tile = cfg.tile_size(n)
    check_finite(query_scores, key_scores, v)
    pool, levels, budget, tiles = cfg.pool, cfg.levels, cfg.tile_budget, cfg.tiles
    device = query_scores.device
    q_pyramid = reduce_levels(query_scores, pool, levels, "max", dim=2)  # level l: [B, H, N / c_l]
    k_pyramid = reduce_levels(key_scores, pool, levels, "max", dim=2)
    causal = cfg.uses_thresholds
    if causal:
        thresholds = thresholds_in_use(
            causal_thresholds(q_pyramid, k_pyramid, cfg, tile), preceding, restart
        )

    # Candidates of the coarsest level: every entry of each tile, in index order.
    per_tile = tile // cfg.coarsest_span
    candidates = torch.arange(tiles * per_tile, device=device).view(1, 1, tiles, per_tile)
    candidates = candidates.expand(batch, heads, tiles, per_tile)

    emitted_level, emitted_index, emitted_internal = [], [], []
    children = torch.arange(pool, device=device)
    for level in range(levels, 1, -1):
        width = candidates.shape[-1]
        flat = candidates.reshape(batch, heads, tiles * width)
        if causal:
            # A span is scored by its first child, which holds every token before the first
            # position its refinement changes; a first child is never refined (s.11).
            first_child = flat * pool
            q_score = q_pyramid[level - 2].gather(2, first_child).view(batch, heads, tiles, width)
            k_score = k_pyramid[level - 2].gather(2, first_child).view(batch, heads, tiles, width)
            refinable = (
                candidates % pool != 0
                if level < levels
                else torch.ones((), dtype=torch.bool, device=device)
            )
            refined = refine_causal(
                q_score, k_score, refinable, thresholds[:, :, :, level - 2], budget
            )
        else:
            q_score = q_pyramid[level - 1].gather(2, flat).view(batch, heads, tiles, width)
            k_score = k_pyramid[level - 1].gather(2, flat).view(batch, heads, tiles, width)
            refined = torch.zeros_like(candidates, dtype=torch.bool)
            refined.scatter_(-1, _top_half_budget(q_score, budget // 2), True)
            # Norms are >= 0, so -inf removes the query-chosen entries from the key round.
            k_score = k_score.masked_fill(refined, float("-inf"))
            refined.scatter_(-1, _top_half_budget(k_score, budget // 2), True)
        emitted_level.append(torch.full_like(candidates, level))
        emitted_index.append(candidates)
        emitted_internal.append(refined)
        # Boolean indexing keeps row-major order, so refined entries stay in index order and
        # so do their children: the next round's ties again go to the lower index.
        kept = candidates[refined].view(batch, heads, tiles, budget)
        candidates = (kept.unsqueeze(-1) * pool + children).reshape(
            batch, heads, tiles, budget * pool
        )
    emitted_level.append(torch.ones_like(candidates))
    emitted_index.append(candidates)
    emitted_internal.append(torch.zeros_like(candidates, dtype=torch.bool))

    level_t = torch.cat(emitted_level, dim=-1)  # [B, H, tiles, E]
    span = pool ** (level_t - 1)
    start = torch.cat(emitted_index, dim=-1) * span
    internal = torch.cat(emitted_internal, dim=-1)
    unsorted = Selection(start, start + span, level_t, internal, levels)
    # Keys are unique within a head and tiles are contiguous: sorting inside each tile and
    # concatenating tiles gives the global causal order.
    order = torch.argsort(unsorted.key, dim=-1)
    fields = [
        t.gather(-1, order).reshape(batch, heads, -1)
        for t in (start, unsorted.end, level_t, internal)
    ]
    return Selection(*fields, levels=levels)
