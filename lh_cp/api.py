"""The public attention functions with their `cp=` argument: one device or a context-parallel
group. With cp=None they are lh_cp.ops.attention's single-device functions; with a ProcessGroup
they run lh_cp.parallel.ContextParallel's exchange (loaded only then, so single-device use never
imports the distributed code).

Layouts: q [B, N, H, D], k and v [B, N, Hkv, D], output [B, N, H, D]; under CP these are the
rank's shard (head-tail for exchange "allgather" or "ring", contiguous for the Ulysses
exchanges) and the result is that shard of the single-device result.
"""

from __future__ import annotations

import torch

from lh_cp.ops import attention
from lh_cp.ops.config import LighthouseConfig


def lighthouse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    cp=None,
    exchange: str = "allgather",
    documents: torch.Tensor | None = None,
    *,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Lighthouse attention (LIGHTHOUSE.md): q [B, N, H, D], k/v [B, N, Hkv, D] -> [B, N, H, D].

    cp: None (one device) or the ProcessGroup of the CP ranks. exchange: "allgather" or "ring"
    (head-tail shards, compressed K/V exchanged), "ulysses" (contiguous shards through
    DeepSpeed's DistributedAttention; needs deepspeed.comm initialised) or "ulysses_compressed"
    (contiguous shards, only the compressed entries all-to-all'd).
    documents: packed documents kept apart (LIGHTHOUSE.md s.12): int32 cumulative lengths over
    the flattened batch of whole windows (lh_cp/ops/documents.py), the same on every CP rank.
    rope: with cfg.rope = "entries" (required then, refused otherwise) q and k are unrotated
    and rope = (cos, sin) are the rotation tables of the given tokens, each [N, D/2] or
    [B, N, D/2] (under CP: of the rank's shard, in its order); each pooled q and k entry is
    rotated at the row of the last token it covers (LIGHTHOUSE.md s.14).
    """
    if cp is None:
        return attention.single_device_lighthouse(q, k, v, cfg, documents, rope)
    from lh_cp.parallel.context import ContextParallel

    return ContextParallel.for_lighthouse(cp, exchange).lighthouse(
        q, k, v, cfg, documents, rope=rope
    )


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cp=None,
    exchange: str = "allgather",
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense causal attention: q [B, N, H, D], k/v [B, N, Hkv, D] -> [B, N, H, D].

    cp: None or the CP ProcessGroup; exchange: "allgather" or "ring" (head-tail shards) or
    "ulysses" (contiguous shards); there is nothing to compress. documents: None, or the int32
    cumulative document lengths over the B * N tokens of the whole batch (lh_cp/ops/documents.py;
    under CP every rank passes the same, global tensor): each document attends only to itself.
    """
    if cp is None:
        return attention.single_device_causal(q, k, v, documents)
    from lh_cp.parallel.context import ContextParallel

    return ContextParallel.for_dense(cp, exchange).dense(q, k, v, documents)
