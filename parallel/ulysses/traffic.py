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
- Compressed Ulysses with packed documents (compressed_documents.py): the all-to-alls move
  each shard's packed stream of P_i rows (not S_c entries), in uneven counts; halo and
  thresholds as above (compressed_ulysses_document_bytes).

`python -m lh_cp.parallel.ulysses.traffic` prints the table of docs/context_parallel.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

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


def compressed_ulysses_document_bytes(
    documents,
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
    """Bytes rank `rank` sends in one layer of compressed Ulysses with packed documents
    (compressed_documents.py) at window length n; documents: the batch's cumulative boundaries.
    Shard i's stream holds P_i rows (its documents' head and tail tokens and region entries,
    LIGHTHOUSE.md s.12); the all-to-alls move rows of H / W heads: forward the rank's q, k, v
    rows of the other head groups and the output rows of the other shards for its heads,
    backward their gradients (the same counts, swapped). One document per window is the
    unmasked layer (compressed_ulysses_bytes)."""
    from lh_cp.ops.documents import check_documents, is_whole_windows
    from lh_cp.parallel.ulysses.compressed_documents import shard_streams

    shard = _check_length(n, world)
    check_heads_divisible(heads, world)
    shard_config(cfg, shard, world)  # the shard rules, as the layer checks them
    shape = dict(batch=batch, heads=heads, head_dim=head_dim, dtype_bytes=dtype_bytes)
    tensor = torch.as_tensor(documents, dtype=torch.int32).cpu()
    bounds = check_documents(tensor, batch, n, tensor.device)
    unmasked = compressed_ulysses_bytes(n, world, rank, cfg, **shape)
    if is_whole_windows(bounds, batch, n) or world == 1:
        return unmasked
    streams = shard_streams(bounds, batch, n, world, cfg)
    rows = [sum(streams[b][i].length for b in range(batch)) for i in range(world)]  # P_i
    row = heads // world * head_dim * dtype_bytes  # one row of one head group
    mine, others = rows[rank], sum(rows) - rows[rank]
    # Forward: q, k, v rows to the other head groups, output rows to the other shards;
    # backward: the output's gradient rows back (mine), the q, k, v gradients back (others').
    # The halo and the thresholds are those of the unmasked layer.
    return dataclasses.replace(
        unmasked,
        alltoall_forward=(3 * (world - 1) * mine + others) * row,
        alltoall_backward=((world - 1) * mine + 3 * others) * row,
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
