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
from lh_cp.ops.documents import refuse_lighthouse_documents


def lighthouse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    cp=None,
    exchange: str = "allgather",
    documents: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lighthouse attention (LIGHTHOUSE.md): q [B, N, H, D], k/v [B, N, Hkv, D] -> [B, N, H, D].

    cp: None (one device) or the ProcessGroup of the CP ranks. exchange: "allgather" or "ring"
    (head-tail shards, compressed K/V exchanged), "ulysses" (contiguous shards through
    DeepSpeed's DistributedAttention; needs deepspeed.comm initialised) or "ulysses_compressed"
    (contiguous shards, only the compressed entries all-to-all'd). documents: not supported yet
    (ValueError unless None; lh_cp/ops/documents.py refuse_lighthouse_documents).
    """
    refuse_lighthouse_documents(documents)
    if cp is None:
        return attention.single_device_lighthouse(q, k, v, cfg)
    from lh_cp.parallel.context import ContextParallel

    return ContextParallel.for_lighthouse(cp, exchange).lighthouse(q, k, v, cfg)


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
