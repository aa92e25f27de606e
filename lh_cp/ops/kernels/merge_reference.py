"""Pure-PyTorch twin of merge.py: the log-sum-exp merge of two partial attention results, in
five element-wise passes (the Triton kernel does it in one; tests/test_merge_kernel.py compares
them). The CP exchanges call it through lh_cp.parallel.headtail.blocks.merge_into."""

from __future__ import annotations

import torch


def merge_reference(
    out_acc: torch.Tensor,
    lse_acc: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dest: torch.Tensor,
) -> None:
    """Fold a block result (out [.., S, D], lse [.., S]) into a running one: dest <- the merged
    output (dest may be out_acc itself), lse_acc <- the merged LSE, in place.

    An empty accumulator has lse -inf and out 0: its weight exp(-inf - lse) is exactly 0.
    The operands may be in a lower precision than the LSEs; products are taken in the latter.
    """
    merged = torch.logaddexp(lse_acc, lse)
    dest.copy_(
        out_acc.to(lse.dtype) * torch.exp(lse_acc - merged).unsqueeze(-1)
        + out.to(lse.dtype) * torch.exp(lse - merged).unsqueeze(-1)
    )
    lse_acc.copy_(merged)
