"""Lighthouse attention (LIGHTHOUSE.md s.6-s.7): dense limit, causality, gradients, GQA, dtypes."""

import pytest
import torch
from naive_lighthouse import naive_lighthouse

from lh_cp import LighthouseConfig, attend_selected, causal_attention, lighthouse_attention, select
from lh_cp.ops.pyramid import gather_entries
from lh_cp.ops.scatter import scatter_entries


def qkv(batch, n, heads, kv_heads, dim, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, n, h, dim, generator=gen, dtype=torch.float64).to(dtype)
    return make(heads), make(kv_heads), make(kv_heads)


def test_levels_one_is_dense_causal_attention():
    """Property 1, float64: max abs difference <= 1e-12 (both sides run SDPA in float64)."""
    cfg = LighthouseConfig(pool=4, levels=1, topk=8, tile_budget=4)
    q, k, v = qkv(2, 96, 4, 2, 16)
    out = lighthouse_attention(q, k, v, cfg)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.repeat_interleave(2, 2).transpose(1, 2),
        v.repeat_interleave(2, 2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)
    assert (out - ref).abs().max() <= 1e-12
    assert (causal_attention(q, k, v) - ref).abs().max() <= 1e-12


@pytest.mark.parametrize(
    "pool, levels, topk, budget, n", [(2, 3, 4, 2, 64), (4, 2, 8, 4, 128), (2, 4, 2, 2, 64)]
)
def test_output_matches_naive_twin(pool, levels, topk, budget, n):
    """Float64 outputs equal the loop-by-loop twin to 1e-12 (only summation order differs)."""
    cfg = LighthouseConfig(pool=pool, levels=levels, topk=topk, tile_budget=budget)
    q, k, v = qkv(2, n, 4, 2, 8, seed=n)
    expected, _ = naive_lighthouse(q, k, v, pool, levels, topk, budget)
    assert (lighthouse_attention(q, k, v, cfg) - expected).abs().max() <= 1e-12


def _norm_preserving_change(x, positions, gen):
    """Rotate the vectors at `positions` by random orthogonal maps: new content, same norms."""
    x = x.clone()
    dim = x.shape[-1]
    for t in positions:
        for h in range(x.shape[2]):
            rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
            x[:, t, h] = x[:, t, h] @ rotation
    return x


def test_causal_in_the_data_path():
    """Property 2 (float64, bit-identical): outputs at t <= cut do not change when q, k, v after
    the cut change. q and k change with their norms kept, v arbitrarily, so the norm-based
    selection is the same and any difference would be information flowing backwards."""
    cfg = LighthouseConfig(pool=2, levels=3, topk=4, tile_budget=2)
    q, k, v = qkv(1, 128, 2, 2, 8, seed=3)
    gen = torch.Generator().manual_seed(7)
    base = lighthouse_attention(q, k, v, cfg)
    for cut in (0, 13, 31, 32, 77, 126):
        future = range(cut + 1, 128)
        q2, k2 = _norm_preserving_change(q, future, gen), _norm_preserving_change(k, future, gen)
        v2 = v.clone()
        v2[:, cut + 1 :] = torch.randn(v2[:, cut + 1 :].shape, generator=gen, dtype=torch.float64)
        out = lighthouse_attention(q2, k2, v2, cfg)
        assert torch.equal(out[:, : cut + 1], base[:, : cut + 1])
        assert not torch.equal(out[:, cut + 1 :], base[:, cut + 1 :])


def test_causal_with_selection_held_fixed():
    """Any change after the cut, norms included, leaves earlier outputs bit-identical when the
    selection is held fixed: the pooling, gather, SDPA and scatter path is causal."""
    cfg = LighthouseConfig(pool=4, levels=2, topk=8, tile_budget=4)
    q, k, v = qkv(1, 128, 2, 1, 8, seed=4)
    sel = select(q, k, cfg)
    base = attend_selected(q, k, v, sel, cfg)
    for cut in (5, 64, 100):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, cut + 1 :] *= 3.0
            x[:, cut + 1 :] += 1.0
        assert torch.equal(attend_selected(q2, k2, v2, sel, cfg)[:, : cut + 1], base[:, : cut + 1])


