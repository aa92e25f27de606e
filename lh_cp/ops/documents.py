"""Packed documents: the boundaries that document masking keeps every attention path to.

A batch of B windows of N tokens each holds documents packed end to end. Their boundaries are
given as varlen kernels take them: `documents`, a 1-D int32 tensor of cumulative lengths over the
B * N tokens of the batch flattened row by row (window b's token t is flat token b * N + t):
0 first, B * N last, strictly increasing, and every window start b * N among them (a document
never continues into the next window). Document i is the flat tokens [documents[i],
documents[i+1]). Under context parallelism every rank passes the same tensor, in the coordinates
of the whole (unsharded) windows: a rank finds the documents of its own chunks from the global
positions it holds.

With documents given, no output of a document may depend on any input of another (docs/
LIGHTHOUSE.md, "Packed documents"); documents=None is one document per window, today's
unmasked attention.
"""

from __future__ import annotations

import torch


class DocumentsError(ValueError):
    """`documents` does not describe a valid packing of the batch (check_documents)."""


def check_documents(documents: torch.Tensor, batch: int, n: int, device: torch.device) -> list[int]:
    """Validate the boundaries of a batch of `batch` windows of `n` tokens on `device`; returns
    them as a Python list (one host sync: every caller needs the boundaries on the host anyway,
    to split work per document). Raises DocumentsError naming the rule and the values."""
    if not isinstance(documents, torch.Tensor):
        raise DocumentsError(
            f"documents must be a torch.Tensor of cumulative lengths, got {type(documents).__name__}"
        )
    if documents.dim() != 1 or documents.dtype != torch.int32:
        raise DocumentsError(
            f"documents must be a 1-D int32 tensor of cumulative lengths (as varlen kernels take them), "
            f"got shape {tuple(documents.shape)} dtype {documents.dtype}"
        )
    if documents.device != torch.device(device):
        raise DocumentsError(
            f"documents must be on the device of q, k, v ({device}), got {documents.device}"
        )
    bounds = documents.tolist()
    total = batch * n
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
        head = (
            bounds[:3] + (["..."] if len(bounds) > 4 else []) + bounds[-1:]
            if len(bounds) > 3
            else bounds
        )
        raise DocumentsError(
            f"documents must start at 0 and end at B * N = {batch} * {n} = {total} (they cover the "
            f"whole batch), got {head}"
        )
    for i in range(1, len(bounds)):
        if bounds[i] <= bounds[i - 1]:
            raise DocumentsError(
                f"documents must be strictly increasing (every document holds >= 1 token), got "
                f"documents[{i - 1}] = {bounds[i - 1]} >= documents[{i}] = {bounds[i]}"
            )
    present = set(bounds)
    missing = [b * n for b in range(1, batch) if b * n not in present]
    if missing:
        raise DocumentsError(
            f"every window start b * N must be a document boundary (a document never continues into "
            f"the next window; N = {n}): missing {missing[:4]}"
        )
    return bounds


def document_ids(bounds: list[int], batch: int, n: int, device: torch.device) -> torch.Tensor:
    """The index of the document each token belongs to: int64 [B, N], numbered over the batch."""
    lengths = torch.tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], device=device)
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths)
    return ids.view(batch, n)


def whole_windows(batch: int, n: int, device: torch.device) -> torch.Tensor:
    """The boundaries of one document per window: what documents=None means."""
    return torch.arange(0, batch * n + 1, n, dtype=torch.int32, device=device)


def is_whole_windows(bounds: list[int], batch: int, n: int) -> bool:
    """Whether `bounds` (checked) hold one document per window: the unmasked attention, which
    every path then runs unchanged."""
    return len(bounds) == batch + 1


def longest_document(bounds: list[int]) -> int:
    """The length of the longest document (the max_q / max_k of a varlen kernel)."""
    return max(b - a for a, b in zip(bounds[:-1], bounds[1:]))


def document_positions(
    bounds: list[int], batch: int, n: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Each token's position inside its document (0 at every document start): int64 [B, N],
    the RoPE positions of data.positions = "document"."""
    starts = torch.tensor(bounds[:-1], dtype=torch.int64, device=device)
    lengths = torch.tensor(
        [b - a for a, b in zip(bounds[:-1], bounds[1:])], dtype=torch.int64, device=device
    )
    flat = torch.arange(batch * n, dtype=torch.int64, device=device)
    return (flat - torch.repeat_interleave(starts, lengths)).view(batch, n)


def refuse_lighthouse_documents(documents: torch.Tensor | None) -> None:
    """The one place that says Lighthouse attention takes no documents yet: every Lighthouse
    entry point (lh_cp.lighthouse_attention, the context objects' `lighthouse`, hence the model,
    the Ulysses exchanges and the torchtitan inner attention) calls it first."""
    if documents is not None:
        raise ValueError(
            "Lighthouse attention with documents= is not supported yet; document masking runs in "
            "dense attention only (lh_cp.causal_attention(..., documents=...), a model's dense "
            "layers and dense stages)"
        )
