"""The one-pass Triton LSE merge (lh_cp/ops/kernels/merge.py) equals its reference twin
(lh_cp.parallel.headtail.blocks.merge_reference) on the layouts the CP exchange hands it.

`check_merge_twins(device)` merges partial results on: chunk rows of a [B, H, 2S, D] buffer
merged in place (the final rows of a chunk, bf16 and fp16), a bf16 accumulator into a new
float32 running sum and a float32 running sum into bf16 rows (the ring's first and last of
several merges), a block output in the kernels' [B, S, H, D] memory layout, rows whose
accumulator is empty (lse -inf: the result is the block's output exactly), odd D (72) and a
row count that is not a multiple of the kernel's rows per program.

Tolerances: the merged LSE within 4e-7 relative + 2e-7 absolute (log(1 + exp(-d)) against
torch's logaddexp: a few float32 ulps of values up to ~20); float32 destinations within 2e-6
absolute + 2e-6 relative (the weights differ by a few float32 ulps); low-precision
destinations round the same float32 value, so they agree but for rare ties at a rounding
boundary: within one ulp of the destination dtype (2**-7 relative for bf16, 2**-10 for fp16).

Imported by the GPU tests; run as a script under TRITON_INTERPRET=1 it checks the same on CPU
through Triton's interpreter (tests/test_merge_kernel.py).
"""

from __future__ import annotations

import torch

from lh_cp.ops.kernels.merge_reference import merge_reference
from lh_cp.parallel.headtail.blocks import Accumulated, block_forward, own_block_forward

