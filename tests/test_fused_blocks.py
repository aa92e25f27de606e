"""GPU: the fused block attention (cuDNN and flash) equals the pure-PyTorch block reference.

bf16 inputs; the reference runs in float32 on the same (bf16-representable) values, so the
tolerance is bf16's: relative L2 error below 1e-2 for out, lse and all gradients.
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fused kernels)")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(params=["cudnn", "flash"])
def backend(request):
    """Select the block backend through PyTorch's global cuDNN SDPA switch, restored after."""
    was_enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(request.param == "cudnn")
    yield request.param
    torch.backends.cuda.enable_cudnn_sdp(was_enabled)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "heads, kv_heads, sq, sk", [(4, 4, 256, 256), (8, 2, 320, 320), (4, 1, 192, 448)]
)
def test_fused_block_matches_reference(backend, causal, heads, kv_heads, sq, sk):
    from lh_cp.parallel.headtail.blocks import block_backward, block_forward
    from lh_cp.parallel.headtail.fused_blocks import (
        fused_backend,
        fused_block_backward,
        fused_block_forward,
    )

    if causal and sq != sk:
        # The exchange asks for causal blocks only square (the own block): cuDNN aligns the
        # diagonal of Sq < Sk top-left, flash bottom-right (benchmarks/block_kernels.py).
        pytest.skip("causal blocks are square")
    gen = torch.Generator(device="cuda").manual_seed(heads * sq + sk)
    make = lambda h, s: torch.randn(2, h, s, 64, device="cuda", generator=gen).bfloat16()
    q, k, v = make(heads, sq), make(kv_heads, sk), make(kv_heads, sk)
    assert fused_backend(q) == backend
    out, lse = fused_block_forward(q, k, v, causal)
    ref_out, ref_lse = block_forward(q.float(), k.float(), v.float(), causal)
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape
    assert rel(out, ref_out) < 1e-2 and rel(lse, ref_lse) < 1e-2
    dout = make(heads, sq)
    grads = fused_block_backward(dout, q, k, v, ref_out, ref_lse, causal)
    delta = (dout.float() * ref_out).sum(-1)
    ref_grads = block_backward(
        dout.float(), q.float(), k.float(), v.float(), ref_lse, delta, causal
    )
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert rel(got, want) < 1e-2


def test_deterministic_mode_takes_flash():
    from lh_cp.parallel.headtail.fused_blocks import fused_backend

    q = torch.zeros(1, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    torch.use_deterministic_algorithms(True)
    try:
        assert fused_backend(q) == "flash"
    finally:
        torch.use_deterministic_algorithms(False)
    assert fused_backend(q.float()) is None
