"""Triton kernels against their pure-PyTorch twins on CUDA (skipped without a GPU).

Selection: identical entries (same scores in, same Selection and Plan out). Row kernels in
float32: within 1e-5 absolute + 1e-5 relative of the twin (both sum up to 64 float32 terms,
only the order differs: a few ulps of values up to ~30).
Whole layer in bf16: relative L2 error <= 2e-2 for out, dq, dk, dv against a float64
reference on the same selection (bf16 operands give 1e-3..1e-2; the bound leaves 2x room),
and never more than 2x the error of the bf16 reference path plus 1e-3.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from lh_cp import LighthouseConfig  # noqa: E402
from lh_cp.ops import kernels  # noqa: E402
from lh_cp.ops.attention import attend_selected  # noqa: E402

# On CUDA tensors the single-device layer takes the kernel path (lh_cp.ops.compress chooses it).
from lh_cp.ops.attention import single_device_lighthouse as kernel_lighthouse  # noqa: E402
from lh_cp.ops.kernels.ops import select as kernel_select  # noqa: E402
from lh_cp.ops.kernels.rows import empty_entries, expand_rows, pool_rows  # noqa: E402
from lh_cp.ops.kernels.rows_reference import expand_rows_reference, pool_rows_reference  # noqa: E402
from lh_cp.ops.kernels.scores import token_norms  # noqa: E402
from lh_cp.ops.kernels.scores_reference import token_scores  # noqa: E402
from lh_cp.ops.kernels.selection import select_plan  # noqa: E402
from lh_cp.ops.kernels.selection_reference import select_from_scores  # noqa: E402
from lh_cp.ops.kernels.slot_plan import Plan, selection_from_fields  # noqa: E402

DEV = "cuda"
# (pool, levels, topk, tile_budget, N, B, H, Hkv, D): odd B/H/D, GQA, levels 1-5, pool 2/4/8.
CONFIGS = [
    (4, 1, 8, 4, 96, 1, 3, 3, 40),
    (2, 2, 8, 4, 256, 2, 3, 1, 72),
    (4, 3, 16, 4, 1024, 1, 6, 2, 64),
    (2, 4, 8, 2, 512, 2, 2, 2, 128),
    (2, 5, 4, 2, 1024, 1, 4, 2, 96),
    (4, 4, 8, 4, 4096, 1, 2, 1, 128),
    (8, 2, 8, 4, 1024, 1, 3, 3, 56),
    (8, 3, 4, 2, 2048, 2, 2, 1, 128),
    (4, 5, 4, 4, 16384, 1, 2, 2, 32),
    (4, 3, 2048, 128, 32768, 1, 2, 2, 128),
    (8, 4, 4, 2, 2048, 1, 2, 1, 64),  # span 512 > 256: the per-level pooling kernel
]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def equal_selection(a, b):
    return all(
        torch.equal(getattr(a, f), getattr(b, f)) for f in ("start", "end", "level", "internal")
    )


@pytest.mark.parametrize("selection", ["tile_topk", "causal"])
@pytest.mark.parametrize("pool,levels,topk,budget,n,batch,heads,kv_heads,dim", CONFIGS)
def test_selection_and_plan_identical(
    pool, levels, topk, budget, n, batch, heads, kv_heads, dim, selection
):
    cfg = LighthouseConfig(
        pool=pool, levels=levels, topk=topk, tile_budget=budget, selection=selection
    )
    torch.manual_seed(n + levels)
    for ties in (False, True):
        qs = torch.rand(batch, heads, n, device=DEV)
        ks = torch.rand(batch, kv_heads, n, device=DEV)
        if ties:  # few distinct values: the lower-index rule decides most choices
            qs, ks = (qs * 3).floor(), (ks * 2).floor()
        ref = select_from_scores(qs, ks.repeat_interleave(heads // kv_heads, dim=1), cfg)
        plan, start, level, internal = select_plan(qs, ks, cfg)
        assert equal_selection(selection_from_fields(start, level, internal, cfg), ref)
        ref_plan = Plan.from_selection(ref, n, cfg)
        for f in ("slot_map", "level_index", "level_position"):
            assert torch.equal(getattr(plan, f), getattr(ref_plan, f)), f


@pytest.mark.parametrize("choice", ["tile_topk", "causal"])
def test_chunked_top_level_path(monkeypatch, choice):
    """A top level wider than MAX_TOP_IN_REGISTERS takes the chunked path (the radix select, or
    the causal counters carried from block to block)."""
    import lh_cp.ops.kernels.selection as selection

    monkeypatch.setattr(selection, "MAX_TOP_IN_REGISTERS", 64)
    cfg = LighthouseConfig(pool=2, levels=3, topk=8, tile_budget=4, selection=choice)
    qs, ks = torch.rand(1, 2, 4096, device=DEV), torch.rand(1, 2, 4096, device=DEV)
    ref = select_from_scores(qs, ks, cfg)
    _, start, level, internal = selection.select_plan(qs, ks, cfg)
    assert equal_selection(selection_from_fields(start, level, internal, cfg), ref)


def test_causal_selection_from_a_preceding_carry():
    """The first tile of a CP chunk starts from the previous chunk's thresholds, as the reference."""
    cfg = LighthouseConfig(pool=4, levels=3, topk=32, tile_budget=8, selection="causal")
    qs, ks = torch.rand(2, 4, 4096, device=DEV), torch.rand(2, 2, 4096, device=DEV)
    preceding = torch.rand(2, 4, cfg.levels - 1, 2, device=DEV)
    ref = select_from_scores(qs, ks.repeat_interleave(2, dim=1), cfg, preceding=preceding)
    _, start, level, internal = select_plan(qs, ks, cfg, preceding=preceding)
    assert equal_selection(selection_from_fields(start, level, internal, cfg), ref)
    assert not equal_selection(ref, select_from_scores(qs, ks.repeat_interleave(2, dim=1), cfg))


