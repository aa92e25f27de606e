"""Gradient-free selection of the causal sub-sequence (LIGHTHOUSE.md s.4 and s.5; the
strictly causal option, s.11).

The algorithm is kernels/selection_reference.py (CPU, float64) or its Triton twin
kernels/selection.py; this file scores the tokens and hands them to it.
"""

from __future__ import annotations

import torch

from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.entries import Selection, check_heads
from lh_cp.ops.kernels.scores_reference import token_scores
from lh_cp.ops.kernels.selection_reference import select_from_scores
from lh_cp.ops.scorers import strided_scores


def selection_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    cfg: LighthouseConfig | None = None,
    document_bounds: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key token scores [B, H, N] (float32) of q [B, N, H, D], k [B, N, Hkv, D] by
    cfg.scorer (LIGHTHOUSE.md s.3 and s.13; no cfg: "norm"). "norm": the L2 norms, with GQA
    the key norms of kv head h // (H // Hkv) scoring query head h. "dilated" and "gla"
    (lh_cp.ops.scorers) read v [B, N, Hkv, D] too, and `document_bounds` (check_documents'
    list) when the window holds packed documents."""
    check_heads(q, k)
    if cfg is not None and cfg.scorer != "norm":
        return strided_scores(q, k, _values_for(v, cfg), cfg, document_bounds)
    heads, kv_heads = q.shape[2], k.shape[2]
    query_scores = token_scores(q)
    key_scores = token_scores(k)
    if kv_heads != heads:
        key_scores = key_scores.repeat_interleave(heads // kv_heads, dim=1)
    return query_scores, key_scores


def _values_for(v: torch.Tensor | None, cfg: LighthouseConfig) -> torch.Tensor:
    if v is None:
        raise ValueError(f"scorer={cfg.scorer!r} attends to the values: pass v to the selection")
    return v


@torch.no_grad()
def select(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: LighthouseConfig,
    v: torch.Tensor | None = None,
    preceding: torch.Tensor | None = None,
    restart: torch.Tensor | None = None,
    document_bounds: list[int] | None = None,
) -> Selection:
    """Entries chosen for q [B, N, H, D], k [B, N, Hkv, D]; sorted, int64 [B, H, S] fields.

    With GQA the key norms of kv head h // (H // Hkv) score query head h (selection is per
    query head). Scores are float32 whatever the input dtype; no gradient flows through here.
    Non-finite q or k (and v, when given) raise ValueError (check_finite). `preceding`,
    `restart`: see select_from_scores; `document_bounds`: see selection_scores.
    """
    scores = selection_scores(q, k, v, cfg, document_bounds)
    return select_from_scores(*scores, cfg, v, preceding, restart)
