"""Causal SDPA on the gathered [B, H, S, D] entries through the fastest fused backend.

The order below was chosen by measurement on the H100 (benchmarks/NOTES.md); PyTorch falls
back along the list when a backend cannot take the inputs. `backend_name` reports which one
PyTorch picks for given inputs, so benchmarks can record what ran.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

PREFERRED_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def sdpa_causal_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention, scale 1/sqrt(D), on [B, H, S, D] tensors with equal head counts."""
    with sdpa_kernel(PREFERRED_BACKENDS, set_priority=True):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def backend_name(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Name of the backend sdpa_causal_fast uses for these inputs (PyTorch's own choice)."""
    with sdpa_kernel(PREFERRED_BACKENDS, set_priority=True):
        choice = torch._fused_sdp_choice(q, k, v, is_causal=True)
    return SDPBackend(choice).name
