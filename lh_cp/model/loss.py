"""Cross-entropy of the output projection, computed a chunk of tokens at a time.

At long context the [tokens, vocab] logits dominate memory (1M tokens x 128K vocab in float32
is 512 GB), so each chunk's logits are formed, reduced to a loss and dropped; backward
recomputes them chunk by chunk (activation checkpointing of the chunk function).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lh_cp.data.loader import IGNORE_INDEX


def _chunk_loss_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()  # [chunk, vocab]; float32 for a stable log-sum-exp
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [B, n, dim], weight [vocab, dim], targets [B, n] -> (loss sum, target count).

    The sum runs over targets != ignore_index; the count is an int64 scalar without gradient.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [B * n, dim]
    flat_targets = targets.reshape(-1)  # [B * n]
    total = flat_hidden.new_zeros((), dtype=torch.float32)
    for begin in range(0, flat_targets.numel(), chunk_tokens):
        piece = slice(begin, begin + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + checkpoint(
                _chunk_loss_sum,
                flat_hidden[piece],
                weight,
                flat_targets[piece],
                ignore_index,
                use_reentrant=False,
            )
        else:
            total = total + _chunk_loss_sum(
                flat_hidden[piece], weight, flat_targets[piece], ignore_index
            )
    count = (flat_targets != ignore_index).sum()
    return total, count


@torch.no_grad()
def chunked_argmax(hidden: torch.Tensor, weight: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Most likely next token at every position: hidden [B, n, dim] -> int64 [B, n]."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [B * n, dim]
    pieces = [
        F.linear(flat_hidden[begin : begin + chunk_tokens], weight).argmax(dim=-1)
        for begin in range(0, flat_hidden.shape[0], chunk_tokens)
    ]
    return torch.cat(pieces).view(hidden.shape[:-1])
