"""The scatter's spill past the end of one piece of sequence lands on the first rows of the next.

A CP chunk (head-tail) or shard (Ulysses) delivers onto its own C rows and, apart, the
c_L - 1 spill rows past them (lh_cp.ops.compress: deliver(out, spill)); a halo exchange brings the
preceding piece's spill rows here, where they are added to the first rows in place. Adding in
place spares a copy of the whole [B, C, H, D] output each way: torch.cat or a copy out of a
longer buffer forward, and autograd's CopySlices (which clones the gradient) backward.
"""

from __future__ import annotations

import torch


class _AddToFirstRows(torch.autograd.Function):
    """rows [B, C, H, D] += halo [B, h, H, D] on rows 0 .. h-1, in place; linear, saves nothing."""

    @staticmethod
    def forward(ctx, rows, halo):
        ctx.mark_dirty(rows)
        ctx.halo_rows = halo.shape[1]
        rows[:, : halo.shape[1]] += halo
        return rows

    @staticmethod
    def backward(ctx, grad):
        # The rows' gradient passes through untouched; the halo's is a small copy, so that no
        # later in-place accumulation into one of the two can reach the other.
        return grad, grad[:, : ctx.halo_rows].clone()


def add_to_first_rows(rows: torch.Tensor, halo: torch.Tensor) -> torch.Tensor:
    """rows [B, C, H, D] with halo [B, h, H, D] (h <= C) added to its first h rows, in place
    (differentiable; `rows` is modified and returned)."""
    if (
        halo.shape[0] != rows.shape[0]
        or halo.shape[2:] != rows.shape[2:]
        or halo.shape[1] > rows.shape[1]
    ):
        raise ValueError(
            f"a halo {tuple(halo.shape)} lands on the first rows of {tuple(rows.shape)}: "
            f"same batch and trailing dims, at most as many rows"
        )
    return _AddToFirstRows.apply(rows, halo)