def test_causal_layer_on_the_kernels_is_strictly_causal():
    """bf16 on the kernels and the fused SDPA: outputs 0..t bit-identical when every later q, k,
    v changes (docs/LIGHTHOUSE.md s.11), at a length with 16 tiles."""
    from lh_cp import lighthouse_attention

    cfg = LighthouseConfig(pool=4, levels=3, topk=256, tile_budget=16, selection="causal")
    n = 16384
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, n, 4, 64, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    assert kernels.available(q, k, v)
    out = lighthouse_attention(q, k, v, cfg)
    for t in (100, 1023, 5000, 9999, 16000):
        changed = [x.clone() for x in (q, k, v)]
        for x in changed:
            x[:, t + 1 :] = 2.0 * torch.randn_like(x[:, t + 1 :])
        assert torch.equal(lighthouse_attention(*changed, cfg)[:, : t + 1], out[:, : t + 1]), t


def test_token_norms_match_reference():
    x = torch.randn(2, 1000, 3, 72, device=DEV, dtype=torch.bfloat16)
    torch.testing.assert_close(token_norms(x), token_scores(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "pool,levels,topk,budget,n,batch,heads,kv_heads,dim", CONFIGS[1:6] + CONFIGS[8:9] + CONFIGS[10:]
)
def test_row_kernels_match_twins(pool, levels, topk, budget, n, batch, heads, kv_heads, dim):
    cfg = LighthouseConfig(pool=pool, levels=levels, topk=topk, tile_budget=budget)
    group = heads // kv_heads
    torch.manual_seed(n + levels)
    # Sums (not means) over spans of up to c_L unit-normal rows are of size sqrt(c_L), and so is
    # their float32 summation-order difference: an absolute bound fixed at 1e-5 failed once at
    # c_L = 256 (1.8e-5, benchmarks/results/gpu_tests_h200_causal.log).
    sum_atol = 1e-5 * cfg.coarsest_span**0.5
    q = torch.randn(batch, n, heads, dim, device=DEV)
    k, v = (torch.randn(batch, n, kv_heads, dim, device=DEV) for _ in range(2))
    plan = Plan.from_selection(kernel_select(q, k, cfg), n, cfg)
    s = cfg.selected_length(n)
    got = pool_rows([q, k, v], plan, cfg, shift=0, mean=True, group=group)
    want = [
        pool_rows_reference(x, plan, cfg, 0, True, g) for x, g in ((q, 1), (k, group), (v, group))
    ]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Heads-outer entries (a CP shard's layout): written and read through their strides.
    outs = [
        empty_entries(batch, heads, s, dim, torch.float32, DEV, heads_outer=True) for _ in range(3)
    ]
    for a, b in zip(
        pool_rows([q, k, v], plan, cfg, shift=0, mean=True, group=group, outs=outs), want
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        expand_rows([outs[0]], plan, cfg, 1, False)[0],
        expand_rows_reference(want[0], plan, cfg, 1, False),
        rtol=1e-5,
        atol=1e-5 * cfg.coarsest_span**0.5,
    )
    entries = torch.randn(batch, heads, s, dim, device=DEV)
    torch.testing.assert_close(
        expand_rows([entries], plan, cfg, 1, False)[0],
        expand_rows_reference(entries, plan, cfg, 1, False),
        rtol=1e-5,
        atol=sum_atol,
    )
    dk, dv = expand_rows([entries, 2 * entries], plan, cfg, 0, True, group)
    torch.testing.assert_close(
        dk, expand_rows_reference(entries, plan, cfg, 0, True, group), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        dv, expand_rows_reference(2 * entries, plan, cfg, 0, True, group), rtol=1e-5, atol=1e-5
    )
    tokens = torch.randn(batch, n, heads, dim, device=DEV)
    torch.testing.assert_close(
        pool_rows([tokens], plan, cfg, 1, False)[0],
        pool_rows_reference(tokens, plan, cfg, 1, False),
        rtol=1e-5,
        atol=sum_atol,
    )
    spill = cfg.coarsest_span - 1  # a CP chunk's spill rows: written apart, pooled back as a tail
    if spill > 0:
        torch.testing.assert_close(
            expand_rows([entries], plan, cfg, 1, False, rows=spill, first_row=n)[0],
            expand_rows_reference(entries, plan, cfg, 1, False, rows=spill, first_row=n),
            rtol=1e-5,
            atol=sum_atol,
        )
        tail = torch.randn(batch, spill, heads, dim, device=DEV)
        torch.testing.assert_close(
            pool_rows([tokens], plan, cfg, 1, False, tail=tail)[0],
            pool_rows_reference(tokens, plan, cfg, 1, False, tail=tail),
            rtol=1e-5,
            atol=sum_atol,
        )


def _layer_with_grads(fn, q, k, v, grad_out):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("pool,levels,topk,budget,n,batch,heads,kv_heads,dim", CONFIGS)
def test_layer_bf16_close_to_float64(pool, levels, topk, budget, n, batch, heads, kv_heads, dim):
    cfg = LighthouseConfig(pool=pool, levels=levels, topk=topk, tile_budget=budget)
    torch.manual_seed(7)
    q = torch.randn(batch, n, heads, dim, device=DEV, dtype=torch.bfloat16)
    k, v = (
        torch.randn(batch, n, kv_heads, dim, device=DEV, dtype=torch.bfloat16) for _ in range(2)
    )
    grad_out = torch.randn(batch, n, heads, dim, device=DEV)
    sel = kernel_select(q, k, cfg)
    with kernels.disabled():
        exact = _layer_with_grads(
            lambda a, b, c: attend_selected(a, b, c, sel, cfg),
            q.double(),
            k.double(),
            v.double(),
            grad_out,
        )
        ref_bf16 = _layer_with_grads(
            lambda a, b, c: attend_selected(a, b, c, sel, cfg), q, k, v, grad_out
        )
    got = _layer_with_grads(lambda a, b, c: kernel_lighthouse(a, b, c, cfg), q, k, v, grad_out)
    for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, ref_bf16, exact):
        err, ref_err = rel_err(g, e), rel_err(r, e)
        assert err <= 2e-2 and err <= 2 * ref_err + 1e-3, (name, err, ref_err)


def test_kernels_are_deterministic():
    """Same input, same bits: every kernel writes each output row once, in a fixed order."""
    cfg = LighthouseConfig(pool=4, levels=3, topk=256, tile_budget=32)
    n = 16384
    q = torch.randn(1, n, 4, 64, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(1, n, 2, 64, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    grad_entries = torch.randn(1, 4, cfg.selected_length(n), 64, device=DEV, dtype=torch.bfloat16)
    grad_out = torch.randn(1, n, 4, 64, device=DEV, dtype=torch.bfloat16)

    def run():
        plan, *_ = kernels.ops.select_with_plan(q, k, cfg)
        a, b, c = (x.detach().clone().requires_grad_() for x in (q, k, v))
        qe, ke, ve = kernels.ops.gather_plan(a, b, c, plan, cfg)
        (qe * grad_entries + ke + ve).sum().backward()
        oe = grad_entries.detach().clone().requires_grad_()
        kernels.ops.scatter_plan(oe, plan, cfg)[0].backward(grad_out)
        return [plan.slot_map, qe, a.grad, b.grad, c.grad, oe.grad]

    first, second = run(), run()
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_dispatch_routes_cuda_to_kernels_and_cpu_to_reference(monkeypatch):
    cfg = LighthouseConfig(pool=2, levels=3, topk=8, tile_budget=4)
    q = torch.randn(1, 256, 2, 32, device=DEV)
    assert kernels.available(q)
    assert not kernels.available(q.double()) and not kernels.available(q.cpu())
    with kernels.disabled():
        assert not kernels.available(q)
    import lh_cp.ops.compress
    from lh_cp import lighthouse_attention

    taken = []
    for twin in ("compress_kernels", "compress_reference"):
        original = getattr(lh_cp.ops.compress, twin)
        monkeypatch.setattr(
            lh_cp.ops.compress,
            twin,
            lambda *a, _f=original, _n=twin, **kw: taken.append(_n) or _f(*a, **kw),
        )
    out = lighthouse_attention(q, q, q, cfg)
    with kernels.disabled():
        ref = lighthouse_attention(q, q, q, cfg)
    assert taken == ["compress_kernels", "compress_reference"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_four_million_tokens_past_int32_offsets():
    """N = 2**22, H = 6, D = 128: element offsets reach 3.2e9 > 2**31. Selection identical to
    the reference; gathered entries and scattered rows checked at the end of the sequence
    (where an int32 offset would have wrapped) against direct int64 PyTorch indexing."""
    n, heads, dim = 2**22, 6, 128
    cfg = LighthouseConfig(pool=4, levels=4, topk=2048, tile_budget=128)
    torch.manual_seed(4)
    q = torch.randn(1, n, heads, dim, device=DEV, dtype=torch.bfloat16)
    k = torch.randn_like(q)
    plan, start, level, internal = select_plan(token_norms(q), token_norms(k), cfg)
    sel = selection_from_fields(start, level, internal, cfg)
    assert equal_selection(sel, select_from_scores(token_norms(q), token_norms(k), cfg))
    (q_entries,) = pool_rows([q], plan, cfg, shift=0, mean=True)
    last = torch.arange(sel.start.shape[-1] - 2000, sel.start.shape[-1], device=DEV)
    for h in (0, heads - 1):
        for j in last[::97].tolist():
            s0, e0 = int(sel.start[0, h, j]), int(sel.end[0, h, j])
            want = q[0, s0:e0, h].float().mean(dim=0)
            torch.testing.assert_close(q_entries[0, h, j].float(), want, rtol=1e-2, atol=1e-2)
    del q_entries
    entries = torch.randn(1, heads, sel.start.shape[-1], dim, device=DEV, dtype=torch.bfloat16)
    (out,) = expand_rows([entries], plan, cfg, 1, False)
    tail = torch.arange(n - 300, n, device=DEV)
    ref_tail = torch.zeros(300, heads, dim, device=DEV)
    offsets = torch.tensor([0, n, n + n // 4, n + n // 4 + n // 16], device=DEV)
    for lvl in range(1, 5):
        span = 4 ** (lvl - 1)
        pos = plan.slot_map[0, :, offsets[lvl - 1] + (tail + 1) // span - 1].long()  # [H, 300]
        got = torch.where(
            (pos >= 0).unsqueeze(-1),
            entries[0].gather(1, pos.clamp(min=0).unsqueeze(-1).expand(-1, -1, dim)).float(),
            0.0,
        )
        ref_tail += got.transpose(0, 1)
    torch.testing.assert_close(out[0, -300:].float(), ref_tail, rtol=1e-2, atol=1e-2)


def test_lighthouse_leaves_sdpa_backend_order_alone():
    """The fast SDPA must not change PyTorch's global backend priority (dense SDPA elsewhere)."""
    before = torch._C._get_sdp_priority_order()
    cfg = LighthouseConfig(pool=2, levels=3, topk=8, tile_budget=4)
    q = torch.randn(1, 256, 2, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    kernel_lighthouse(q, q, q, cfg).sum().backward()
    assert torch._C._get_sdp_priority_order() == before


def test_deterministic_mode_gives_identical_bits():
    """Under torch.use_deterministic_algorithms(True) cuDNN attention is refused and the flash
    backend (deterministic backward in that mode) runs: two runs give the same bits."""
    cfg = LighthouseConfig(pool=4, levels=3, topk=256, tile_budget=32)
    q = torch.randn(1, 16384, 4, 64, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 16384, 2, 64, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    grad_out = torch.randn(1, 16384, 4, 64, device=DEV, dtype=torch.bfloat16)
    torch.use_deterministic_algorithms(True)
    try:
        first = _layer_with_grads(
            lambda a, b, c: kernel_lighthouse(a, b, c, cfg), q, k, v, grad_out
        )
        second = _layer_with_grads(
            lambda a, b, c: kernel_lighthouse(a, b, c, cfg), q, k, v, grad_out
        )
    finally:
        torch.use_deterministic_algorithms(False)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "tensor, value",
    [("q", float("nan")), ("k", float("inf")), ("v", float("nan")), ("v", float("inf"))],
)
def test_kernel_path_refuses_non_finite_inputs(tensor, value):
    """The kernel selection's one host sync refuses NaN or inf in q, k and v (lh_cp.ops.select.check_finite)."""
    cfg = LighthouseConfig(pool=4, levels=3, topk=16, tile_budget=4)
    q = torch.randn(1, 1024, 4, 64, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1024, 2, 64, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    {"q": q, "k": k, "v": v}[tensor][0, 700, 1, 5] = value
    with pytest.raises(ValueError, match=rf"NaN or inf in {tensor} at 1 token position"):
        kernel_lighthouse(q, k, v, cfg)


def test_rope_entries_twins_compiled():
    """rope="entries" (LIGHTHOUSE.md s.14) on the kernel path against the reference path
    (tests/rope_twins.py: entries, rows, gradients within 1e-5 in float32)."""
    from rope_twins import check_rope_twins

    check_rope_twins(DEV)
