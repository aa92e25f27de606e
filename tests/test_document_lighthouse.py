"""Lighthouse attention over packed documents (docs/LIGHTHOUSE.md s.12) on one device.

The library (lh_cp/ops/document_lighthouse.py) against the loop twin (tests/naive_lighthouse.py),
the isolation property (changing every q, k, v of the other documents changes nothing of a
document, selection recomputed, float64 bit for bit, outputs and gradients), strict causality
inside a document for the causal selection, the worked example of s.12 and the S formula.
"""

from __future__ import annotations

import random

import pytest
import torch
from naive_lighthouse import naive_lighthouse_documents

from lh_cp import LighthouseConfig, lighthouse_attention
from lh_cp.ops.document_lighthouse import document_regions, plan_documents
from lh_cp.ops.documents import DocumentsError

SELECTIONS = ("tile_topk", "causal")


def _bounds(lengths_per_window: list[list[int]], n: int) -> list[int]:
    bounds = [0]
    for window in lengths_per_window:
        assert sum(window) == n
        for length in window:
            bounds.append(bounds[-1] + length)
    return bounds


def _random_layout(rng: random.Random, batch: int, n: int, mean: float) -> list[int]:
    windows = []
    for _ in range(batch):
        lengths, left = [], n
        while left:
            length = min(left, max(1, int(rng.expovariate(1 / mean))))
            lengths.append(length)
            left -= length
        windows.append(lengths)
    return _bounds(windows, n)


def _qkv(batch, n, heads, kv_heads, dim, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n, heads, dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, n, kv_heads, dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, n, kv_heads, dim, generator=gen, dtype=dtype)
    return q, k, v


def _docs(bounds: list[int]) -> torch.Tensor:
    return torch.tensor(bounds, dtype=torch.int32)


# p=2, L=3: c_L = 4; N = 64, T = 8 (topk 16, b 2): tiles of 8, regions of whole tiles.
CFG = dict(pool=2, levels=3, topk=16, tile_budget=2)
NAIVE = dict(pool=2, levels=3, topk=16, budget=2)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_library_equals_the_loop_twin(selection, seed):
    rng = random.Random(seed)
    cfg = LighthouseConfig(**CFG, selection=selection)
    batch, n, heads, kv_heads, dim = 2, 64, 4, 2, 8
    bounds = _random_layout(rng, batch, n, mean=rng.choice([6, 14, 30]))
    q, k, v = _qkv(batch, n, heads, kv_heads, dim, seed)
    got = lighthouse_attention(q, k, v, cfg, documents=_docs(bounds))
    want, _ = naive_lighthouse_documents(q, k, v, **NAIVE, bounds=bounds, selection=selection)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_min_document_tokens_sends_shorter_documents_dense():
    cfg = LighthouseConfig(**CFG, min_document_tokens=30)
    bounds = _bounds([[3, 29, 32]], 64)  # 29 < 30 tokens: dense; 32: a region
    q, k, v = _qkv(1, 64, 2, 2, 8, 5)
    got = lighthouse_attention(q, k, v, cfg, documents=_docs(bounds))
    want, _ = naive_lighthouse_documents(q, k, v, **NAIVE, bounds=bounds, min_document_tokens=30)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    regions = document_regions(bounds, 1, 64, cfg)
    assert [r.has_region for r in regions] == [False, False, True]


def _outputs_and_grads(q, k, v, cfg, bounds):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = lighthouse_attention(q, k, v, cfg, documents=_docs(bounds))
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _document_mask(bounds: list[int], n: int, index: int) -> torch.Tensor:
    flat = torch.zeros(len(bounds) - 1 and bounds[-1], dtype=torch.bool)
    flat[bounds[index] : bounds[index + 1]] = True
    return flat.view(-1, n)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize(
    ("seed", "scorer"), [*((seed, "norm") for seed in range(6)), (3, "dilated"), (3, "gla")]
)
def test_a_document_is_bit_identical_whatever_the_other_documents_hold(selection, seed, scorer):
    """s.12's property: every q, k, v of every other document replaced, everything recomputed
    (selection included): the document's outputs and gradients do not move by one bit; with
    each selection scorer (s.13: theirs read the document's own tokens only; seed 3's layout
    fails the paper's selection when the scorers are not given the documents)."""
    rng = random.Random(100 + seed)
    cfg = LighthouseConfig(**CFG, selection=selection, scorer=scorer, dilation=4)
    batch, n, heads, kv_heads, dim = 2, 64, 2, 1, 8
    bounds = _random_layout(rng, batch, n, mean=rng.choice([5, 12, 25, 40]))
    index = rng.randrange(len(bounds) - 1)
    mine = _document_mask(bounds, n, index)[:, :, None, None]  # [B, N, 1, 1]
    q, k, v = _qkv(batch, n, heads, kv_heads, dim, seed)
    other = _qkv(batch, n, heads, kv_heads, dim, seed + 1000)
    changed = [torch.where(mine, x, 3 * y) for x, y in zip((q, k, v), other)]
    before = _outputs_and_grads(q, k, v, cfg, bounds)
    after = _outputs_and_grads(*changed, cfg, bounds)
    for a, b in zip(before, after):
        m = mine.expand(-1, -1, a.shape[2], a.shape[3])
        assert torch.equal(a[m], b[m])


