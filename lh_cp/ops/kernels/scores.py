"""Triton token scores: per-token L2 norms in float32, in one read of q (or k).

Twin: scores_reference.py beside it (token_scores). The pooled scores of the coarser levels are the max over a
span, which is exact in any order, so they are built from the token norms with the reference's
own reduce_levels (arrays of N floats per head: a few MB, microseconds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lh_cp.ops.kernels.launch import check_grid

TOKENS_PER_PROGRAM = 64


@triton.jit
def _token_norms_kernel(
    x_ptr,
    out_ptr,
    n,
    heads,
    stride_b,
    stride_n,
    stride_h,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[b, h, t] = ||x[b, t, h, :]||_2 accumulated in float32 (sum of squares, then sqrt)."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(n, BLOCK_N)
    bh = pid // blocks
    b = bh // heads
    h = bh % heads
    rows = ((pid % blocks) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    ptr = (
        x_ptr
        + b.to(tl.int64) * stride_b
        + h.to(tl.int64) * stride_h
        + rows[:, None] * stride_n
        + cols[None, :]
    )
    x = tl.load(ptr, mask=(rows < n)[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    tl.store(out_ptr + bh.to(tl.int64) * n + rows, norm, mask=rows < n)


def token_norms(x: torch.Tensor) -> torch.Tensor:
    """x [B, N, Hx, D] (unit last stride) -> float32 [B, Hx, N] norms."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, n, heads, dim = x.shape
    out = torch.empty((batch, heads, n), dtype=torch.float32, device=x.device)
    grid = check_grid(batch * heads * triton.cdiv(n, TOKENS_PER_PROGRAM))
    _token_norms_kernel[grid](
        x,
        out,
        n,
        heads,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        D=dim,
        BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_N=TOKENS_PER_PROGRAM,
        num_warps=4,
    )
    return out
