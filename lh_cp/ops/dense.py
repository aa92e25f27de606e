"""Dense causal attention on one device, with or without packed documents.

Document masking (`documents=`, lh_cp/ops/documents.py): each document is its own causal
sequence. Two twins compute it (document_causal chooses):
- CUDA, fp16/bf16, where torch has torch.nn.attention.varlen.varlen_attn: that varlen kernel
  over the flattened [B * N, H, D] tokens with `documents` as cu_seqlens, causal inside each
  document (window_size=(-1, 0)); K/V heads are repeated first where the kernel takes no
  enable_gqa (torch 2.11 has none, 2.14 has it);
- everywhere else (CPU, float32 and float64): the reference, a loop over the documents calling
  causal SDPA on each one alone. A loop rather than one call with a block-diagonal causal mask:
  each document then runs exactly as it would as its own sequence (same kernel, same shapes;
  the tests compare with that), memory is the largest document's scores, not N x N, and no
  mask tensor is built.
Boundaries that hold one document per window are today's unmasked call, unchanged.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from lh_cp.ops.documents import longest_document


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA on [B, H, S, D] tensors (k, v may have fewer heads: GQA), scale 1/sqrt(D)."""
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
    )


def _varlen_kernel():
    """torch's varlen attention function, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def varlen_supported(q: torch.Tensor) -> bool:
    """Whether document-masked attention of queries like `q` [.., D] runs in torch's varlen
    kernel (flash attention: CUDA, fp16/bf16, sm80 or newer, head size a multiple of 8 up to 256)."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and torch.cuda.get_device_capability(q.device) >= (8, 0)
        and _varlen_kernel() is not None
    )


@functools.cache
def _varlen_takes_gqa() -> bool:
    """Whether varlen_attn has enable_gqa (a capability test, not a version string)."""
    return "enable_gqa" in inspect.signature(_varlen_kernel()).parameters


def _document_causal_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: torch.Tensor, longest: int
) -> torch.Tensor:
    """varlen_attn over the flattened tokens: q [B, N, H, D], k/v [B, N, Hkv, D] -> [B, N, H, D]."""
    batch, n, heads, dim = q.shape
    group = heads // k.shape[2]
    options = {}
    if group > 1 and _varlen_takes_gqa():
        options["enable_gqa"] = True
    elif group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    out = _varlen_kernel()(
        q.reshape(batch * n, heads, dim),
        k.reshape(batch * n, k.shape[2], dim),
        v.reshape(batch * n, v.shape[2], dim),
        documents,
        documents,
        longest,
        longest,
        window_size=(-1, 0),
        **options,
    )  # [B * N, H, D]
    return out.view(batch, n, heads, dim)


def _document_causal_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int]
) -> torch.Tensor:
    """Each document alone through causal SDPA: q [B, N, H, D], k/v [B, N, Hkv, D] -> [B, N, H, D]."""
    batch, n, heads, dim = q.shape
    flat = [x.reshape(batch * n, *x.shape[2:]) for x in (q, k, v)]  # [B * N, heads, D]
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # [1, heads, L, D] per document
        qd, kd, vd = (x[start:end].transpose(0, 1).unsqueeze(0) for x in flat)
        pieces.append(dense_sdpa(qd, kd, vd)[0].transpose(0, 1))  # [L, H, D]
    return torch.cat(pieces).view(batch, n, heads, dim)


def document_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: torch.Tensor, bounds: list[int]
) -> torch.Tensor:
    """Causal attention inside each document: q [B, N, H, D], k/v [B, N, Hkv, D], `documents`
    and its checked `bounds` (check_documents) -> [B, N, H, D]; the varlen kernel where it runs,
    the per-document reference elsewhere."""
    if varlen_supported(q):
        return _document_causal_varlen(q, k, v, documents, longest_document(bounds))
    return _document_causal_reference(q, k, v, bounds)