def test_the_unmasked_op_leaks_between_documents():
    """Documented behaviour: without documents= a document's output reads the one before it."""
    cfg = LighthouseConfig(**CFG)
    q, k, v = _qkv(1, 64, 2, 2, 8, 7)
    mine = torch.zeros(1, 64, 1, 1, dtype=torch.bool)
    mine[:, 40:] = True
    changed = [torch.where(mine, x, x + 1) for x in (q, k, v)]
    before = lighthouse_attention(q, k, v, cfg)
    after = lighthouse_attention(*changed, cfg)
    assert not torch.equal(before[:, 40:], after[:, 40:])


@pytest.mark.parametrize("selection", SELECTIONS)
def test_one_document_per_window_is_the_unmasked_op(selection):
    cfg = LighthouseConfig(**CFG, selection=selection)
    q, k, v = _qkv(2, 64, 4, 2, 8, 3)
    got = lighthouse_attention(q, k, v, cfg, documents=_docs([0, 64, 128]))
    assert torch.equal(got, lighthouse_attention(q, k, v, cfg))


def test_strictly_causal_inside_a_document_with_the_causal_selection():
    """s.11 inside each document: an input after t changes nothing at t, selection recomputed."""
    cfg = LighthouseConfig(**CFG, selection="causal")
    bounds = _bounds([[11, 45, 8]], 64)
    q, k, v = _qkv(1, 64, 2, 2, 8, 9)
    base = lighthouse_attention(q, k, v, cfg, documents=_docs(bounds))
    for t in (12, 20, 31, 47, 54):
        changed = [x.clone() for x in (q, k, v)]
        for x in changed:
            x[:, t + 1 :] = torch.randn_like(x[:, t + 1 :]) * 5
        out = lighthouse_attention(*changed, cfg, documents=_docs(bounds))
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), t


