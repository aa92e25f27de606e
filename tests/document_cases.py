"""Packed-document layouts and the "each document alone" reference, shared by the document
masking tests (single device, CP, Ulysses, conformance).

Windows of N = 48 tokens (2W chunks of 12, 8 and 6 tokens at W = 2, 3, 4), B = 2 windows per
batch. The reference runs every document as its own sequence through the unmasked causal
attention and puts its output and q/k/v gradients back at the document's positions: what
document masking must reproduce.
"""

from __future__ import annotations

import torch

from lh_cp import causal_attention

N, BATCH = 48, 2

# name -> the document lengths of each window (each list sums to N)
LAYOUTS = {
    # a one-token document; a document of 30 tokens that crosses chunk boundaries at every W,
    # rank boundaries, and the middle of the window (position 24), where rank W - 1's head
    # chunk meets its tail chunk; the second window one document
    "crossing": [[5, 1, 30, 12], [48]],
    # many short documents (1 to 5 tokens), and two long ones
    "short": [[3, 2, 4, 1, 5, 3, 2, 1, 4, 5, 2, 3, 1, 4, 5, 3], [20, 28]],
    # documents that start exactly at chunk starts (12, 24, 36) and one that ends at the last token
    "aligned": [[12, 12, 12, 11, 1], [6, 6, 36]],
    # one document per window: the unmasked attention
    "whole": [[48], [48]],
}


def bounds_of(layout: list[list[int]]) -> list[int]:
    """Cumulative boundaries over the flattened windows (the documents= contract)."""
    bounds = [0]
    for window in layout:
        assert sum(window) == N, window
        for length in window:
            bounds.append(bounds[-1] + length)
    return bounds


def documents_of(layout: list[list[int]], device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.tensor(bounds_of(layout), dtype=torch.int32, device=device)


def inputs(heads: int, kv_heads: int, dtype: torch.dtype, seed: int, head_dim: int = 8):
    """q [B, N, H, D], k and v [B, N, Hkv, D], dout [B, N, H, D]: randn drawn in float64."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(BATCH, N, heads, head_dim), *[(BATCH, N, kv_heads, head_dim)] * 2]
    shapes.append((BATCH, N, heads, head_dim))
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def each_document_alone(q, k, v, dout, bounds: list[int]):
    """out, dq, dk, dv [B, N, ..] with every document run alone (unmasked causal attention of
    that document as its own sequence of one window)."""
    batch, n = q.shape[:2]
    flat = [t.reshape(batch * n, *t.shape[2:]) for t in (q, k, v, dout)]
    results = [torch.empty_like(flat[0]), torch.empty_like(flat[0])]
    results += [torch.empty_like(flat[1]), torch.empty_like(flat[2])]
    for start, end in zip(bounds[:-1], bounds[1:]):
        leaves = [t[start:end].unsqueeze(0).clone().requires_grad_() for t in flat[:3]]
        out = causal_attention(*leaves)
        (out * flat[3][start:end].unsqueeze(0)).sum().backward()
        results[0][start:end] = out[0].detach()
        for index, leaf in enumerate(leaves, start=1):
            results[index][start:end] = leaf.grad[0]
    return [r.view(batch, n, *r.shape[1:]) for r in results]
