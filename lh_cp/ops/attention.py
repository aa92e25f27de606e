"""Single-device attention: Lighthouse (compress, causal SDPA over the entries, deliver) and
dense causal attention, with or without document masking. Nothing here talks to other ranks;
the public functions with `cp=` (lh_cp/api.py) dispatch to lh_cp.parallel, and
lh_cp.parallel.ContextParallel offers the same two methods as SingleDevice below.

Layouts follow the public API: q [B, N, H, D], k and v [B, N, Hkv, D], output [B, N, H, D].

Document masking (`documents=`, lh_cp/ops/documents.py): each document is its own causal
sequence. Two twins compute it:
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
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

from lh_cp.ops.compress import Compressed, compress, entries_sdpa
from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.documents import (
    check_documents,
    is_whole_windows,
    longest_document,
    refuse_lighthouse_documents,
)
from lh_cp.ops.entries import Selection, check_heads


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


def _dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA on [B, H, S, D] tensors (k, v may have fewer heads: GQA), scale 1/sqrt(D)."""
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1]
    )


def _attend(entries: Compressed) -> torch.Tensor:
    """Causal SDPA over the entries, delivered onto the N token rows: [B, N, H, D]. Entries are
    sorted by the causal key, so "key_i <= key_j" is plain position causality."""
    return entries.deliver(entries_sdpa(entries.q, entries.k, entries.v))[0]


def attend_selected(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: Selection, cfg: LighthouseConfig
) -> torch.Tensor:
    """Lighthouse attention with a given selection (differentiable in q, k, v): [B, N, H, D]."""
    check_qkv(q, k, v)
    return _attend(compress(q, k, v, cfg, selection=sel))


def single_device_lighthouse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LighthouseConfig
) -> torch.Tensor:
    """Lighthouse attention (LIGHTHOUSE.md) on one device: q [B, N, H, D], k/v [B, N, Hkv, D]
    -> [B, N, H, D]. The selection is computed without gradient from float32 norms; gradients
    flow through pooling, gather, SDPA and scatter."""
    check_qkv(q, k, v)
    return _attend(compress(q, k, v, cfg))


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
        pieces.append(_dense_sdpa(qd, kd, vd)[0].transpose(0, 1))  # [L, H, D]
    return torch.cat(pieces).view(batch, n, heads, dim)


def single_device_causal(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense causal attention on one device: q [B, N, H, D], k/v [B, N, Hkv, D] -> [B, N, H, D].

    documents: None, or the int32 cumulative document lengths over the B * N tokens
    (lh_cp/ops/documents.py); each document then attends only to itself, causally."""
    check_qkv(q, k, v)
    if documents is not None:
        batch, n = q.shape[:2]
        bounds = check_documents(documents, batch, n, q.device)
        if not is_whole_windows(bounds, batch, n):
            if varlen_supported(q):
                return _document_causal_varlen(q, k, v, documents, longest_document(bounds))
            return _document_causal_reference(q, k, v, bounds)
    out = _dense_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


Fn = TypeVar("Fn", bound=Callable)


def opaque_to_compile(fn: Fn) -> Fn:
    """`fn` runs as one opaque call under torch.compile (torch.compiler.disable, applied while
    tracing) and as itself in eager mode. Applying torch.compiler.disable when the module is
    imported would import torch._dynamo, and with it triton, on every `import lh_cp`."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)

    return call  # type: ignore[return-value]


_opaque_causal = opaque_to_compile(single_device_causal)


class SingleDevice:
    """The attention of a model that is not split over ranks. A model's attention modules call
    `context.lighthouse(q, k, v, cfg, documents)` or `context.dense(q, k, v, documents)` on
    this, or on the lh_cp.parallel.ContextParallel that parallelize hands them, without knowing
    which.

    Under torch.compile the Lighthouse call is one opaque step (opaque_to_compile): its
    selection is data-dependent (sorting, the finiteness check's host sync) and would split the
    block's graph a dozen times; this way a compiled block breaks once, at attention. So is a
    dense call with documents (it reads the boundaries on the host)."""

    @opaque_to_compile
    def lighthouse(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cfg: LighthouseConfig,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        refuse_lighthouse_documents(documents)
        return single_device_lighthouse(q, k, v, cfg)

    def dense(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if documents is None:
            return single_device_causal(q, k, v)
        return _opaque_causal(q, k, v, documents)


SINGLE_DEVICE = SingleDevice()
