"""Kernel and reference twins of compression (lh_cp/ops/compress.py) agree on CP chunks.

`check_chunk_twins(device)` runs both on the chunks of a head-tail shard ([2B, C] rows, chunk
config; the kernels' entries heads-outer, as the CP path stores them): the kernel selection
is identical to the reference (fields and plan), and entries,
deliveries (the chunk's C rows and its c_L - 1 spill rows) and the gradients of q, k, v and of
the entry outputs agree within 1e-5 absolute + 1e-5 relative in float32 (only the order of
float32 sums of up to c_L terms differs; values are O(1)).

Imported by the GPU tests; run as a script under TRITON_INTERPRET=1 it checks the same on CPU
through Triton's interpreter (tests/test_cp_chunk_entries.py).
"""

from __future__ import annotations

import functools

import torch

from lh_cp import LighthouseConfig
from lh_cp.ops.compress import compress_kernels, compress_reference
from lh_cp.ops.kernels.ops import select_with_plan
from lh_cp.ops.kernels.slot_plan import Plan, selection_from_fields
from lh_cp.ops.select import select
from lh_cp.parallel.headtail.attention import chunk_config

# (pool, levels, topk, tile_budget, N global, W, H, Hkv, D): spills of 3 and 15 rows, GQA, levels=1.
CASES = [
    (2, 3, 32, 2, 256, 2, 4, 2, 8),
    (4, 3, 24, 2, 384, 3, 2, 2, 16),
    (4, 2, 16, 2, 128, 2, 3, 1, 8),
    (2, 1, 16, 2, 64, 2, 2, 2, 8),
]
BATCH = 2


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def _run(compress, q, k, v, cfg, grad_rows, grad_spill):
    q, k, v = _leaves(q, k, v)
    entries = compress(q, k, v, cfg)
    out_entries = _leaves(entries.q.detach() * 0.5 + entries.k.detach() * 0.25)[0]
    rows, spill_rows = entries.deliver(out_entries, grad_spill.shape[1])
    loss = (rows * grad_rows).sum() + (spill_rows * grad_spill).sum()
    (entries.q.sum() + (entries.k * entries.v).sum() + loss).backward()
    return [
        entries.q,
        entries.k,
        entries.v,
        rows,
        spill_rows,
        q.grad,
        k.grad,
        v.grad,
        out_entries.grad,
    ]


def check_chunk_twins(device: str) -> None:
    for pool, levels, topk, budget, n, world, heads, kv_heads, dim in CASES:
        cfg = chunk_config(
            LighthouseConfig(pool=pool, levels=levels, topk=topk, tile_budget=budget), n, world
        )
        chunk, spill = n // (2 * world), cfg.coarsest_span - 1
        gen = torch.Generator().manual_seed(n + levels)
        q = torch.randn(2 * BATCH, chunk, heads, dim, generator=gen).to(device)
        k, v = (
            torch.randn(2 * BATCH, chunk, kv_heads, dim, generator=gen).to(device) for _ in range(2)
        )
        grad_rows = torch.randn(2 * BATCH, chunk, heads, dim, generator=gen).to(device)
        grad_spill = torch.randn(2 * BATCH, spill, heads, dim, generator=gen).to(device)

        ref_sel = select(q, k, cfg)
        plan, start, level, internal = select_with_plan(q, k, cfg)
        got_sel = selection_from_fields(start, level, internal, cfg)
        for field in ("start", "end", "level", "internal"):
            assert torch.equal(getattr(got_sel, field), getattr(ref_sel, field)), field
        ref_plan = Plan.from_selection(ref_sel, chunk, cfg)
        for field in ("slot_map", "level_index", "level_position"):
            assert torch.equal(getattr(plan, field), getattr(ref_plan, field)), field

        # The CP path's kernels store entries heads-outer (the exchange layout is then a view):
        # the values must not change, and the entry tensors must really be laid out so.
        heads_outer = functools.partial(compress_kernels, heads_outer=True)
        got = _run(heads_outer, q, k, v, cfg, grad_rows, grad_spill)
        s = got[0].shape[2]
        assert got[0].stride()[:2] == (s * dim, 2 * BATCH * s * dim), got[0].stride()
        want = _run(compress_reference, q, k, v, cfg, grad_rows, grad_spill)
        names = (
            "q entries",
            "k entries",
            "v entries",
            "rows",
            "spill rows",
            "dq",
            "dk",
            "dv",
            "d out entries",
        )
        for name, a, b in zip(names, got, want):
            torch.testing.assert_close(
                a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
            )


if __name__ == "__main__":
    check_chunk_twins("cpu")
    print("chunk twins agree")