def test_later_tiles_never_affect_earlier_tiles():
    """Selection is per tile, so even norm-changing edits in a later tile leave every position
    before that tile's start bit-identical (the selection of a tile sees its own future)."""
    cfg = LighthouseConfig(pool=2, levels=3, topk=8, tile_budget=2)  # T = 32 at N = 128
    q, k, v = qkv(1, 128, 2, 2, 8, seed=5)
    base = lighthouse_attention(q, k, v, cfg)
    for tile_start in (32, 64, 96):
        q2, k2, v2 = (x.clone() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, tile_start:] = 5.0 * torch.randn_like(x[:, tile_start:])
        assert torch.equal(
            lighthouse_attention(q2, k2, v2, cfg)[:, :tile_start], base[:, :tile_start]
        )


def test_gradcheck_with_selection_fixed():
    """Property 5: float64 analytic gradients of q, k, v (GQA) equal finite differences."""
    cfg = LighthouseConfig(pool=2, levels=3, topk=4, tile_budget=2)
    q, k, v = qkv(1, 32, 2, 1, 4, seed=6)
    sel = select(q, k, cfg)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: attend_selected(a, b, c, sel, cfg), inputs, eps=1e-6, atol=1e-8
    )


def test_gradcheck_gather_and_scatter_separately():
    cfg = LighthouseConfig(pool=2, levels=3, topk=2, tile_budget=2)
    q, k, v = qkv(2, 32, 2, 2, 3, seed=8)
    sel = select(q, k, cfg)
    x = v.clone().requires_grad_()
    slots = sel.slots(32, cfg)
    assert torch.autograd.gradcheck(lambda t: gather_entries(t, slots, cfg), [x])
    entries = torch.randn(2, 2, sel.start.shape[-1], 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e: scatter_entries(e, sel, 32, cfg), [entries])


def test_gqa_equals_explicit_expansion():
    """Outputs equal; dk, dv of the grouped heads equal the sum over their query heads."""
    cfg = LighthouseConfig(pool=4, levels=2, topk=8, tile_budget=4)
    q, k, v = qkv(2, 128, 6, 2, 8, seed=9)
    grouped = [t.clone().requires_grad_() for t in (q, k, v)]
    expanded = [
        q.clone().requires_grad_(),
        k.repeat_interleave(3, 2).requires_grad_(),
        v.repeat_interleave(3, 2).requires_grad_(),
    ]
    out_g = lighthouse_attention(*grouped, cfg)
    out_e = lighthouse_attention(*expanded, cfg)
    assert (out_g - out_e).abs().max() <= 1e-12
    grad = torch.randn_like(out_g)
    out_g.backward(grad)
    out_e.backward(grad)
    assert (grouped[0].grad - expanded[0].grad).abs().max() <= 1e-12
    for g, e in zip(grouped[1:], expanded[1:]):
        summed = e.grad.view(2, 128, 2, 3, 8).sum(3)
        assert (g.grad - summed).abs().max() <= 1e-12


def test_bf16_close_to_fp32():
    """bf16 against float32 on the same (bf16-representable) inputs, hence the same selection:
    relative L2 error below 2e-2 for outputs and gradients (bf16 has an 8-bit mantissa)."""
    cfg = LighthouseConfig(pool=4, levels=3, topk=16, tile_budget=8)
    q, k, v = qkv(1, 1024, 4, 2, 32, dtype=torch.bfloat16, seed=10)
    low = [t.clone().requires_grad_() for t in (q, k, v)]
    high = [t.float().requires_grad_() for t in (q, k, v)]
    out_low, out_high = lighthouse_attention(*low, cfg), lighthouse_attention(*high, cfg)
    assert out_low.dtype == torch.bfloat16
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert rel(out_low, out_high) < 2e-2
    grad = torch.randn_like(out_high)
    out_low.backward(grad.bfloat16())
    out_high.backward(grad)
    for a, b in zip(low, high):
        assert rel(a.grad, b.grad) < 2e-2


