"""Closed-form bytes one rank sends per attention layer, plain vs compressed Ulysses.

Counts follow the implementations (forward and backward of one layer, per rank):
- An all-to-all of a tensor of E elements per rank (E divisible by W) sends (W-1)/W of it;
  the rank's own share stays local.
- Plain Ulysses (ulysses.py on DeepSpeed's DistributedAttention): forward sends q [B, C, H, D],
  k and v [B, C, Hkv', D] and the output [B, C, H, D] (W * C tokens of H/W heads), backward
  the gradients of the same four tensors, all in the activation dtype. Hkv' is the kv head
  count after the lcm(Hkv, W) repeat that ulysses.py applies when W does not divide Hkv.
- Compressed Ulysses (ulysses_compressed.py): forward sends the q, k, v entries and the output
  entries [B, H, S_c, D] each (entries are per query head), backward their gradients, in the
  activation dtype; plus the halo: c_L - 1 output rows [B, c_L - 1, H, D] from every rank but
  the last forward, and their gradients from every rank but the first backward. The causal
  selection (LIGHTHOUSE.md s.11) adds a forward all-gather of float32 thresholds [B, H, L-1, 2]
  per shard (selection_carry.py), counted as selection_thresholds.

`python -m lh_cp.parallel.ulysses.traffic` prints the table of docs/context_parallel.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from lh_cp.ops.config import LighthouseConfig
from lh_cp.parallel.ulysses.compressed import check_heads_divisible, shard_config
from lh_cp.parallel.ulysses.plain import kv_heads_for_ulysses


@dataclass(frozen=True)
class UlyssesBytes:
    """Bytes one rank sends in one attention layer, by direction and kind."""

    alltoall_forward: int = 0
    alltoall_backward: int = 0
    halo_forward: int = 0
    halo_backward: int = 0
    selection_thresholds: int = 0

    @property
    def total(self) -> int:
        return (
            self.alltoall_forward
            + self.alltoall_backward
            + self.halo_forward
            + self.halo_backward
            + self.selection_thresholds
        )


def _check_length(n: int, world: int) -> int:
    if n % world != 0:
        raise ValueError(
            f"Ulysses shards the sequence contiguously: N={n} must be a multiple of W={world}"
        )
    return n // world


def _leaving(elements: int, world: int, dtype_bytes: int) -> int:
    """Bytes an all-to-all of `elements` per rank sends off the rank."""
    return elements * (world - 1) // world * dtype_bytes


def plain_ulysses_bytes(
    n: int, world: int, *, batch: int, heads: int, kv_heads: int, head_dim: int, dtype_bytes: int
) -> UlyssesBytes:
    """Bytes each rank sends in one layer of plain Ulysses at sequence length n."""
    shard = _check_length(n, world)
    check_heads_divisible(heads, world)
    sent_kv = kv_heads_for_ulysses(heads, kv_heads, world)
    elements = batch * shard * head_dim * (2 * heads + 2 * sent_kv)  # q, k, v, output
    per_direction = _leaving(elements, world, dtype_bytes)
    return UlyssesBytes(alltoall_forward=per_direction, alltoall_backward=per_direction)


def compressed_ulysses_bytes(
    n: int,
    world: int,
    rank: int,
    cfg: LighthouseConfig,
    *,
    batch: int,
    heads: int,
    head_dim: int,
    dtype_bytes: int,
) -> UlyssesBytes:
    """Bytes rank `rank` sends in one layer of compressed Ulysses at sequence length n.

    Raises ValueError for the same shapes compressed_ulysses_attention rejects.
    """
    shard = _check_length(n, world)
    check_heads_divisible(heads, world)
    local_cfg = shard_config(cfg, shard, world)
    entries = local_cfg.selected_length(shard)  # S_c
    elements = 4 * batch * heads * entries * head_dim  # q, k, v and output entries
    per_direction = _leaving(elements, world, dtype_bytes)
    spill = batch * (local_cfg.coarsest_span - 1) * heads * head_dim * dtype_bytes
    return UlyssesBytes(
        alltoall_forward=per_direction,
        alltoall_backward=per_direction,
        halo_forward=spill if rank < world - 1 else 0,
        halo_backward=spill if rank > 0 else 0,
        selection_thresholds=(world - 1) * batch * heads * (cfg.levels - 1) * 2 * 4
        if cfg.uses_thresholds
        else 0,
    )


def traffic_table(
    lengths: tuple[int, ...] = (131072, 262144, 524288, 1048576),
    world: int = 8,
    cfg: LighthouseConfig | None = None,
    *,
    batch: int = 1,
    heads: int = 8,
    kv_heads: int = 8,
    head_dim: int = 128,
    dtype_bytes: int = 2,
) -> str:
    """Markdown table: MiB per rank per layer (forward + backward), plain vs compressed.

    The compressed column is an interior rank (it sends the halo both ways, the most of any rank).
    """
    cfg = cfg or LighthouseConfig(pool=4, levels=3, topk=2048, tile_budget=128)
    mib = 2.0**20
    rows = [
        "| N | tokens per rank C | entries per rank S_c | plain Ulysses MiB | compressed MiB | compressed / plain |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in lengths:
        plain = plain_ulysses_bytes(
            n,
            world,
            batch=batch,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            dtype_bytes=dtype_bytes,
        ).total
        compressed = compressed_ulysses_bytes(
            n, world, 1, cfg, batch=batch, heads=heads, head_dim=head_dim, dtype_bytes=dtype_bytes
        ).total
        shard = n // world
        entries = shard_config(cfg, shard, world).selected_length(shard)
        label = f"{n >> 20}M" if n % 2**20 == 0 else f"{n >> 10}K"
        rows.append(
            f"| {label} | {shard} | {entries} | {plain / mib:.1f} | {compressed / mib:.1f} | {compressed / plain:.3f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(traffic_table())
