"""Triton log-sum-exp merge of two partial attention results, in one pass.

Twin: merge_reference.py beside it, same arguments and result. Attention of
one query block split over two key sets is recovered from the two partial outputs and their
LSEs (natural log of each row's softmax denominator):

    lse = log(exp(lse_a) + exp(lse_b)),  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse).

The reference takes five element-wise passes over the rows (log-add, two weights, scale,
add) plus a conversion; here every row is read once and written once, the products are
taken in float32 whatever the operands' dtypes, and the result goes straight to a
destination of any dtype: the final bf16 output of a CP layer, or a float32 running sum
while more partial results are to come (the ring at W >= 3).

Tensors [B, H, R, D] with any strides except a unit stride on D (views of chunk rows inside a
[B, H, 2S, D] buffer, the kernels' own output layouts); LSEs [B, H, R] float32, any strides.
`dest` may be `out_a` itself: each program reads its rows before it writes them. A row with
lse_a = -inf (an accumulator that has seen nothing) takes out_b whole; a row whose two LSEs
are both -inf would be 0/0 (NaN) in both twins and never occurs: a query block is only merged
with keys it sees.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lh_cp.ops.kernels.launch import check_grid

ROWS_PER_PROGRAM = 16


@triton.jit
def _merge_kernel(
    a_ptr,
    lse_a_ptr,
    b_ptr,
    lse_b_ptr,
    dest_ptr,
    heads,
    rows,
    sa_b,
    sa_h,
    sa_r,
    sla_b,
    sla_h,
    sla_r,
    sb_b,
    sb_h,
    sb_r,
    slb_b,
    slb_h,
    slb_r,
    sd_b,
    sd_h,
    sd_r,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """One program: BLOCK_R rows of one (b, h). lse_a is overwritten with the merged LSE."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(rows, BLOCK_R)
    bh = pid // blocks
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    r = ((pid % blocks) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    r_ok = r < rows
    lse_a_at = lse_a_ptr + b * sla_b + h * sla_h + r * sla_r
    lse_a = tl.load(lse_a_at, mask=r_ok, other=0.0)
    lse_b = tl.load(lse_b_ptr + b * slb_b + h * slb_h + r * slb_r, mask=r_ok, other=0.0)
    top = tl.maximum(lse_a, lse_b)
    merged = top + tl.log(1.0 + tl.exp(tl.minimum(lse_a, lse_b) - top))
    weight_a = tl.exp(lse_a - merged)[:, None]
    weight_b = tl.exp(lse_b - merged)[:, None]
    cols = tl.arange(0, BLOCK_D)
    ok = r_ok[:, None] & (cols < D)[None, :]
    part_a = tl.load(
        a_ptr + b * sa_b + h * sa_h + r[:, None] * sa_r + cols[None, :], mask=ok, other=0.0
    )
    part_b = tl.load(
        b_ptr + b * sb_b + h * sb_h + r[:, None] * sb_r + cols[None, :], mask=ok, other=0.0
    )
    out = part_a.to(tl.float32) * weight_a + part_b.to(tl.float32) * weight_b
    tl.store(
        dest_ptr + b * sd_b + h * sd_h + r[:, None] * sd_r + cols[None, :],
        out.to(dest_ptr.dtype.element_ty),
        mask=ok,
    )
    tl.store(lse_a_at, merged, mask=r_ok)


def _unit_stride(x: torch.Tensor, name: str) -> None:
    if x.stride(-1) != 1:
        raise ValueError(
            f"the merge kernel reads D contiguously: {name} has stride {x.stride(-1)} on its last dim"
        )


def merge_kernel(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    dest: torch.Tensor,
) -> None:
    """dest [B, H, R, D] <- the merge of (out_a, lse_a) and (out_b, lse_b); lse_a <- merged LSE."""
    if not (
        out_a.shape == out_b.shape == dest.shape and lse_a.shape == lse_b.shape == out_a.shape[:-1]
    ):
        raise ValueError(
            f"merge shapes disagree: out_a {tuple(out_a.shape)}, out_b {tuple(out_b.shape)}, "
            f"dest {tuple(dest.shape)}, lse_a {tuple(lse_a.shape)}, lse_b {tuple(lse_b.shape)}"
        )
    if lse_a.dtype != torch.float32 or lse_b.dtype != torch.float32:
        raise ValueError(
            f"the merge kernel takes float32 LSEs, got {lse_a.dtype} and {lse_b.dtype}"
        )
    for x, name in ((out_a, "out_a"), (out_b, "out_b"), (dest, "dest")):
        _unit_stride(x, name)
    batch, heads, rows, dim = dest.shape
    if batch * heads * rows == 0:
        return
    grid = check_grid(batch * heads * triton.cdiv(rows, ROWS_PER_PROGRAM))
    _merge_kernel[grid](
        out_a,
        lse_a,
        out_b,
        lse_b,
        dest,
        heads,
        rows,
        *out_a.stride()[:3],
        *lse_a.stride(),
        *out_b.stride()[:3],
        *lse_b.stride(),
        *dest.stride()[:3],
        D=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_R=ROWS_PER_PROGRAM,
    )
