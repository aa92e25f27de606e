"""The strictly causal selection (docs/LIGHTHOUSE.md s.11): worked example, the loop-by-loop
twin, strict causality with the selection recomputed (the paper's selection shown to fail it),
S and the partition, the carry between pieces, gradients and bad values (determinism: tests/test_select.py)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from naive_lighthouse import naive_select_head, naive_tile_thresholds
from test_select import CONFIGS, valid_grid

from lh_cp import LighthouseConfig, lighthouse_attention, select
from lh_cp.ops.attention import attend_selected
from lh_cp.ops.compress import selection_carry
from lh_cp.train.recipe import recipe_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")


def causal(**fields) -> LighthouseConfig:
    return LighthouseConfig(**fields, selection="causal")


def worked_example_inputs():
    """docs/LIGHTHOUSE.md s.11: all norms 1 except q 3 at token 9, q 10 at 19, k 2 at 5, k 2.5 at 25."""
    q = torch.full((1, 32, 1, 4), 0.5, dtype=torch.float64)  # norm 1
    k = q.clone()
    q[0, 9] *= 3.0
    q[0, 19] *= 10.0
    k[0, 5] *= 2.0
    k[0, 25] *= 2.5
    return q, k


WORKED_EXAMPLE = [
    # (start, end, internal, level, key)
    (0, 2, False, 2, 0),
    (2, 3, False, 1, 6),
    (3, 4, False, 1, 9),
    (2, 4, True, 2, 10),
    (0, 4, True, 3, 11),
    (4, 6, False, 2, 12),
    (6, 7, False, 1, 18),
    (7, 8, False, 1, 21),
    (6, 8, True, 2, 22),
    (4, 8, True, 3, 23),
    (8, 12, False, 3, 24),
    (12, 16, False, 3, 36),
    (16, 20, False, 3, 48),
    (20, 24, False, 3, 60),
    (24, 26, False, 2, 72),
    (26, 27, False, 1, 78),
    (27, 28, False, 1, 81),
    (26, 28, True, 2, 82),
    (24, 28, True, 3, 83),
    (28, 30, False, 2, 84),
    (30, 31, False, 1, 90),
    (31, 32, False, 1, 93),
    (30, 32, True, 2, 94),
    (28, 32, True, 3, 95),
]


def _rows(sel, b=0, h=0):
    return list(
        zip(
            sel.start[b, h].tolist(),
            sel.end[b, h].tolist(),
            sel.internal[b, h].tolist(),
            sel.level[b, h].tolist(),
            sel.key[b, h].tolist(),
        )
    )


def test_worked_example_entry_for_entry():
    cfg = causal(pool=2, levels=3, topk=4, tile_budget=2)
    q, k = worked_example_inputs()
    assert cfg.tile_size(32) == 16 and cfg.selected_length(32) == 24
    assert _rows(select(q, k, cfg)) == WORKED_EXAMPLE
    # The paper's selection refines [16, 20) for token 19's query norm; the causal one does not.
    paper = select(q, k, LighthouseConfig(pool=2, levels=3, topk=4, tile_budget=2))
    refined = set(
        zip(
            paper.start[0, 0][paper.internal[0, 0]].tolist(),
            paper.end[0, 0][paper.internal[0, 0]].tolist(),
        )
    )
    assert (16, 20) in refined


@pytest.mark.parametrize("pool, levels, topk, budget, n", CONFIGS)
def test_selection_matches_naive_twin(pool, levels, topk, budget, n):
    cfg = causal(pool=pool, levels=levels, topk=topk, tile_budget=budget)
    gen = torch.Generator().manual_seed(pool * 100 + levels * 10 + n)
    q, k = torch.randn(2, n, 3, 5, generator=gen), torch.randn(2, n, 3, 5, generator=gen)
    sel = select(q, k, cfg)
    for b, h in itertools.product(range(2), range(3)):
        qn = torch.linalg.vector_norm(q[b, :, h], dim=-1).tolist()
        kn = torch.linalg.vector_norm(k[b, :, h], dim=-1).tolist()
        expected = naive_select_head(qn, kn, pool, levels, topk, budget, "causal")
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


def _random_config(rng: random.Random) -> tuple[LighthouseConfig, int]:
    pool = rng.choice([2, 4])
    levels = rng.choice([2, 3] if pool == 4 else [2, 3, 4])
    budget = rng.choice([2, 4])
    coarse_per_tile = budget * rng.choice([1, 2, 4])
    tile = coarse_per_tile * pool ** (levels - 1)
    tiles = rng.choice([1, 2, 3])
    return causal(pool=pool, levels=levels, topk=budget * tiles, tile_budget=budget), tile * tiles


def _outputs_up_to_t_unchanged(cfg: LighthouseConfig, n: int, seed: int, trials: int) -> list[bool]:
    """For random t: does changing every q, k, v after t leave outputs 0..t bit-identical?"""
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads = 2, 1
    q = torch.randn(1, n, heads, 4, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, n, kv_heads, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    out = lighthouse_attention(q, k, v, cfg)
    same = []
    for t in torch.randint(0, n - 1, (trials,), generator=gen).tolist():
        changed = [x.clone() for x in (q, k, v)]
        for x in changed:
            x[:, t + 1 :] = 3.0 * torch.randn(
                x[:, t + 1 :].shape, generator=gen, dtype=torch.float64
            )
        same.append(torch.equal(lighthouse_attention(*changed, cfg)[:, : t + 1], out[:, : t + 1]))
    return same


def test_strict_causality_with_the_selection_recomputed_on_random_configurations():
    """Property 2 without "held fixed": float64, 40 random configurations (pool, levels, budget,
    tile and tile count), 6 random cut points each, every later q, k and v replaced."""
    rng = random.Random(0)
    for trial in range(40):
        cfg, n = _random_config(rng)
        assert all(_outputs_up_to_t_unchanged(cfg, n, seed=trial, trials=6)), (cfg, n)


def test_the_papers_selection_fails_strict_causality():
    """Documented behaviour (s.10): with the paper's selection the same check fails."""
    rng = random.Random(0)
    failures = 0
    for trial in range(10):
        cfg, n = _random_config(rng)
        paper = LighthouseConfig(
            pool=cfg.pool, levels=cfg.levels, topk=cfg.topk, tile_budget=cfg.tile_budget
        )
        failures += _outputs_up_to_t_unchanged(paper, n, seed=trial, trials=6).count(False)
    assert failures > 0


