"""Causal SDPA on the gathered [B, H, S, D] entries through the fastest fused backend.

Measured on the H100 (benchmarks/NOTES.md): cuDNN runs forward+backward at S = 24576 in about
half the time of the flash backend, so it goes first. cuDNN has no deterministic backward;
under torch.use_deterministic_algorithms(True) PyTorch refuses it, and flash (whose backward
is deterministic in that mode) runs instead. Each backend is tried alone: `sdpa_kernel` with
`set_priority=True` was seen to leave PyTorch's global backend order changed after the block
(dense SDPA elsewhere in the process then ran ~1.7x slower), so priorities are never touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

PREFERRED_BACKENDS = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
]


def _attempt(backend: SDPBackend, q, k, v):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_causal_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention, scale 1/sqrt(D), on [B, H, S, D] tensors with equal head counts."""
    for backend in PREFERRED_BACKENDS:
        try:
            return _attempt(backend, q, k, v)
        except RuntimeError as err:  # this backend refuses these inputs (or deterministic mode)
            if "available kernel" not in str(err) and "viable backend" not in str(err):
                raise
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def backend_name(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Name of the backend sdpa_causal_fast picks for these inputs (PyTorch's own check)."""
    for backend in PREFERRED_BACKENDS:
        with sdpa_kernel([backend]):
            try:
                if SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=True)) == backend:
                    return backend.name
            except RuntimeError:
                continue
    return "default"
