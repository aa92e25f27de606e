"""Selection (LIGHTHOUSE.md s.4-s.5): worked example, counts, partition, order, ties, NaN."""

import itertools

import pytest
import torch
from naive_lighthouse import naive_select_head

from lh_cp import LighthouseConfig, select
from lh_cp.ops.scatter import scatter_entries


def worked_example_inputs():
    """One head, N = T = 16; token 12 has the largest query norm, token 6 the largest key norm."""
    q = torch.ones(1, 16, 1, 4, dtype=torch.float64)
    k = torch.ones(1, 16, 1, 4, dtype=torch.float64)
    q[0, 12] *= 10.0
    k[0, 6] *= 5.0
    return q, k


WORKED_EXAMPLE = [
    # (start, end, internal, level, key, delivers to)
    (0, 4, False, 3, 0, [3, 4, 5, 6]),
    (4, 6, False, 2, 12, [5, 6]),
    (6, 7, False, 1, 18, [6]),
    (7, 8, False, 1, 21, [7]),
    (6, 8, True, 2, 22, [7, 8]),
    (4, 8, True, 3, 23, [7, 8, 9, 10]),
    (8, 12, False, 3, 24, [11, 12, 13, 14]),
    (12, 13, False, 1, 36, [12]),
    (13, 14, False, 1, 39, [13]),
    (12, 14, True, 2, 40, [13, 14]),
    (14, 16, False, 2, 42, [15]),
    (12, 16, True, 3, 47, [15]),
]


def test_worked_example_entry_for_entry():
    cfg = LighthouseConfig(pool=2, levels=3, topk=2, tile_budget=2)
    q, k = worked_example_inputs()
    sel = select(q, k, cfg)
    assert cfg.tile_size(16) == 16
    assert sel.start.shape == (1, 1, 12) and sel.start.dtype == torch.int64
    got = list(
        zip(
            sel.start[0, 0].tolist(),
            sel.end[0, 0].tolist(),
            sel.internal[0, 0].tolist(),
            sel.level[0, 0].tolist(),
            sel.key[0, 0].tolist(),
        )
    )
    assert got == [row[:5] for row in WORKED_EXAMPLE]

    # Deliveries: give entry j the one-hot output e_j; position t then holds which entries reach it.
    one_hot = torch.eye(12, dtype=torch.float64).view(1, 1, 12, 12)
    received = scatter_entries(one_hot, sel, 16, cfg)[0, :, 0]  # [N, 12]
    for j, row in enumerate(WORKED_EXAMPLE):
        assert torch.nonzero(received[:, j]).flatten().tolist() == row[5]
    assert received[:3].abs().sum() == 0  # positions 0, 1, 2 receive nothing


CONFIGS = [
    # (pool, levels, topk, tile_budget, N)
    (2, 1, 4, 2, 32),
    (2, 2, 4, 2, 32),
    (2, 3, 4, 2, 64),
    (2, 4, 2, 2, 64),
    (4, 2, 8, 4, 128),
    (4, 3, 4, 4, 256),
    (8, 2, 16, 8, 512),
    (2, 5, 4, 2, 128),
]


@pytest.mark.parametrize("pool, levels, topk, budget, n", CONFIGS)
def test_selection_matches_naive_twin(pool, levels, topk, budget, n):
    """The vectorised selection equals the loop-by-loop twin written from the spec."""
    cfg = LighthouseConfig(pool=pool, levels=levels, topk=topk, tile_budget=budget)
    gen = torch.Generator().manual_seed(pool * 100 + levels * 10 + n)
    q = torch.randn(2, n, 3, 5, generator=gen)
    k = torch.randn(2, n, 3, 5, generator=gen)
    sel = select(q, k, cfg)
    for b, h in itertools.product(range(2), range(3)):
        qn = torch.linalg.vector_norm(q[b, :, h], dim=-1).tolist()
        kn = torch.linalg.vector_norm(k[b, :, h], dim=-1).tolist()
        expected = naive_select_head(qn, kn, pool, levels, topk, budget)
        got = list(
            zip(
                sel.key[b, h].tolist(),
                sel.start[b, h].tolist(),
                sel.end[b, h].tolist(),
                sel.level[b, h].tolist(),
                sel.internal[b, h].tolist(),
            )
        )
        assert got == expected


def valid_grid():
    for pool, levels, budget, tiles in itertools.product(
        (2, 4, 8), (1, 2, 3, 4), (2, 4, 6), (1, 2, 3)
    ):
        topk = budget * tiles
        tile = max(budget, 1) * pool ** (levels - 1)
        for extra in (1, 2):
            n = tile * extra * tiles
            cfg = LighthouseConfig(pool=pool, levels=levels, topk=topk, tile_budget=budget)
            if n <= 4096:
                yield cfg, n


