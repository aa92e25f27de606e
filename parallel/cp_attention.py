"""Lighthouse and dense causal attention over a context-parallel group (LIGHTHOUSE.md s.8).

Inputs are this rank's head-tail shard: q [B, 2C, H, D], k and v [B, 2C, Hkv, D], holding
global chunks r and 2W-1-r of length C each. The result is the matching shard of the
single-device output.

Lighthouse: the two chunks are processed as a batch of 2B independent sequences for pyramid,
selection, gather and scatter (tiles never straddle chunks, so each chunk's entries are the
single-device entries of its tokens); only the compressed q/k/v entries reach the exchange;
the scatter's spill past each chunk end travels as a halo. Selection, gather and scatter run
as Triton kernels on CUDA and as the pure-PyTorch reference elsewhere (chunk_entries.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from lh_cp.attention import check_qkv
from lh_cp.config import LighthouseConfig
from lh_cp.parallel.chunk_entries import compress_chunks
from lh_cp.parallel.exchange import check_exchange, exchange_attention
from lh_cp.parallel.halo import combine_spills


def chunk_config(cfg: LighthouseConfig, n_global: int, world: int) -> LighthouseConfig:
    """The config that selects inside one chunk of N / (2W) tokens exactly as `cfg` does on N.

    Tiles of T = N * tile_budget / topk tokens must tile each chunk; the chunk config keeps T
    by scaling topk to the chunk's share, topk / (2W). Raises ValueError, naming the numbers,
    when the global rules fail or a chunk is not a whole number of tiles.
    """
    tile = cfg.tile_size(n_global)
    chunks = 2 * world
    if n_global % chunks != 0 or (n_global // chunks) % tile != 0:
        raise ValueError(
            f"context parallelism needs each chunk to be a whole number of tiles: chunk length "
            f"N / (2W) = {n_global} / {chunks} = {n_global / chunks:g} is not a multiple of the tile "
            f"size T = N * tile_budget / topk = {tile} (W={world}); since C / T = topk / "
            f"(2W * tile_budget), topk={cfg.topk} must be a multiple of 2W * tile_budget = "
            f"{chunks * cfg.tile_budget}: use a larger topk or a smaller CP degree"
        )
    return replace(cfg, topk=cfg.topk // chunks)


def _to_exchange_layout(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-chunk entries [2B, H, S, D] (row 2b + slot) -> chunk-major [2, B, H, S, D],
    contiguous (a free view for B = 1)."""
    return x.unflatten(0, (batch, 2)).transpose(0, 1).contiguous()


def _from_exchange_layout(x: torch.Tensor) -> torch.Tensor:
    """[2, B, H, S, D] -> [2B, H, S, D] (row 2b + slot)."""
    return x.transpose(0, 1).flatten(0, 1)


def lighthouse_attention_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    group: dist.ProcessGroup,
    exchange: str = "allgather",
) -> torch.Tensor:
    """Lighthouse attention of this rank's head-tail shard: q [B, 2C, H, D] -> [B, 2C, H, D]."""
    check_qkv(q, k, v)
    check_exchange(exchange)
    batch, n_local, heads, dim = q.shape
    world = dist.get_world_size(group)
    if n_local % 2 != 0:
        raise ValueError(f"a head-tail shard holds two equal chunks: local length {n_local} must be even")
    chunk = n_local // 2
    local_cfg = chunk_config(cfg, n_local * world, world)

    # Chunks as batch rows: [B, 2C, H, D] -> [2B, C, H, D], row 2b + slot.
    q_chunks = q.reshape(2 * batch, chunk, heads, dim)
    k_chunks = k.reshape(2 * batch, chunk, *k.shape[2:])
    v_chunks = v.reshape(2 * batch, chunk, *v.shape[2:])
    entries = compress_chunks(q_chunks, k_chunks, v_chunks, local_cfg)  # [2B, H, S_c, D] each

    out_entries = exchange_attention(
        _to_exchange_layout(entries.q, batch),
        _to_exchange_layout(entries.k, batch),
        _to_exchange_layout(entries.v, batch),
        group,
        exchange,
    )  # [2, B, H, S_c, D]
    out_entries = _from_exchange_layout(out_entries)  # [2B, H, S_c, D]

    # Scatter onto C + c_L positions (a multiple of c_L, as the pyramid needs): rows C ..
    # C + c_L - 2 are the spill into the next chunk, row C + c_L - 1 never receives anything.
    spill = local_cfg.coarsest_span - 1
    delivered = entries.deliver(out_entries, chunk + local_cfg.coarsest_span)
    delivered = delivered.unflatten(0, (batch, 2))  # [B, 2, C + c_L, H, D]
    if spill == 0:
        return delivered[:, :, :chunk].reshape(batch, n_local, heads, dim)
    return combine_spills(delivered, chunk, spill, group)


def causal_attention_cp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup, exchange: str = "allgather"
) -> torch.Tensor:
    """Dense causal attention of this rank's head-tail shard: q [B, 2C, H, D] -> [B, 2C, H, D].

    The levels=1 case of Lighthouse: every token is an entry, so the same exchange runs on the
    uncompressed K/V (with Hkv heads: GQA is resolved inside the block attention).
    """
    check_qkv(q, k, v)
    check_exchange(exchange)
    batch, n_local, heads, dim = q.shape
    if n_local % 2 != 0:
        raise ValueError(f"a head-tail shard holds two equal chunks: local length {n_local} must be even")
    chunk = n_local // 2

    def to_layout(x: torch.Tensor) -> torch.Tensor:  # [B, 2C, Hx, D] -> [2, B, Hx, C, D], contiguous
        return x.unflatten(1, (2, chunk)).permute(1, 0, 3, 2, 4).contiguous()

    out = exchange_attention(to_layout(q), to_layout(k), to_layout(v), group, exchange)  # [2, B, H, C, D]
    return out.permute(1, 0, 3, 2, 4).reshape(batch, n_local, heads, dim)
