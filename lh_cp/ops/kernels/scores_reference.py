"""Pure-PyTorch twin of scores.py: the per-token L2 norms that score the selection (LIGHTHOUSE.md
s.3), computed in float32 whatever the input dtype."""

from __future__ import annotations

import torch


def token_scores(x: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norms in float32: x [B, N, Hx, D] -> [B, Hx, N]."""
    return torch.linalg.vector_norm(x.float(), dim=-1).transpose(1, 2).contiguous()