def test_selected_length_formula_over_a_grid():
    """S = N / c_L + (L-1) * pool * topk (s.4 / property 3) for every valid configuration."""
    checked = 0
    for cfg, n in valid_grid():
        q = torch.randn(1, n, 1, 4)
        k = torch.randn(1, n, 1, 4)
        sel = select(q, k, cfg)
        expected = n // cfg.pool ** (cfg.levels - 1) + (cfg.levels - 1) * cfg.pool * cfg.topk
        assert sel.start.shape[-1] == expected == cfg.selected_length(n)
        checked += 1
    assert checked > 100


@pytest.mark.parametrize("pool, levels, topk, budget, n", CONFIGS)
def test_leaves_partition_each_tile_entries_unique_keys_sorted(pool, levels, topk, budget, n):
    cfg = LighthouseConfig(pool=pool, levels=levels, topk=topk, tile_budget=budget)
    q, k = torch.randn(2, n, 2, 4), torch.randn(2, n, 2, 4)
    sel = select(q, k, cfg)
    tile = cfg.tile_size(n)
    for b, h in itertools.product(range(2), range(2)):
        keys = sel.key[b, h]
        assert torch.all(keys[1:] > keys[:-1])  # sorted, hence unique
        spans = set(zip(sel.start[b, h].tolist(), sel.end[b, h].tolist()))
        assert len(spans) == keys.numel()  # every entry emitted once
        leaf = ~sel.internal[b, h]
        cover = torch.zeros(n, dtype=torch.int64)
        for s, e in zip(sel.start[b, h][leaf].tolist(), sel.end[b, h][leaf].tolist()):
            assert s // tile == (e - 1) // tile  # a leaf never straddles tiles
            cover[s:e] += 1
        assert torch.all(cover == 1)  # leaves partition every tile
        # each tile emits T / c_L + (L-1) * p * b entries
        per_tile = torch.bincount(sel.start[b, h] // tile, minlength=n // tile)
        assert torch.all(per_tile == cfg.entries_per_tile(n))


def test_ties_go_to_the_lower_index():
    """All norms equal: the first b/2 coarse entries win on query, the next b/2 on key."""
    cfg = LighthouseConfig(pool=2, levels=2, topk=4, tile_budget=4)
    q = torch.ones(1, 16, 1, 2)
    sel = select(q, q, cfg)
    internal = sel.start[0, 0][sel.internal[0, 0]].tolist()
    assert internal == [0, 2, 4, 6]


@pytest.mark.parametrize("selection", ["tile_topk", "causal"])
def test_identical_inputs_give_identical_selections(selection):
    cfg = LighthouseConfig(pool=4, levels=3, topk=16, tile_budget=8, selection=selection)
    q, k = torch.randn(2, 1024, 4, 8), torch.randn(2, 1024, 2, 8)
    first, second = select(q, k, cfg), select(q.clone(), k.clone(), cfg)
    for name in ("start", "end", "level", "internal"):
        assert torch.equal(getattr(first, name), getattr(second, name))


def test_nan_scores_raise():
    cfg = LighthouseConfig(pool=2, levels=2, topk=2, tile_budget=2)
    q = torch.randn(1, 16, 1, 4)
    q[0, 5, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        select(q, torch.randn(1, 16, 1, 4), cfg)


def test_scores_are_float32_for_low_precision_inputs():
    """bf16 inputs select exactly as their float32 upcast does (norms computed in float32)."""
    cfg = LighthouseConfig(pool=4, levels=3, topk=16, tile_budget=8)
    q = torch.randn(1, 1024, 2, 16).bfloat16()
    k = torch.randn(1, 1024, 2, 16).bfloat16()
    low, high = select(q, k, cfg), select(q.float(), k.float(), cfg)
    assert torch.equal(low.start, high.start) and torch.equal(low.level, high.level)


def test_gqa_selection_uses_the_shared_key_head():
    cfg = LighthouseConfig(pool=2, levels=3, topk=4, tile_budget=2)
    q, k = torch.randn(1, 64, 4, 8), torch.randn(1, 64, 2, 8)
    grouped = select(q, k, cfg)
    expanded = select(q, k.repeat_interleave(2, dim=2), cfg)
    assert torch.equal(grouped.start, expanded.start) and torch.equal(
        grouped.internal, expanded.internal
    )