def test_selected_length_partition_and_exact_budget_over_a_grid():
    """S = N / c_L + (L-1) * pool * topk; leaves partition each tile; keys unique and sorted;
    exactly b refined per level and tile, never a first child below the top level."""
    checked = 0
    for paper_cfg, n in valid_grid():
        cfg = causal(
            pool=paper_cfg.pool,
            levels=paper_cfg.levels,
            topk=paper_cfg.topk,
            tile_budget=paper_cfg.tile_budget,
        )
        sel = select(torch.randn(1, n, 1, 4), torch.randn(1, n, 1, 4), cfg)
        assert sel.start.shape[-1] == cfg.selected_length(n)
        keys = sel.key[0, 0]
        assert torch.all(keys[1:] > keys[:-1])
        leaf = ~sel.internal[0, 0]
        cover = torch.zeros(n, dtype=torch.int64)
        for s, e in zip(sel.start[0, 0][leaf].tolist(), sel.end[0, 0][leaf].tolist()):
            cover[s:e] += 1
        assert torch.all(cover == 1)
        tile = cfg.tile_size(n)
        for level in range(2, cfg.levels + 1):
            refined = sel.internal[0, 0] & (sel.level[0, 0] == level)
            per_tile = torch.bincount(sel.start[0, 0][refined] // tile, minlength=n // tile)
            assert torch.all(per_tile == cfg.tile_budget)
            if level < cfg.levels:
                index = sel.start[0, 0][refined] // cfg.span(level)
                assert torch.all(index % cfg.pool != 0)
        checked += 1
    assert checked > 100


def test_pieces_with_the_carry_equal_the_whole_sequence():
    """Selecting piece by piece, each from the carry of the piece before (what CP does), gives
    the whole sequence's selection; starting a later piece from nothing does not."""
    cfg = causal(pool=2, levels=3, topk=8, tile_budget=2)  # N = 128: tile 32, 4 tiles
    gen = torch.Generator().manual_seed(5)
    q, k, v = (
        torch.randn(2, 128, 2, 8, generator=gen),
        torch.randn(2, 128, 1, 8, generator=gen),
        torch.randn(2, 128, 1, 8, generator=gen),
    )
    whole = select(q, k, cfg)
    piece_cfg = cfg.for_pieces(128, 2)
    first = select(q[:, :64], k[:, :64], piece_cfg)
    carry = selection_carry(q[:, :64], k[:, :64], v[:, :64], piece_cfg)
    second = select(q[:, 64:], k[:, 64:], piece_cfg, preceding=carry).shifted(64)
    for name in ("start", "end", "level", "internal"):
        assert torch.equal(
            torch.cat([getattr(first, name), getattr(second, name)], dim=-1), getattr(whole, name)
        )
    alone = select(q[:, 64:], k[:, 64:], piece_cfg).shifted(64)
    assert not torch.equal(alone.internal, second.internal) or not torch.equal(
        alone.start, second.start
    )


def test_carry_is_the_naive_thresholds_of_the_last_tile():
    cfg = causal(pool=4, levels=3, topk=8, tile_budget=4)  # N = 512: tile 256
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 512, 1, 4, generator=gen), torch.randn(1, 512, 1, 4, generator=gen)
    carry = selection_carry(q, k, k, cfg)[0, 0]
    qn, kn = (torch.linalg.vector_norm(x[0, :, 0], dim=-1).tolist() for x in (q, k))
    expected = naive_tile_thresholds(qn, kn, 4, 3, 4, 256, 256)
    for level, which in itertools.product((2, 3), (0, 1)):
        assert carry[level - 2, which].item() == expected[level, which]


def test_gradcheck_with_the_causal_selection_fixed():
    cfg = causal(pool=2, levels=3, topk=4, tile_budget=2)
    gen = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(1, 64, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    ]
    sel = select(*(x.detach() for x in inputs[:2]), cfg)
    assert torch.autograd.gradcheck(
        lambda a, b, c: attend_selected(a, b, c, sel, cfg), inputs, eps=1e-6, atol=1e-8
    )


def test_bad_selection_names_the_rule():
    with pytest.raises(
        ValueError,
        match=r"selection must be one of \('tile_topk', 'causal'\), got selection='topk'",
    ):
        LighthouseConfig(selection="topk")
    recipe = recipe_from_dict({"lighthouse": {"selection": "strict"}})
    assert any("selection='strict'" in problem for problem in recipe.lighthouse.problems())


def test_the_default_is_the_papers_selection():
    assert LighthouseConfig().selection == "tile_topk"
    assert recipe_from_dict({}).lighthouse.config().selection == "tile_topk"
