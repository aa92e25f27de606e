"""CPU tests of the kernels' index arithmetic: the Plan, the row-kernel twins, launch sizes.

The Triton kernels run on exactly these index views (tests/test_kernels_gpu.py compares them
on a GPU); here the views themselves are checked against the reference gather and scatter,
in float64 (errors are rounding only: <= 1e-12), up to 4M tokens.
"""

import subprocess
import sys

import pytest
import torch

from lh_cp import LighthouseConfig, select
from lh_cp.ops import kernels
from lh_cp.ops.compress import compress_reference
from lh_cp.ops.kernels.launch import MAX_GRID_X, check_grid
from lh_cp.ops.kernels.rows_reference import expand_rows_reference, pool_rows_reference
from lh_cp.ops.kernels.slot_plan import Plan, level_block_offsets, level_block_sizes
from lh_cp.ops.pyramid import gather_entries, level_offsets
from lh_cp.ops.scatter import scatter_entries

CONFIGS = [
    # (pool, levels, topk, tile_budget, N, H, Hkv)
    (2, 1, 4, 2, 32, 2, 1),
    (2, 3, 4, 2, 64, 2, 1),
    (4, 3, 8, 4, 1024, 4, 2),
    (8, 2, 4, 2, 256, 2, 2),
    (2, 5, 4, 2, 512, 1, 1),
    (4, 4, 8, 4, 4096, 2, 1),
]


def _check_twins_against_reference(q, k, cfg, atol):
    n = q.shape[1]
    group = q.shape[2] // k.shape[2]
    sel = select(q, k, cfg)
    plan = Plan.from_selection(sel, n, cfg)
    slots = sel.slots(n, cfg)
    for x, g in ((q, 1), (k, group)):
        torch.testing.assert_close(
            pool_rows_reference(x, plan, cfg, 0, True, g),
            gather_entries(x, slots, cfg),
            rtol=0,
            atol=atol,
        )
        entries = torch.randn(
            x.shape[0], q.shape[2], sel.start.shape[-1], x.shape[-1], dtype=x.dtype
        )
        leaf = x.detach().clone().requires_grad_()
        gather_entries(leaf, slots, cfg).backward(entries)
        torch.testing.assert_close(
            expand_rows_reference(entries, plan, cfg, 0, True, g), leaf.grad, rtol=0, atol=atol
        )
    entries = torch.randn(
        q.shape[0], q.shape[2], sel.start.shape[-1], q.shape[-1], dtype=q.dtype, requires_grad=True
    )
    out = scatter_entries(entries, sel, n, cfg)
    torch.testing.assert_close(
        expand_rows_reference(entries.detach(), plan, cfg, 1, False), out, rtol=0, atol=atol
    )
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    torch.testing.assert_close(
        pool_rows_reference(grad_out, plan, cfg, 1, False), entries.grad, rtol=0, atol=atol
    )
    return plan, sel


@pytest.mark.parametrize("pool,levels,topk,budget,n,heads,kv_heads", CONFIGS)
def test_plan_twins_equal_reference_gather_and_scatter(
    pool, levels, topk, budget, n, heads, kv_heads
):
    cfg = LighthouseConfig(pool=pool, levels=levels, topk=topk, tile_budget=budget)
    torch.manual_seed(n)
    q = torch.randn(2, n, heads, 8, dtype=torch.float64)
    k = torch.randn(2, n, kv_heads, 8, dtype=torch.float64)
    plan, sel = _check_twins_against_reference(q, k, cfg, atol=1e-12)
    # Level blocks have the fixed sizes the kernels assume, each entry appears once.
    sizes = level_block_sizes(n, cfg)
    blocks = level_block_offsets(n, cfg)
    assert blocks[-1] == sel.start.shape[-1] == cfg.selected_length(n)
    for level in range(1, levels + 1):
        got = sel.level.gather(
            -1, plan.level_position[..., blocks[level - 1] : blocks[level]].long()
        )
        assert (got == level).all() and blocks[level] - blocks[level - 1] == sizes[level - 1]
    assert torch.equal(
        plan.level_position.long().sort(dim=-1).values,
        torch.arange(blocks[-1]).expand_as(sel.start),
    )
    assert int((plan.slot_map >= 0).sum()) == plan.level_position.numel()


