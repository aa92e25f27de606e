"""Compressed Ulysses: Lighthouse whose all-to-all moves only the compressed entries.

Plain Ulysses (plain.py) all-to-alls uncompressed q, k, v and the output, so its traffic
grows with the token count C of a shard. Here each rank compresses its own contiguous shard
first (pyramid, scores, selection and gather of LIGHTHOUSE.md s.3-4 are local to a tile, and
a shard is a whole number of tiles), so only S_c entries per head travel, S_c = C / c_L +
(L-1) * pool * topk / W, a fraction of C at long context:

  rank r: q,k,v [B, C, H(kv), D] -> select + gather -> entries [B, H, S_c, D] (all heads)
  all-to-all (shards -> head groups): [B, H/W, W * S_c, D], every shard's entries of H/W heads
  causal SDPA over that full compressed sequence (shards concatenate in causal order)
  all-to-all back (head groups -> shards): [B, H, S_c, D]
  scatter onto C + c_L positions; the spill of c_L - 1 rows goes to rank r + 1 (halo).

Entries are per query head (selection is, s.3), so GQA needs only H % W == 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.ops.attention import check_qkv
from lh_cp.ops.compress import compress, entries_sdpa, selection_carry
from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.rope import RopeTables
from lh_cp.parallel.selection_carry import preceding_thresholds
from lh_cp.parallel.spill import add_to_first_rows
from lh_cp.parallel.ulysses.comm import all_to_all_rows, shift_to_next_rank


def check_heads_divisible(heads: int, world: int) -> None:
    """Ulysses gives every rank the same number of whole query heads."""
    if heads % world != 0:
        raise ValueError(
            f"Ulysses needs the query heads to be a multiple of the sequence-parallel size: "
            f"H={heads} is not a multiple of W={world}"
        )


def shard_config(cfg: LighthouseConfig, shard_len: int, world: int) -> LighthouseConfig:
    """The config that selects inside one contiguous shard of `shard_len` tokens as `cfg` does
    on N = W * shard_len (LighthouseConfig.for_pieces): each rank compresses its own shard."""
    return cfg.for_pieces(
        shard_len * world,
        world,
        "each contiguous shard (compressed Ulysses compresses it on its own rank)",
    )


def _shards_to_heads(entries: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[P, B, H, S_c, D] (this shard, all heads) -> [P, B, H/W, W * S_c, D] (all shards, my heads)."""
    world = dist.get_world_size(group)
    send = entries.unflatten(2, (world, -1)).permute(
        2, 0, 1, 3, 4, 5
    )  # [W (head group), P, B, H/W, S_c, D]
    recv = all_to_all_rows(send, group)  # [W (source shard), P, B, H/W, S_c, D]
    return recv.permute(1, 2, 3, 0, 4, 5).flatten(3, 4)


def _heads_to_shards(out: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, H/W, W * S_c, D] (all shards, my heads) -> [B, H, S_c, D] (this shard, all heads)."""
    world = dist.get_world_size(group)
    send = out.unflatten(2, (world, -1)).permute(2, 0, 1, 3, 4)  # [W (shard), B, H/W, S_c, D]
    recv = all_to_all_rows(send, group)  # [W (head group), B, H/W, S_c, D]
    return recv.permute(1, 0, 2, 3, 4).flatten(1, 2)


def compressed_ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    group: dist.ProcessGroup,
    rope: RopeTables | None = None,
) -> torch.Tensor:
    """Lighthouse attention of rank r's contiguous shard: q [B, C, H, D], k/v [B, C, Hkv, D] -> [B, C, H, D].

    The shards of the W ranks of `group`, in rank order, form the sequence of N = W * C
    tokens; the result is rank r's shard of the single-device lighthouse_attention. All shape
    rules are checked before any communication. `rope` (cfg.rope = "entries"): the shard's
    (cos, sin) tables; entries are rotated before the all-to-all (LIGHTHOUSE.md s.14).
    """
    check_qkv(q, k, v)
    batch, shard_len, heads, _ = q.shape
    world = dist.get_world_size(group)
    check_heads_divisible(heads, world)
    local_cfg = shard_config(cfg, shard_len, world)

    preceding = None
    if local_cfg.uses_thresholds:
        # The causal selection's first tile of shard r starts from shard r-1's last tile.
        carry = selection_carry(q, k, v, local_cfg).unsqueeze(0)  # [1, B, H, L-1, 2]
        preceding = preceding_thresholds(
            carry, [dist.get_rank(group)], lambda shard: (shard, 0), group
        )[0]
    local = compress(
        q, k, v, local_cfg, preceding=preceding, rope=rope
    )  # [B, H, S_c, D] each, spans local to the shard; k, v per query head
    entries = torch.stack([local.q, local.k, local.v])  # [3, B, H, S_c, D]
    q_all, k_all, v_all = _shards_to_heads(entries, group)  # each [B, H/W, W * S_c, D]
    # Shards are contiguous and each one's entries are sorted by the causal key, so the
    # concatenation in rank order is the single-device causal order.
    out_entries = _heads_to_shards(entries_sdpa(q_all, k_all, v_all), group)  # [B, H, S_c, D]

    # The shard's C rows and, apart, its c_L - 1 spill rows, which go to rank r + 1 and are
    # added to its first rows there.
    spill = local_cfg.coarsest_span - 1
    own, spill_rows = local.deliver(out_entries, spill)  # [B, C, H, D], [B, c_L - 1, H, D]
    if spill == 0:
        return own
    return add_to_first_rows(own, shift_to_next_rank(spill_rows, group))
