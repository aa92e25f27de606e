"""Print bytes sent per rank per attention layer under CP: Lighthouse versus dense.

    python -m lh_cp.parallel.comm_table [--world 8] [--heads 8] [--kv-heads 8] ...

Figures come from the closed forms of comm.py (which tests/test_cp_attention.py checks against
the bytes the code actually sends) for an interior rank (the first and last ranks send one
halo message less). MiB = 2**20 bytes.
"""

from __future__ import annotations

import argparse

from lh_cp.config import LighthouseConfig
from lh_cp.parallel.comm import dense_cp_bytes, lighthouse_cp_bytes

MIB = 2**20


def _length_label(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def comm_table(
    lengths: list[int], world: int, cfg: LighthouseConfig, *, batch: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int
) -> str:
    """A markdown table, one row per sequence length."""
    rank = 1 if world > 2 else 0
    rows = [
        "| N | S selected | Lighthouse ring fwd | Lighthouse ring fwd+bwd | Lighthouse all-gather fwd+bwd "
        "| dense ring fwd | dense ring fwd+bwd | dense / Lighthouse (ring, fwd+bwd) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    shape = dict(batch=batch, head_dim=head_dim, dtype_bytes=dtype_bytes)
    for n in lengths:
        ring = lighthouse_cp_bytes(n, world, rank, cfg, heads=heads, exchange="ring", **shape)
        gather = lighthouse_cp_bytes(n, world, rank, cfg, heads=heads, exchange="allgather", **shape)
        dense = dense_cp_bytes(n, world, kv_heads=kv_heads, exchange="ring", **shape)
        rows.append(
            f"| {_length_label(n)} | {cfg.selected_length(n)} | {ring.forward / MIB:.1f} MiB | {ring.total / MIB:.1f} MiB "
            f"| {gather.total / MIB:.1f} MiB | {dense.forward / MIB:.1f} MiB | {dense.total / MIB:.1f} MiB "
            f"| {dense.total / ring.total:.1f}x |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=8, help="CP degree W")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype-bytes", type=int, default=2, help="activation bytes (2 = bf16)")
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--tile-budget", type=int, default=128)
    args = parser.parse_args(argv)
    cfg = LighthouseConfig(pool=args.pool, levels=args.levels, topk=args.topk, tile_budget=args.tile_budget)
    print(
        f"Bytes sent by one interior rank per attention layer, forward and backward; W={args.world}, "
        f"B={args.batch}, H={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, {args.dtype_bytes}-byte "
        f"activations, float32 gradients; Lighthouse pool={cfg.pool}, levels={cfg.levels}, topk={cfg.topk}, "
        f"tile_budget={cfg.tile_budget}."
    )
    print()
    print(
        comm_table(
            args.lengths, args.world, cfg, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads,
            head_dim=args.head_dim, dtype_bytes=args.dtype_bytes,
        )
    )


if __name__ == "__main__":
    main()
