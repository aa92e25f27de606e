"""Single-device attention: Lighthouse (compress, causal SDPA over the entries, deliver) and
dense causal attention, with or without document masking. Nothing here talks to other ranks;
the public functions with `cp=` (lh_cp/api.py) dispatch to lh_cp.parallel, and
lh_cp.parallel.ContextParallel offers the same two methods as SingleDevice below.

Layouts follow the public API: q [B, N, H, D], k and v [B, N, Hkv, D], output [B, N, H, D].

Document masking (`documents=`): dense attention through lh_cp/ops/dense.py, Lighthouse through
lh_cp/ops/document_lighthouse.py (docs/LIGHTHOUSE.md s.12).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

from lh_cp.ops.compress import Compressed, compress, entries_sdpa
from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.dense import dense_sdpa, document_causal
from lh_cp.ops.document_lighthouse import lighthouse_documents
from lh_cp.ops.documents import check_documents, is_whole_windows
from lh_cp.ops.entries import Selection, check_heads
from lh_cp.ops.rope import RopeTables, check_rope


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


def _attend(entries: Compressed) -> torch.Tensor:
    """Causal SDPA over the entries, delivered onto the N token rows: [B, N, H, D]. Entries are
    sorted by the causal key, so "key_i <= key_j" is plain position causality."""
    return entries.deliver(entries_sdpa(entries.q, entries.k, entries.v))[0]


def attend_selected(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sel: Selection,
    cfg: LighthouseConfig,
    rope: RopeTables | None = None,
) -> torch.Tensor:
    """Lighthouse attention with a given selection (differentiable in q, k, v): [B, N, H, D]."""
    check_qkv(q, k, v)
    return _attend(compress(q, k, v, cfg, selection=sel, rope=rope))


def single_device_lighthouse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    documents: torch.Tensor | None = None,
    rope: RopeTables | None = None,
) -> torch.Tensor:
    """Lighthouse attention (LIGHTHOUSE.md) on one device: q [B, N, H, D], k/v [B, N, Hkv, D]
    -> [B, N, H, D]. The selection is computed without gradient from float32 norms; gradients
    flow through pooling, gather, SDPA and scatter. `documents` (lh_cp.ops.documents): packed
    documents kept apart (LIGHTHOUSE.md s.12); one document per window is the unmasked op.
    `rope`: the (cos, sin) tables of the tokens, [N, D/2] or [B, N, D/2], required by
    cfg.rope = "entries" (q, k unrotated; LIGHTHOUSE.md s.14) and refused otherwise."""
    check_qkv(q, k, v)
    rope = check_rope(rope, cfg, q)
    if documents is not None:
        batch, n = q.shape[:2]
        bounds = check_documents(documents, batch, n, q.device)
        if not is_whole_windows(bounds, batch, n):
            return lighthouse_documents(q, k, v, cfg, documents, bounds, rope)
    return _attend(compress(q, k, v, cfg, rope=rope))


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
            return document_causal(q, k, v, documents, bounds)
    out = dense_sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
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
    `context.lighthouse(q, k, v, cfg, documents, rope=None)` or
    `context.dense(q, k, v, documents)` on this, or on the lh_cp.parallel.ContextParallel that
    parallelize hands them, without knowing which.

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
        rope: RopeTables | None = None,
    ) -> torch.Tensor:
        return single_device_lighthouse(q, k, v, cfg, documents, rope)

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