def test_worked_example_of_section_12():
    """docs/LIGHTHOUSE.md s.12: N = 32, T = 8, p = 2, L = 3, documents [0,5) [5,29) [29,32)."""
    cfg = LighthouseConfig(pool=2, levels=3, topk=8, tile_budget=2)
    bounds = [0, 5, 29, 32]
    regions = document_regions(bounds, 1, 32, cfg)
    assert [(r.start, r.end, r.region_start, r.region_end) for r in regions] == [
        (0, 5, 0, 0),
        (5, 29, 8, 24),
        (29, 32, 29, 29),
    ]
    plan = plan_documents(bounds, 1, 32, cfg, torch.device("cpu"))
    assert plan.bounds == [0, 5, 33, 36]  # 5 tokens; 3 + 2 x 10 + 5; 3 tokens
    assert plan.restart.tolist() == [[False, True, False, False]]
    # The tail rule: ending at 25, one token past the tile end (< c_L - 1 = 3), the region
    # gives up its last tile.
    shorter = document_regions([0, 5, 25, 32], 1, 32, cfg)[1]
    assert (shorter.region_start, shorter.region_end) == (8, 16)
    # The table: unit norms except q at 10 and 16, k at 12 and 22 (they win level 2).
    q = torch.nn.functional.normalize(torch.randn(1, 32, 1, 4, dtype=torch.float64), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(1, 32, 1, 4, dtype=torch.float64), dim=-1)
    v = torch.randn(1, 32, 1, 4, dtype=torch.float64)
    q[0, [10, 16]] *= 5
    k[0, [12, 22]] *= 5
    want, entries = naive_lighthouse_documents(q, k, v, 2, 3, 8, 2, bounds)
    table = [(15, 5, 6), (18, 6, 7), (21, 7, 8), (24, 8, 10), (30, 10, 11), (33, 11, 12)]
    table += [(34, 10, 12), (35, 8, 12), (36, 12, 13), (39, 13, 14), (40, 12, 14), (42, 14, 16)]
    table += [(47, 12, 16), (48, 16, 17), (51, 17, 18), (52, 16, 18), (54, 18, 20), (59, 16, 20)]
    table += [(60, 20, 22), (66, 22, 23), (69, 23, 24), (70, 22, 24), (71, 20, 24)]
    table += [(3 * t, t, t + 1) for t in range(24, 29)]
    assert [(key, s, e) for key, s, e, _, _ in entries[0, 0, 1]] == table
    got = lighthouse_attention(q, k, v, cfg, documents=_docs(bounds))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_selected_length_is_the_formula(seed):
    """S = sum over documents of head + tail tokens + whole region tiles x entries per tile."""
    rng = random.Random(seed)
    cfg = LighthouseConfig(**CFG)
    n, batch = 64, 3
    bounds = _random_layout(rng, batch, n, mean=rng.choice([4, 20, 60]))
    per_tile = cfg.entries_per_tile(n)
    tile = cfg.tile_size(n)
    want = 0
    for r in document_regions(bounds, batch, n, cfg):
        tiles = (r.region_end - r.region_start) // tile
        want += (r.end - r.start) - tiles * tile + tiles * per_tile
    assert plan_documents(bounds, batch, n, cfg, torch.device("cpu")).length == want


def test_deterministic_and_gradients_match_finite_differences():
    cfg = LighthouseConfig(pool=2, levels=3, topk=8, tile_budget=2, selection="causal")
    bounds = _bounds([[3, 23, 6]], 32)  # region [8, 16) (the tail rule), head and tail tokens
    q, k, v = _qkv(1, 32, 2, 1, 4, 11)
    docs = _docs(bounds)
    assert torch.equal(
        lighthouse_attention(q, k, v, cfg, documents=docs),
        lighthouse_attention(q, k, v, cfg, documents=docs),
    )
    inputs = tuple(x.clone().requires_grad_(True) for x in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: lighthouse_attention(a, b, c, cfg, documents=docs), inputs, fast_mode=True
    )


def test_bad_documents_raise_named_errors():
    cfg = LighthouseConfig(**CFG)
    q, k, v = _qkv(1, 64, 2, 2, 8, 0)
    with pytest.raises(DocumentsError, match="end at B \\* N"):
        lighthouse_attention(q, k, v, cfg, documents=_docs([0, 10, 60]))
    with pytest.raises(DocumentsError, match="strictly increasing"):
        lighthouse_attention(q, k, v, cfg, documents=_docs([0, 10, 10, 64]))
    with pytest.raises(DocumentsError, match="int32"):
        lighthouse_attention(q, k, v, cfg, documents=torch.tensor([0, 64]))
    with pytest.raises(ValueError, match="min_document_tokens must be >= 0"):
        LighthouseConfig(**CFG, min_document_tokens=-1)


def test_benchmark_smoke(tmp_path):
    """benchmarks/document_lighthouse.py runs end to end at toy sizes on the CPU and writes its
    rows (every arm timed, the CP arms at W = 1 too, the ratios derived from them)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "document_lighthouse.py"
    spec = importlib.util.spec_from_file_location("document_lighthouse_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--smoke", "--out", str(tmp_path / "out.json")])
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [r["documents"] for r in rows][-1] == 1  # the one-document mix
    for r in rows:
        assert r["dense_docs_over_lighthouse_docs"] == r["dense_docs_ms"] / r["lighthouse_docs_ms"]
        for exchange in ("allgather", "ring"):  # the CP path at W = 1 (gloo), every arm
            for arm in ("lighthouse_docs", "dense_docs", "lighthouse"):
                assert r[f"{arm}_cp_{exchange}_ms"] > 0
            assert r[f"dense_docs_over_lighthouse_docs_cp_{exchange}"] == (
                r[f"dense_docs_cp_{exchange}_ms"] / r[f"lighthouse_docs_cp_{exchange}_ms"]
            )
    assert rows[-1]["paired_one_document"] > 0 and "paired_one_document" not in rows[0]
