"""Kernel and reference twins of compression agree with RoPE at pooled entries
(LighthouseConfig.rope = "entries", docs/LIGHTHOUSE.md s.14).

`check_rope_twins(device)`: compress_kernels (Triton selection and gather, then the entry
rotation at each entry's last token, computed there from the kernel selection's start and
level) against compress_reference (the rotation at Selection.end - 1), on tiny shapes with GQA
and per-row tables: the entries (heads-outer kept heads-outer by the rotation), the delivered
rows and the gradients of q, k, v agree within 1e-5 absolute + 1e-5 relative in float32 (only
the order of float32 sums of up to c_L terms differs; values are O(1)).

Imported by the GPU tests; run as a script under TRITON_INTERPRET=1 it checks the same on CPU
through Triton's interpreter (tests/test_rope_entries.py).
"""

from __future__ import annotations

import torch

from lh_cp import LighthouseConfig
from lh_cp.model.transformer import rope_tables
from lh_cp.ops.compress import compress_kernels, compress_reference

# (pool, levels, topk, tile_budget, N, H, Hkv, D): one tiny GQA case (the interpreter is slow)
CASES = [(2, 3, 4, 2, 16, 4, 2, 8)]
BATCH = 2


def _run(compress, q, k, v, cfg, rope, grad_rows, **kwargs):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    entries = compress(q, k, v, cfg, rope=rope, **kwargs)
    rows, _ = entries.deliver(entries.q * 0.5 + entries.k * entries.v)
    ((rows * grad_rows).sum() + entries.q.sum() + (entries.k**2).sum()).backward()
    return entries, [entries.q, entries.k, entries.v, rows, q.grad, k.grad, v.grad]


def check_rope_twins(device: str) -> None:
    for pool, levels, topk, budget, n, heads, kv_heads, dim in CASES:
        cfg = LighthouseConfig(
            pool=pool, levels=levels, topk=topk, tile_budget=budget, rope="entries"
        )
        gen = torch.Generator().manual_seed(n + levels)
        q = torch.randn(BATCH, n, heads, dim, generator=gen).to(device)
        k, v = (torch.randn(BATCH, n, kv_heads, dim, generator=gen).to(device) for _ in "kv")
        grad_rows = torch.randn(BATCH, n, heads, dim, generator=gen).to(device)
        positions = torch.stack([torch.arange(n), torch.arange(n).flip(0) * 2]).to(device)
        rope = rope_tables(positions, dim, 100.0, torch.float32)  # [B, N, D/2] each
        entries, got = _run(compress_kernels, q, k, v, cfg, rope, grad_rows, heads_outer=True)
        s = entries.q.shape[2]
        for x in (entries.q, entries.k):  # the rotation keeps the heads-outer layout
            assert x.stride()[:2] == (s * dim, BATCH * s * dim), x.stride()
        _, want = _run(compress_reference, q, k, v, cfg, rope, grad_rows)
        names = ("q entries", "k entries", "v entries", "rows", "dq", "dk", "dv")
        for name, a, b in zip(names, got, want):
            torch.testing.assert_close(
                a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
            )


if __name__ == "__main__":
    check_rope_twins("cpu")
    print("rope twins agree")
