"""Lighthouse and dense causal attention over a CP group in the head-tail layout (LIGHTHOUSE.md s.8).

Inputs are this rank's head-tail shard: q [B, 2C, H, D], k and v [B, 2C, Hkv, D], holding
global chunks r and 2W-1-r of length C each. The result is the matching shard of the
single-device output.

Lighthouse: the two chunks are processed as a batch of 2B independent sequences for pyramid,
selection, gather and scatter (tiles never straddle chunks, so each chunk's entries are the
single-device entries of its tokens); only the compressed q/k/v entries reach the exchange;
the scatter's spill past each chunk end travels as a halo (added in place); under the causal selection each
chunk also starts from the thresholds of the chunk before it (selection_carry.py).
Compression is lh_cp.ops.compress (Triton kernels on CUDA, the pure-PyTorch reference elsewhere),
with the chunk's config (LighthouseConfig.for_pieces).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.ops.attention import check_qkv
from lh_cp.ops.compress import compress, selection_carry
from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.documents import check_documents
from lh_cp.ops.rope import RopeTables, check_rope
from lh_cp.parallel.headtail.documents import shard_plan
from lh_cp.parallel.headtail.exchange import exchange_attention
from lh_cp.parallel.headtail.halo import add_halos
from lh_cp.parallel.headtail.sharding import chunk_owner, local_chunk_ids
from lh_cp.parallel.selection_carry import preceding_thresholds


def chunk_config(cfg: LighthouseConfig, n_global: int, world: int) -> LighthouseConfig:
    """The config that selects inside one of the 2W head-tail chunks of n_global tokens as
    `cfg` does on the whole sequence (LighthouseConfig.for_pieces)."""
    return cfg.for_pieces(n_global, 2 * world, "each head-tail chunk")


def _to_exchange_layout(x: torch.Tensor, batch: int) -> torch.Tensor:
    """Per-chunk entries [2B, H, S, D] (row 2b + slot) -> [B, H, 2S, D], the two chunks along
    the sequence in local order (the exchange's layout): of heads-outer entries a view, and at
    B = 1 a contiguous one. For B > 1 its batch and head strides are swapped; it is copied then
    (as before the heads-outer layout): the block kernels have been run on GPUs only with
    contiguous blocks."""
    _, heads, length, dim = x.shape
    return (
        x.unflatten(0, (batch, 2))
        .transpose(1, 2)
        .reshape(batch, heads, 2 * length, dim)
        .contiguous()
    )


def _from_exchange_layout(x: torch.Tensor) -> torch.Tensor:
    """[B, H, 2S, D] -> [2B, H, S, D] (row 2b + slot): a view at B = 1, which the scatter
    reads with its strides."""
    batch, heads, rows, dim = x.shape
    return x.unflatten(2, (2, rows // 2)).transpose(1, 2).reshape(2 * batch, heads, rows // 2, dim)


def chunk_tables(rope: RopeTables | None, q: torch.Tensor) -> RopeTables | None:
    """The shard's checked rotation tables (check_rope: [B, 2C, D/2]) as chunk rows
    [2B, C, D/2], row 2b + slot, as q's chunks are; None stays None."""
    if rope is None:
        return None
    batch, n_local = q.shape[:2]
    cos, sin = (t.reshape(2 * batch, n_local // 2, t.shape[-1]) for t in rope)
    return cos, sin


def chunk_preceding(
    q_chunks: torch.Tensor,
    k_chunks: torch.Tensor,
    v_chunks: torch.Tensor,
    local_cfg: LighthouseConfig,
    group: dist.ProcessGroup,
) -> torch.Tensor | None:
    """The causal selection's thresholds each of this rank's two chunks starts from (chunks as
    batch rows [2B, C, ...], row 2b + slot) -> [2B, H, L-1, 2]; None for a selection without
    thresholds (selection_carry.py)."""
    if not local_cfg.uses_thresholds:
        return None
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    # [2B, H, L-1, 2] (row 2b + slot) -> chunk-major [2, B, H, L-1, 2] and back
    carry = (
        selection_carry(q_chunks, k_chunks, v_chunks, local_cfg)
        .unflatten(0, (q_chunks.shape[0] // 2, 2))
        .transpose(0, 1)
    )
    preceding = preceding_thresholds(
        carry.contiguous(),
        list(local_chunk_ids(rank, world)),
        lambda c: chunk_owner(c, world),
        group,
    )
    return preceding.transpose(0, 1).flatten(0, 1)


def lighthouse_attention_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    group: dist.ProcessGroup,
    exchange: str = "allgather",
    rope: RopeTables | None = None,
) -> torch.Tensor:
    """Lighthouse attention of this rank's head-tail shard: q [B, 2C, H, D] -> [B, 2C, H, D].
    `rope` (cfg.rope = "entries"): the shard's (cos, sin) tables (check_rope); entries are
    rotated where they are compressed, so the exchange carries rotated entries as before."""
    check_qkv(q, k, v)
    rope = check_rope(rope, cfg, q)
    batch, n_local, heads, dim = q.shape
    world = dist.get_world_size(group)
    if n_local % 2 != 0:
        raise ValueError(
            f"a head-tail shard holds two equal chunks: local length {n_local} must be even"
        )
    chunk = n_local // 2
    local_cfg = chunk_config(cfg, n_local * world, world)

    # Chunks as batch rows: [B, 2C, H, D] -> [2B, C, H, D], row 2b + slot.
    q_chunks = q.reshape(2 * batch, chunk, heads, dim)
    k_chunks = k.reshape(2 * batch, chunk, *k.shape[2:])
    v_chunks = v.reshape(2 * batch, chunk, *v.shape[2:])
    preceding = chunk_preceding(q_chunks, k_chunks, v_chunks, local_cfg, group)
    rope_chunks = chunk_tables(rope, q)
    # Heads-outer entries: the exchange layout below is then a view (at B = 1 no copy either
    # way, forward or backward), not a transpose of every entry tensor.
    entries = compress(
        q_chunks,
        k_chunks,
        v_chunks,
        local_cfg,
        preceding=preceding,
        heads_outer=True,
        rope=rope_chunks,
    )  # [2B, H, S_c, D], heads-outer

    out_entries = exchange_attention(
        _to_exchange_layout(entries.q, batch),
        _to_exchange_layout(entries.k, batch),
        _to_exchange_layout(entries.v, batch),
        group,
        exchange,
    )  # [B, H, 2 S_c, D]
    out_entries = _from_exchange_layout(out_entries)  # [2B, H, S_c, D]

    # Each chunk's C rows and, apart, its c_L - 1 spill rows past the end, which travel as a
    # halo to the next chunk and are added to its first rows there.
    spill = local_cfg.coarsest_span - 1
    rows, spill_rows = entries.deliver(out_entries, spill)  # [2B, C, H, D], [2B, c_L - 1, H, D]
    if spill > 0:
        rows = add_halos(rows, spill_rows, group)
    return rows.reshape(batch, n_local, heads, dim)


def causal_attention_cp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    exchange: str = "allgather",
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense causal attention of this rank's head-tail shard: q [B, 2C, H, D] -> [B, 2C, H, D].

    The levels=1 case of Lighthouse: every token is an entry, so the same exchange runs on the
    uncompressed K/V (with Hkv heads: GQA is resolved inside the block attention).
    documents: the global boundaries (lh_cp/ops/documents.py), the same on every rank; each
    document then attends only to itself (headtail/documents.py).
    """
    check_qkv(q, k, v)
    batch, n_local, heads, dim = q.shape
    if n_local % 2 != 0:
        raise ValueError(
            f"a head-tail shard holds two equal chunks: local length {n_local} must be even"
        )
    plan = None
    if documents is not None:
        world = dist.get_world_size(group)
        bounds = check_documents(documents, batch, n_local * world, q.device)
        plan = shard_plan(bounds, batch, n_local * world, dist.get_rank(group), world, q.device)
    out = exchange_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), group, exchange, plan
    )  # [B, H, 2C, D]
    return out.transpose(1, 2)