ULP = {torch.float32: 2e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def _partial(gen, shape, device, dtype, bshd=False):
    """A partial output [B, H, R, D] (in [B, R, H, D] memory when bshd) and its LSE [B, H, R]."""
    batch, heads, rows, dim = shape
    if bshd:
        out = torch.randn(batch, rows, heads, dim, generator=gen).to(device, dtype).transpose(1, 2)
    else:
        out = torch.randn(batch, heads, rows, dim, generator=gen).to(device, dtype)
    lse = (torch.randn(batch, heads, rows, generator=gen) * 4 + 6).to(device)
    return out, lse


def assert_within_ulp(got, want, dtype, what):
    diff = (got.double() - want.double()).abs()
    bound = (
        ULP[dtype] * (1 + want.double().abs())
        if dtype == torch.float32
        else ULP[dtype] * want.double().abs().clamp_min(1e-3)
    )
    worst = (diff - bound).max().item()
    assert worst <= 0, (
        f"{what}: kernel and reference differ by {diff.max().item():.3e} (bound exceeded by {worst:.3e})"
    )


def _case(
    device,
    gen,
    batch,
    heads,
    rows,
    dim,
    acc_dtype,
    part_dtype,
    dest_dtype,
    in_place,
    bshd,
    empty_rows,
):
    # The accumulator: chunk rows `rows` of a two-chunk buffer [B, H, 2R, D], the second chunk.
    buffer, lse_buffer = _partial(gen, (batch, heads, 2 * rows, dim), device, acc_dtype)
    out_acc, lse_acc = buffer[:, :, rows:], lse_buffer[:, :, rows:]
    if empty_rows:
        lse_acc[:, :, : rows // 3] = float("-inf")
    part, lse_part = _partial(gen, (batch, heads, rows, dim), device, part_dtype, bshd)
    results = []
    from lh_cp.ops.kernels.merge import (
        merge_kernel,
    )  # Triton: imported where it is used, as lh_cp does

    for merge in (merge_kernel, merge_reference):
        acc, lse = out_acc.clone(), lse_acc.clone()
        dest = acc if in_place else torch.empty(acc.shape, dtype=dest_dtype, device=device)
        merge(acc, lse, part, lse_part, dest)
        results.append((dest, lse))
    (got, got_lse), (want, want_lse) = results
    what = (
        f"B={batch} H={heads} R={rows} D={dim} {acc_dtype}+{part_dtype}->{dest_dtype} "
        f"in_place={in_place} bshd={bshd}"
    )
    assert torch.isfinite(got_lse).all(), what
    lse_gap = ((got_lse - want_lse).abs() - (4e-7 * want_lse.abs() + 2e-7)).max().item()
    assert lse_gap <= 0, f"{what}: merged LSEs differ beyond the bound by {lse_gap:.3e}"
    assert_within_ulp(got, want, dest_dtype, what)
    if empty_rows:
        empty = slice(0, rows // 3)
        assert torch.equal(got[:, :, empty], part[:, :, empty].to(dest_dtype)), (
            what + ": empty accumulator rows"
        )


def check_merge_twins(device: str) -> None:
    gen = torch.Generator().manual_seed(7)
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    # (B, H, R, D, accumulator, block output, destination dtypes, in place, block output in
    # [B, S, H, D] memory, empty accumulator rows)
    cases = [
        (1, 4, 40, 64, bf16, bf16, bf16, True, False, False),
        (2, 3, 37, 72, bf16, bf16, bf16, True, True, True),
        (1, 2, 33, 16, fp16, fp16, fp16, True, False, True),
        (1, 3, 29, 72, bf16, bf16, fp32, False, False, False),
        (2, 2, 48, 64, fp32, bf16, bf16, False, True, False),
        (1, 2, 21, 40, fp32, bf16, fp32, True, False, True),
        (1, 2, 21, 40, fp32, fp32, fp32, True, False, False),
    ]
    for case in cases:
        _case(device, gen, *case)


def key_blocks(rank: int, world: int, exchange: str) -> list[tuple[int, ...]]:
    """The remote key blocks (global chunk ids, ascending within a block) that `exchange`
    hands rank `rank` of `world`, in arrival order: all-gather one block of every chunk the
    rank does not hold; ring the two chunks of rank r - 1, then r - 2, ..."""
    mine = (rank, 2 * world - 1 - rank)
    if exchange == "allgather":
        return [tuple(c for c in range(2 * world) if c not in mine)] if world > 1 else []
    return [
        (source, 2 * world - 1 - source)
        for source in ((rank - step) % world for step in range(1, world))
    ]


def accumulated_rows(q, k, v, rank: int, world: int, exchange: str):
    """The rank's two query chunks of global q [B, H, 2W*S, D] (k, v [B, Hk, 2W*S, D])
    through Accumulated over the key blocks of `exchange`: (out, lse) [B, H, 2S, ..]."""
    length = q.shape[2] // (2 * world)

    def chunks(x, ids):
        return torch.cat([x[:, :, c * length : (c + 1) * length] for c in ids], dim=2)

    mine = (rank, 2 * world - 1 - rank)
    blocks = key_blocks(rank, world, exchange)
    acc = Accumulated(
        *own_block_forward(chunks(q, mine), chunks(k, mine), chunks(v, mine)), mine, blocks
    )
    for ids in blocks:
        acc.add_remote(chunks(q, mine), torch.stack([chunks(k, ids), chunks(v, ids)]), ids, length)
    assert acc.merges_left == [0, 0] and acc.running == [None, None], (
        "a chunk missed its final merge"
    )
    return acc.out, acc.lse


def full_rows(q, k, v, rank: int, world: int):
    """The same rows of one causal attention over the whole sequence (block_forward, float64)."""
    length = q.shape[2] // (2 * world)
    out, lse = block_forward(q.double(), k.double(), v.double(), causal=True)
    rows = [slice(c * length, (c + 1) * length) for c in (rank, 2 * world - 1 - rank)]
    return torch.cat([out[:, :, r] for r in rows], dim=2), torch.cat(
        [lse[:, :, r] for r in rows], dim=2
    )


if __name__ == "__main__":
    check_merge_twins("cpu")
    print("merge twins agree")
