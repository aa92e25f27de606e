"""RoPE at pooled entries (LighthouseConfig.rope = "entries", docs/LIGHTHOUSE.md s.14) on one
device: the entries against the model's rotation and a loop twin, the layer against the loop
twin of tests/naive_lighthouse.py (with and without packed documents), gradients, the model,
and the errors of bad input. Float64 comparisons with the loop twin use 1e-12 (only summation
order differs); level-1 entries and levels=1 are compared bit for bit (the same float ops)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from naive_lighthouse import naive_lighthouse, naive_lighthouse_documents, naive_rotated
from triton_interpreter import run_under_triton_interpreter

from lh_cp import LighthouseConfig, lighthouse_attention
from lh_cp.model.transformer import ModelConfig, Transformer, apply_rope, rope_tables
from lh_cp.ops.attention import attend_selected
from lh_cp.ops.compress import compress
from lh_cp.ops.select import select

# p=2, L=3: c_L = 4; N = 32, T = 8 (topk 8, b 2): 4 tiles
CFG = dict(pool=2, levels=3, topk=8, tile_budget=2)
NAIVE = dict(pool=2, levels=3, topk=8, budget=2)
B, N, H, HKV, D = 2, 32, 4, 2, 8


def _qkv(seed: int, dtype=torch.float64, n: int = N):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(B, n, heads, D, generator=gen, dtype=torch.float64).to(dtype)
        for heads in (H, HKV, HKV)
    ]


def _tables(positions: torch.Tensor, dtype=torch.float64):
    # a small theta so that neighbouring positions differ visibly in every pair
    return rope_tables(positions, D, 100.0, dtype)


def _document_positions(bounds: list[int], n: int) -> torch.Tensor:
    """[B, n] positions restarting at every document start (data.positions = "document")."""
    flat = torch.empty(bounds[-1], dtype=torch.int64)
    for a, z in zip(bounds[:-1], bounds[1:]):
        flat[a:z] = torch.arange(z - a)
    return flat.view(-1, n)


def test_level1_entries_are_the_models_rotated_tokens_and_coarse_entries_the_loop_twin():
    """With one fixed selection: every level-1 q/k entry of rope="entries" equals the token the
    model's apply_rope rotates, bit for bit (float32); every coarse entry equals the mean of
    its unrotated tokens rotated at its last token (loop twin, float64: 1e-12); v is the
    unrotated mean in both modes."""
    for dtype in (torch.float32, torch.float64):
        q, k, v = _qkv(0, dtype)
        cos, sin = _tables(torch.arange(N) + 5, dtype)
        cfg = LighthouseConfig(**CFG, rope="entries")
        sel = select(q, k, cfg)
        got = compress(q, k, v, cfg, selection=sel, rope=(cos, sin))
        rotated = compress(
            apply_rope(q, cos, sin),
            apply_rope(k, cos, sin),
            v,
            LighthouseConfig(**CFG),
            selection=sel,
        )
        tokens = sel.level == 1  # [B, H, S]
        assert tokens.any() and (~tokens).any()
        assert torch.equal(got.q[tokens], rotated.q[tokens])
        assert torch.equal(got.k[tokens], rotated.k[tokens])
        assert torch.equal(got.v, rotated.v)
        if dtype != torch.float64:
            continue
        table = (cos.expand(B, N, -1), sin.expand(B, N, -1))
        for b in range(B):
            for h in range(H):
                for j in range(sel.start.shape[2]):
                    s, e = int(sel.start[b, h, j]), int(sel.end[b, h, j])
                    want_q = naive_rotated(q[b, s:e, h].mean(0), b, e, table)
                    want_k = naive_rotated(k[b, s:e, h // (H // HKV)].mean(0), b, e, table)
                    torch.testing.assert_close(got.q[b, h, j], want_q, rtol=1e-12, atol=1e-12)
                    torch.testing.assert_close(got.k[b, h, j], want_k, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("selection", ["tile_topk", "causal"])
def test_layer_equals_the_loop_twin(selection):
    """The whole layer with per-row positions (GQA), against naive_lighthouse with the same
    tables (float64, 1e-12); both select by the norms of the unrotated q and k."""
    q, k, v = _qkv(1)
    positions = torch.stack([torch.arange(N), torch.arange(N) * 3 + 7])  # [B, N]
    cos, sin = _tables(positions)
    cfg = LighthouseConfig(**CFG, selection=selection, rope="entries")
    got = lighthouse_attention(q, k, v, cfg, rope=(cos, sin))
    want, _ = naive_lighthouse(q, k, v, **NAIVE, selection=selection, rope=(cos, sin))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # and it is not the rope="tokens" layer: coarse entries differ
    tokens = lighthouse_attention(
        apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, LighthouseConfig(**CFG)
    )
    assert (got - tokens).abs().max() > 1e-3


def test_tokens_mode_rotation_is_the_rotate_half_formula_bit_for_bit():
    """rope="tokens" is today's layer: the model's apply_rope (now lh_cp.ops.rope.rotate) is the
    rotate-half formula written out, bit for bit, for shared and per-row tables (bf16 too)."""
    for dtype in (torch.float32, torch.bfloat16):
        q = _qkv(7, dtype)[0]
        for positions in (torch.arange(N), torch.stack([torch.arange(N), torch.arange(N) + 3])):
            cos, sin = _tables(positions, dtype)
            c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
            x1, x2 = q[..., : D // 2], q[..., D // 2 :]
            want = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
            assert torch.equal(apply_rope(q, cos, sin), want)


def test_levels_1_is_the_tokens_layer_bit_for_bit():
    """levels=1: every entry is a token, so rope="entries" is dense attention over the model's
    rotated tokens, exactly as rope="tokens" (float32, torch.equal)."""
    q, k, v = _qkv(2, torch.float32)
    cos, sin = _tables(torch.arange(N), torch.float32)
    one = dict(pool=2, levels=1, topk=8, tile_budget=2)
    got = lighthouse_attention(q, k, v, LighthouseConfig(**one, rope="entries"), rope=(cos, sin))
    want = lighthouse_attention(
        apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, LighthouseConfig(**one)
    )
    assert torch.equal(got, want)


@pytest.mark.parametrize("selection", ["tile_topk", "causal"])
def test_documents_with_positions_restarting_per_document(selection):
    """Packed documents (s.12) with positions restarting at each document: head and tail
    tokens rotated at their own position, region entries at their last token, against
    naive_lighthouse_documents (float64, 1e-12)."""
    n = 64
    bounds = [0, 5, 40, 64, 64 + 20, 128]  # window 0: 5 + 35 + 24; window 1: 20 + 44
    q, k, v = _qkv(3, n=n)
    cos, sin = _tables(_document_positions(bounds, n))  # [B, n, D/2]
    cfg = LighthouseConfig(pool=2, levels=3, topk=16, tile_budget=2, selection=selection)
    cfg = LighthouseConfig(**{**cfg.__dict__, "rope": "entries"})
    docs = torch.tensor(bounds, dtype=torch.int32)
    got = lighthouse_attention(q, k, v, cfg, documents=docs, rope=(cos, sin))
    want, _ = naive_lighthouse_documents(
        q, k, v, 2, 3, 16, 2, bounds=bounds, selection=selection, rope=(cos, sin)
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gradients_match_finite_differences_with_the_selection_fixed():
    """Gradients through pooling, the entry rotation (its backward: the inverse rotation),
    SDPA and scatter, float64 gradcheck on a tiny shape with one fixed selection."""
    n = 16
    cfg = LighthouseConfig(pool=2, levels=3, topk=4, tile_budget=2, rope="entries")
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, n, h, 4, generator=gen, dtype=torch.float64) for h in (2, 1, 1))
    cos, sin = rope_tables(torch.arange(n), 4, 10.0, torch.float64)
    sel = select(q, k, cfg)
    inputs = tuple(x.clone().requires_grad_(True) for x in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: attend_selected(a, b, c, sel, cfg, rope=(cos, sin)), inputs, fast_mode=True
    )


def test_bad_input_raises_naming_the_rule():
    q, k, v = _qkv(5)
    cos, sin = _tables(torch.arange(N))
    entries = LighthouseConfig(**CFG, rope="entries")
    with pytest.raises(ValueError, match="rope must be one of"):
        LighthouseConfig(rope="pooled")
    with pytest.raises(ValueError, match='rope="entries" needs the rotation tables'):
        lighthouse_attention(q, k, v, entries)
    with pytest.raises(ValueError, match="takes q and k already rotated"):
        lighthouse_attention(q, k, v, LighthouseConfig(**CFG), rope=(cos, sin))
    with pytest.raises(ValueError, match=r"rope cos must be \[N, D/2\] = \[32, 4\]"):
        lighthouse_attention(q, k, v, entries, rope=(cos[:-1], sin))
    with pytest.raises(ValueError, match="rope sin must be"):
        lighthouse_attention(q, k, v, entries, rope=(cos, sin[..., :2]))


def _model(rope: str, levels: int = 3) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=64)
    lighthouse = LighthouseConfig(pool=2, levels=levels, topk=8, tile_budget=2, rope=rope)
    return Transformer(cfg, lighthouse, dense_layers=(0,)).double()


def test_model_with_entries_trains_and_its_dense_mode_is_unchanged():
    """A Lighthouse-stage model with rope="entries" runs forward and backward (finite, every
    weight gets a gradient); with levels=1 it equals the rope="tokens" model bit for bit; its
    dense mode (the recovery stage) equals the rope="tokens" model's bit for bit."""
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 32, (B, N), generator=gen)
    positions = torch.arange(N)
    model, same_weights = _model("entries"), _model("tokens")
    loss, count = model(tokens, positions, targets=tokens)
    (loss / count).backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert not torch.equal(model(tokens, positions), same_weights(tokens, positions))
    assert torch.equal(
        _model("entries", levels=1)(tokens, positions),
        _model("tokens", levels=1)(tokens, positions),
    )
    model.set_attention("dense")
    same_weights.set_attention("dense")
    assert torch.equal(model(tokens, positions), same_weights(tokens, positions))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")
def test_kernel_path_equals_the_reference_under_triton_interpreter():
    """The kernel path (Triton selection and gather, then the entry rotation at the last token
    taken from the kernel selection) against the reference path: tests/rope_twins.py on CPU
    through Triton's interpreter, one tiny shape."""
    run_under_triton_interpreter(
        Path(__file__).with_name("rope_twins.py"), "rope twins agree", timeout=300
    )