@pytest.mark.parametrize("bad", ["heads", "shape", "dtype", "int"])
def test_bad_inputs_raise(bad):
    cfg = LighthouseConfig(pool=2, levels=2, topk=2, tile_budget=2)
    q, k, v = qkv(1, 16, 4, 2, 8, dtype=torch.float32)
    if bad == "heads":
        k, v = k[:, :, :1].repeat(1, 1, 3, 1), v[:, :, :1].repeat(1, 1, 3, 1)
        match = "multiple of key/value heads"
    elif bad == "shape":
        v = v[:, :8]
        match = "v must have the shape of k"
    elif bad == "dtype":
        v = v.double()
        match = "must share a dtype"
    else:
        q, k, v = (t.long() for t in (q, k, v))
        match = "floating point"
    with pytest.raises(ValueError, match=match):
        lighthouse_attention(q, k, v, cfg)


@pytest.mark.parametrize(
    "tensor, value",
    [
        ("q", float("nan")),
        ("q", float("inf")),
        ("k", float("inf")),
        ("k", float("nan")),
        ("v", float("nan")),
        ("v", float("-inf")),
    ],
)
def test_non_finite_inputs_raise_naming_the_tensor(tensor, value):
    """NaN or inf anywhere in q, k or v is refused before any attention runs (it would spread to
    almost every output row); the message names the tensor and how many entries are bad."""
    cfg = LighthouseConfig(pool=2, levels=2, topk=4, tile_budget=2)
    q, k, v = qkv(2, 64, 4, 2, 8, dtype=torch.float32)
    bad = {"q": q, "k": k, "v": v}[tensor]
    bad[1, 37, 1, 3] = value
    expected = rf"NaN or inf in {tensor} at 1 token position\(s\)$"
    with pytest.raises(ValueError, match=expected):
        lighthouse_attention(q, k, v, cfg)


def test_large_finite_inputs_pass_the_check():
    """Values near the float32 range are finite: the check takes maxima, which cannot overflow
    as a sum of many such values would."""
    cfg = LighthouseConfig(pool=2, levels=2, topk=4, tile_budget=2)
    q, k, v = qkv(1, 64, 2, 2, 8, dtype=torch.float32)
    v = v * 1e37
    assert torch.isfinite(lighthouse_attention(q, k, v, cfg)).all()


@pytest.mark.parametrize(
    "shape, named",
    [((0, 64, 2, 8), "B=0"), ((1, 0, 2, 8), "N=0"), ((1, 64, 0, 8), "H=0"), ((1, 64, 2, 0), "D=0")],
)
def test_empty_dimensions_raise_a_named_error_in_every_public_function(shape, named):
    """B, N, H or D = 0 used to fail inside amax (B = 0) or with ZeroDivisionError (H = 0)."""
    from lh_cp.ops.entries import EmptyInput

    cfg = LighthouseConfig(pool=2, levels=2, topk=8, tile_budget=2)
    q = torch.randn(shape)
    full = torch.randn(1, 64, 2, 8)
    calls = {
        "lighthouse_attention": lambda: lighthouse_attention(q, q, q, cfg),
        "causal_attention": lambda: causal_attention(q, q, q),
        "select": lambda: select(q, q, cfg),
        "attend_selected": lambda: attend_selected(q, q, q, select(full, full, cfg), cfg),
    }
    for name, call in calls.items():
        with pytest.raises(EmptyInput) as raised:
            call()
        assert f"q has shape {tuple(shape)} with {named}: attention needs" in str(raised.value), (
            name
        )
    with pytest.raises(EmptyInput, match=r"k has shape \(1, 64, 0, 8\) with Hkv=0"):
        causal_attention(full, full[:, :, :0], full[:, :, :0])
