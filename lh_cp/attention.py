"""Public attention functions: Lighthouse (pool, select, gather, SDPA, scatter) and dense causal.

Layouts follow the public API: q [B, N, H, D], k and v [B, N, Hkv, D], output [B, N, H, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lh_cp import kernels
from lh_cp.config import LighthouseConfig
from lh_cp.pyramid import gather_entries
from lh_cp.scatter import scatter_entries
from lh_cp.select import Selection, check_heads, select

# Exchanges of the `exchange` argument under CP. Head-tail layout (each rank holds chunks r and
# 2W-1-r, lh_cp.parallel.shard_sequence): "allgather", "ring". Contiguous layout (rank r holds
# tokens [r*C, (r+1)*C), lh_cp.parallel.ulysses_sharding), DeepSpeed-Ulysses all-to-all over
# heads: "ulysses" (DeepSpeed's DistributedAttention around the attention) and, for Lighthouse
# only, "ulysses_compressed" (only the compressed entries cross ranks).
ULYSSES_EXCHANGES = ("ulysses", "ulysses_compressed")
LIGHTHOUSE_EXCHANGES = ("allgather", "ring", *ULYSSES_EXCHANGES)
DENSE_EXCHANGES = ("allgather", "ring", "ulysses")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Shapes, dtypes and devices every attention entry point requires."""
    check_heads(q, k)
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not q.is_floating_point():
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device, got {q.device}, {k.device}, {v.device}")


def _check_exchange(exchange: str, allowed: tuple[str, ...]) -> None:
    if exchange not in allowed:
        raise ValueError(f"exchange must be one of {allowed}, got exchange={exchange!r}")


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA on [B, H, S, D] tensors (k, v may have fewer heads: GQA), scale 1/sqrt(D)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def attend_selected(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: Selection, cfg: LighthouseConfig
) -> torch.Tensor:
    """Lighthouse attention with a given selection (differentiable in q, k, v): [B, N, H, D]."""
    if kernels.available(q, k, v):  # Triton gather/scatter on CUDA; this body is the reference
        from lh_cp.kernels.ops import attend_selected as attend_selected_cuda

        return attend_selected_cuda(q, k, v, sel, cfg)
    n = q.shape[1]
    slots = sel.slots(n, cfg)  # [B, H, S] rows of the pooled pyramid
    q_entries = gather_entries(q, slots, cfg)  # [B, H, S, D]
    k_entries = gather_entries(k, slots, cfg)  # [B, H, S, D], kv head h // group
    v_entries = gather_entries(v, slots, cfg)
    # Entries are sorted by the causal key, so "key_i <= key_j" is plain position causality.
    out_entries = sdpa_causal(q_entries, k_entries, v_entries)
    return scatter_entries(out_entries, sel, n, cfg)


def lighthouse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    cp=None,
    exchange: str = "allgather",
) -> torch.Tensor:
    """Lighthouse attention (LIGHTHOUSE.md): q [B, N, H, D], k/v [B, N, Hkv, D] -> [B, N, H, D].

    The selection is computed without gradient from float32 norms; gradients flow through
    pooling, gather, SDPA and scatter. With `cp` a ProcessGroup, q/k/v are this rank's shard
    and the result is that shard of the single-device output. `exchange` "allgather" or
    "ring": head-tail shards, compressed K/V exchanged (lh_cp.parallel.cp_attention);
    "ulysses": contiguous shards through DeepSpeed's DistributedAttention (needs
    deepspeed.comm initialised); "ulysses_compressed": contiguous shards, only compressed
    entries all-to-all'd (lh_cp.parallel.ulysses_compressed).
    """
    if cp is not None:
        _check_exchange(exchange, LIGHTHOUSE_EXCHANGES)
        # Lazy imports: single-device use never loads the distributed code.
        if exchange == "ulysses":
            from lh_cp.parallel.ulysses import ulysses_attention

            return ulysses_attention(q, k, v, cfg, cp)
        if exchange == "ulysses_compressed":
            from lh_cp.parallel.ulysses_compressed import compressed_ulysses_attention

            return compressed_ulysses_attention(q, k, v, cfg, cp)
        from lh_cp.parallel.cp_attention import lighthouse_attention_cp

        return lighthouse_attention_cp(q, k, v, cfg, cp, exchange)
    check_qkv(q, k, v)
    if kernels.available(q, k, v):  # Triton scores, selection, gather, scatter on CUDA
        from lh_cp.kernels.ops import lighthouse_attention as lighthouse_attention_cuda

        return lighthouse_attention_cuda(q, k, v, cfg)
    sel = select(q.detach(), k.detach(), cfg)
    return attend_selected(q, k, v, sel, cfg)


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp=None, exchange: str = "allgather"
) -> torch.Tensor:
    """Dense causal attention in the public layout: q [B, N, H, D], k/v [B, N, Hkv, D].

    With `cp` a ProcessGroup, q/k/v are this rank's shard: head-tail for exchange "allgather"
    or "ring", contiguous for "ulysses" (see lighthouse_attention; there is nothing to compress).
    """
    if cp is not None:
        _check_exchange(exchange, DENSE_EXCHANGES)
        if exchange == "ulysses":
            from lh_cp.parallel.ulysses import ulysses_attention

            return ulysses_attention(q, k, v, None, cp)
        from lh_cp.parallel.cp_attention import causal_attention_cp

        return causal_attention_cp(q, k, v, cp, exchange)
    check_qkv(q, k, v)
    out = sdpa_causal(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
