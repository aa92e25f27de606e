"""Closed-form bytes each rank sends per attention layer under CP (forward and backward).

The categories are those transport.SentBytes records, so a test can compare this accounting
with what the code actually sends. Conventions (they follow the implementation):
- K and V travel in the activation dtype; gradients dK/dV are accumulated and sent in float32
  (float64 for float64 activations), see ring.py.
- Ring: W - 1 K/V hops forward, W - 1 again in backward (K/V are not kept), and W dK/dV hops
  (the accumulator returns to its owner). All-gather: W - 1 shares forward, W - 1 gradient
  shares in the reduce-scatter (ring-algorithm volume), and no K/V traffic in backward.
- Lighthouse exchanges compressed entries of every *query* head (selection is per query head,
  LIGHTHOUSE.md s.3), S_c per chunk; dense attention exchanges tokens of the Hkv K/V heads.
- Halo (Lighthouse only): each spill is c_L - 1 positions of the output, activation dtype; an
  interior rank sends two per direction, the first and last rank one (see halo.py).
- The causal selection (LIGHTHOUSE.md s.11) also all-gathers float32 thresholds, [B, H, L-1, 2]
  per chunk (selection_carry.py); the paper's selection sends none.

`python -m lh_cp.parallel.headtail.traffic [--world 8] [--heads 8] ...` prints the table of docs/context_parallel.md
(Lighthouse versus dense, an interior rank; MiB = 2**20 bytes).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from lh_cp.ops.config import LighthouseConfig
from lh_cp.parallel.headtail.attention import chunk_config
from lh_cp.parallel.headtail.exchange import exchange_function


@dataclass(frozen=True)
class CommBytes:
    """Bytes one rank sends for one layer, by category (SentBytes category names)."""

    kv_forward: int = 0
    kv_backward: int = 0
    dkv_backward: int = 0
    halo_forward: int = 0
    halo_backward: int = 0
    selection_thresholds: int = 0

    @property
    def forward(self) -> int:
        return self.kv_forward + self.halo_forward + self.selection_thresholds

    @property
    def backward(self) -> int:
        return self.kv_backward + self.dkv_backward + self.halo_backward

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def nonzero(self) -> dict[str, int]:
        """Categories with traffic, as SentBytes.by_category lists them."""
        return {name: value for name, value in asdict(self).items() if value}


def _grad_bytes(dtype_bytes: int) -> int:
    return 8 if dtype_bytes == 8 else 4


def _exchange_bytes(
    block_elements: int, world: int, dtype_bytes: int, exchange: str
) -> dict[str, int]:
    """Traffic of one exchange of a K+V block of `block_elements` elements per rank."""
    exchange_function(exchange)  # a known exchange
    if world == 1:
        return {}
    grad = _grad_bytes(dtype_bytes)
    if exchange == "ring":
        return {
            "kv_forward": (world - 1) * block_elements * dtype_bytes,
            "kv_backward": (world - 1) * block_elements * dtype_bytes,
            "dkv_backward": world * block_elements * grad,
        }
    return {
        "kv_forward": (world - 1) * block_elements * dtype_bytes,
        "dkv_backward": (world - 1) * block_elements * grad,
    }


def lighthouse_cp_bytes(
    n: int,
    world: int,
    rank: int,
    cfg: LighthouseConfig,
    *,
    batch: int,
    heads: int,
    head_dim: int,
    dtype_bytes: int,
    exchange: str,
) -> CommBytes:
    """Bytes rank `rank` of `world` sends in one Lighthouse layer (forward + backward) at length n."""
    local_cfg = chunk_config(cfg, n, world)
    chunk = n // (2 * world)
    entries_per_chunk = local_cfg.selected_length(chunk)  # S_c
    block = 2 * batch * heads * 2 * entries_per_chunk * head_dim  # K and V of two chunks
    counts = _exchange_bytes(block, world, dtype_bytes, exchange)
    spill = local_cfg.coarsest_span - 1
    if spill and world > 1:
        messages = int(rank < world - 1) + int(rank > 0)
        halo = messages * batch * spill * heads * head_dim * dtype_bytes
        counts["halo_forward"] = halo
        counts["halo_backward"] = halo
    if cfg.uses_thresholds and world > 1:
        # selection_carry.py: float32 [B, H, L-1, 2] per chunk, two chunks, all-gathered.
        counts["selection_thresholds"] = (world - 1) * 2 * batch * heads * (cfg.levels - 1) * 2 * 4
    return CommBytes(**counts)


def dense_cp_bytes(
    n: int, world: int, *, batch: int, kv_heads: int, head_dim: int, dtype_bytes: int, exchange: str
) -> CommBytes:
    """Bytes each rank sends in one dense causal layer under CP (forward + backward) at length n."""
    if n % (2 * world) != 0:
        raise ValueError(f"N must be a multiple of 2 * W for head-tail sharding: N={n}, W={world}")
    block = 2 * batch * kv_heads * (n // world) * head_dim
    return CommBytes(**_exchange_bytes(block, world, dtype_bytes, exchange))


MIB = 2**20


def _length_label(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def traffic_table(
    lengths: list[int],
    world: int,
    cfg: LighthouseConfig,
    *,
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
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
        gather = lighthouse_cp_bytes(
            n, world, rank, cfg, heads=heads, exchange="allgather", **shape
        )
        dense = dense_cp_bytes(n, world, kv_heads=kv_heads, exchange="ring", **shape)
        rows.append(
            f"| {_length_label(n)} | {cfg.selected_length(n)} | {ring.forward / MIB:.1f} MiB | "
            f"{ring.total / MIB:.1f} MiB "
            f"| {gather.total / MIB:.1f} MiB | {dense.forward / MIB:.1f} MiB | {dense.total / MIB:.1f} MiB "
            f"| {dense.total / ring.total:.1f}x |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=8, help="CP degree W")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024]
    )
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
    cfg = LighthouseConfig(
        pool=args.pool, levels=args.levels, topk=args.topk, tile_budget=args.tile_budget
    )
    print(
        f"Bytes sent by one interior rank per attention layer, forward and backward; W={args.world}, "
        f"B={args.batch}, H={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, {args.dtype_bytes}-byte "
        f"activations, float32 gradients; Lighthouse pool={cfg.pool}, levels={cfg.levels}, topk={cfg.topk}, "
        f"tile_budget={cfg.tile_budget}."
    )
    print()
    print(
        traffic_table(
            args.lengths,
            args.world,
            cfg,
            batch=args.batch,
            heads=args.heads,
            kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            dtype_bytes=args.dtype_bytes,
        )
    )


if __name__ == "__main__":
    main()