@pytest.mark.parametrize("pool,levels,topk,budget,n,heads,kv_heads", CONFIGS)
def test_twins_scatter_onto_spill_rows_like_the_reference(
    pool, levels, topk, budget, n, heads, kv_heads
):
    """A CP chunk scatters past its N rows (its spill into the next chunk): the twins with
    rows > N, and with the spill rows apart (first_row, tail), equal scatter_entries onto
    N + c_L positions, forward and backward (float64)."""
    cfg = LighthouseConfig(pool=pool, levels=levels, topk=topk, tile_budget=budget)
    torch.manual_seed(n + 1)
    q = torch.randn(2, n, heads, 8, dtype=torch.float64)
    k = torch.randn(2, n, kv_heads, 8, dtype=torch.float64)
    sel = select(q, k, cfg)
    plan = Plan.from_selection(sel, n, cfg)
    rows = n + cfg.coarsest_span
    entries = torch.randn(2, heads, sel.start.shape[-1], 8, dtype=torch.float64, requires_grad=True)
    out = scatter_entries(entries, sel, rows, cfg)  # [2, N + c_L, H, D]
    torch.testing.assert_close(
        expand_rows_reference(entries.detach(), plan, cfg, 1, False, rows=rows),
        out,
        rtol=0,
        atol=1e-12,
    )
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    torch.testing.assert_close(
        pool_rows_reference(grad_out, plan, cfg, 1, False), entries.grad, rtol=0, atol=1e-12
    )
    # The split form the CP paths use: the spill rows written apart, pooled back as a tail.
    spill = cfg.coarsest_span - 1  # 0 with one level: nothing spills
    assert not out[:, n + spill :].any(), "rows past the spill receive nothing"
    if spill > 0:
        spilled = expand_rows_reference(
            entries.detach(), plan, cfg, 1, False, rows=spill, first_row=n
        )
        torch.testing.assert_close(spilled, out[:, n : n + spill], rtol=0, atol=1e-12)
    tail = grad_out[:, n : n + spill]
    torch.testing.assert_close(
        pool_rows_reference(grad_out[:, :n], plan, cfg, 1, False, tail=tail),
        entries.grad,
        rtol=0,
        atol=1e-12,
    )


def test_row_windows_and_spills_out_of_range_are_refused():
    cfg = LighthouseConfig(pool=2, levels=3, topk=8, tile_budget=2)
    q = torch.randn(1, 32, 2, 8, dtype=torch.float64)
    sel = select(q, q, cfg)
    plan = Plan.from_selection(sel, 32, cfg)
    entries = torch.randn(1, 2, sel.start.shape[-1], 8, dtype=torch.float64)
    for rows, first_row in ((31, 0), (3, 5), (0, 32)):
        with pytest.raises(ValueError, match="expand_rows writes"):
            expand_rows_reference(entries, plan, cfg, 1, False, rows=rows, first_row=first_row)
    compressed = compress_reference(q, q, q, cfg)
    for spill in (-1, cfg.coarsest_span):
        with pytest.raises(ValueError, match=f"spill={spill}: .* 0 .. c_L - 1 = 3"):
            compressed.deliver(compressed.q, spill)


@pytest.mark.parametrize("n,levels", [(2**22, 4), (2**20, 3), (2**20, 5)])
def test_plan_index_arithmetic_up_to_4m_tokens(n, levels):
    """N up to 2**22 (4M) with the benchmark's pool/topk/tile_budget, one narrow head."""
    cfg = LighthouseConfig(pool=4, levels=levels, topk=2048, tile_budget=128)
    torch.manual_seed(levels)
    q = torch.randn(1, n, 1, 2, dtype=torch.float64)
    k = torch.randn(1, n, 1, 2, dtype=torch.float64)
    plan, sel = _check_twins_against_reference(q, k, cfg, atol=1e-12)
    assert plan.slot_map.shape[-1] == level_offsets(n, cfg)[-1]
    assert int(plan.slot_map.max()) == cfg.selected_length(n) - 1


def test_launch_grids_fit_up_to_4m_tokens_and_beyond():
    """Every launch is one-dimensional; the largest (expand: one program per 16 tokens per head;
    block pool: per 32-256 tokens; per-level pool: at most one per entry) fits."""
    for n in (2**15, 2**20, 2**22, 2**24):
        for pool, levels in ((2, 2), (2, 5), (4, 3), (4, 5), (8, 3)):
            cfg = LighthouseConfig(pool=pool, levels=levels, topk=2048, tile_budget=128)
            try:
                s = cfg.selected_length(n)
            except ValueError:
                continue
            batch, heads = 1, 8
            assert check_grid(batch * heads * -(-n // 16)) == (batch * heads * -(-n // 16),)
            assert check_grid(batch * heads * s)[0] <= MAX_GRID_X
            # Element offsets of a [B, N, H, 128] tensor pass int32 at 2M tokens: the kernels
            # compute every offset in int64.
            assert (n * heads * 128 >= 2**31) == (n >= 2**21)
    with pytest.raises(ValueError, match="grid x limit"):
        check_grid(2**31)


def test_importing_lh_cp_never_imports_triton():
    """Neither triton nor torch._dynamo (which imports triton where it is installed, as with the
    CUDA torch wheels) loads on import; the kernels load them when a CUDA tensor first needs them."""
    code = (
        "import sys, lh_cp, lh_cp.ops.kernels, lh_cp.ops.attention, lh_cp.model.transformer, lh_cp.parallel; "
        "loaded = [m for m in ('triton', 'torch._dynamo') if m in sys.modules]; assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_tensors_use_the_reference():
    x = torch.randn(1, 8, 1, 4)
    assert not kernels.available(x)
