"""Lighthouse (or dense) attention as the local attention of DeepSpeed-Ulysses.

`deepspeed.sequence.layer.DistributedAttention` all-to-alls q, k, v from contiguous sequence
shards [B, C, H, D] to head groups [B, W * C, H/W, D], calls a local attention on the full
sequence of those heads, and all-to-alls the output back. Lighthouse works per head (GQA:
query head h reads kv head h // (H / Hkv)), so running it on a head group is exactly the
single-device computation for those heads.

Layouts: this wrapper uses the batch-first layout, batch_dim_idx=0, scatter_idx=2 (heads)
and gather_idx=1 (sequence). DistributedAttention splits the kv heads into W equal groups
and needs Hkv >= W; when Hkv is not a multiple of W the kv heads are first repeated to
lcm(Hkv, W) heads, which keeps every query head on the rank of its kv head (H is a
multiple of both, hence of the lcm).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from lh_cp.ops.attention import check_qkv, single_device_causal, single_device_lighthouse
from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.rope import RopeTables, check_rope
from lh_cp.parallel.ulysses.compressed import check_heads_divisible
from lh_cp.parallel.ulysses.sharding import ulysses_unshard


class LocalAttention(nn.Module):
    """What each rank runs on its head group: q [B, N, h, D], k/v [B, N, hkv, D] -> [B, N, h, D].

    cfg None means dense causal attention (dense layers, the recovery stage). After the
    all-to-all a rank holds the whole sequence of its heads, so documents (the global
    boundaries, the same on every rank) are those of the single-device call, and so are the
    rotation tables `rope` of the whole sequence (cfg.rope = "entries").
    """

    def __init__(self, cfg: LighthouseConfig | None) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        documents: torch.Tensor | None = None,
        rope: RopeTables | None = None,
    ) -> torch.Tensor:
        if self.cfg is None:
            return single_device_causal(q, k, v, documents)
        return single_device_lighthouse(q, k, v, self.cfg, documents, rope)


def kv_heads_for_ulysses(heads: int, kv_heads: int, world: int) -> int:
    """kv heads sent through the all-to-all: Hkv when W divides it, else lcm(Hkv, W)."""
    return kv_heads if kv_heads % world == 0 else math.lcm(kv_heads, world)


class UlyssesAttention(nn.Module):
    """DeepSpeed DistributedAttention around Lighthouse (cfg) or dense causal attention (cfg None).

    forward(q [B, C, H, D], k/v [B, C, Hkv, D]) -> [B, C, H, D]: rank r holds tokens
    [r*C, (r+1)*C) of the sequence and gets that shard of the single-device result.
    Needs deepspeed.comm initialised (deepspeed.init_distributed(), or deepspeed.initialize).
    """

    def __init__(self, cfg: LighthouseConfig | None, group: dist.ProcessGroup) -> None:
        super().__init__()
        # Imported here so the rest of lh_cp.parallel works without DeepSpeed installed.
        import deepspeed.comm
        from deepspeed.sequence.layer import DistributedAttention

        if not deepspeed.comm.is_initialized():
            raise RuntimeError(
                "UlyssesAttention runs DeepSpeed's all-to-all, which needs deepspeed.comm: call "
                "deepspeed.init_distributed(dist_backend=...) (or deepspeed.initialize) first"
            )
        self.cfg, self.group = cfg, group
        self.inner = DistributedAttention(LocalAttention(cfg), group, scatter_idx=2, gather_idx=1)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        documents: torch.Tensor | None = None,
        rope: RopeTables | None = None,
    ) -> torch.Tensor:
        """`rope` (cfg.rope = "entries"): the (cos, sin) tables of this rank's shard; each head
        group holds the whole sequence, so the tables are all-gathered (no gradient: they are
        constants of the positions) and the local layer gets the whole sequence's."""
        check_qkv(q, k, v)
        rope = check_rope(rope, self.cfg, q)  # [B, C, D/2] each, or None
        world = dist.get_world_size(self.group)
        heads, kv_heads = q.shape[2], k.shape[2]
        check_heads_divisible(heads, world)
        if self.cfg is not None:
            self.cfg.tile_size(q.shape[1] * world)  # the global rules, before any communication
        sent_kv = kv_heads_for_ulysses(heads, kv_heads, world)
        if sent_kv != kv_heads:
            k = k.repeat_interleave(sent_kv // kv_heads, dim=2)  # [B, C, lcm(Hkv, W), D]
            v = v.repeat_interleave(sent_kv // kv_heads, dim=2)
        if rope is not None:
            rope = tuple(ulysses_unshard(t.contiguous(), self.group, dim=1) for t in rope)
        return self.inner(q, k, v, batch_dim_idx=0, documents=documents, rope=rope)


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig | None,
    group: dist.ProcessGroup,
    documents: torch.Tensor | None = None,
    rope: RopeTables | None = None,
) -> torch.Tensor:
    """Functional UlyssesAttention: q [B, C, H, D], k/v [B, C, Hkv, D] -> [B, C, H, D];
    documents: the global boundaries (Lighthouse: LIGHTHOUSE.md s.12 on the whole sequence);
    rope: the shard's rotation tables (cfg.rope = "entries", LIGHTHOUSE.md s.14)."""
    return UlyssesAttention(cfg, group)(q, k, v, documents, rope)
