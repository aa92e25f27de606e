"""Loss of a sharded global batch: the mean over all its real tokens, whatever the DP/CP split.

One normaliser (global_token_mean) serves the trainer, which has the model's chunked loss sum
and target count, and global_token_mean_loss, which starts from full logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lh_cp.data.loader import IGNORE_INDEX
from lh_cp.ops.pyramid import accumulation_dtype


def global_token_mean(
    local_sum: torch.Tensor, local_count: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, global token mean for logging) from this rank's summed token
    loss and its count of real targets.

    `group` spans every rank that holds different tokens of the global batch (dp_replicate x
    dp_shard x cp, the mesh's "dp_cp" axis). The first value is W * local_sum / (real tokens of
    the global batch), W the group size, so that (a) its average over the group is the global
    token mean, and (b) FSDP's (or DeepSpeed's) gradient averaging over the same ranks gives
    exactly the gradient of that global mean. The second is that mean, float64, on every rank.
    """
    totals = torch.stack([local_sum.detach().double(), local_count.double()])
    dist.all_reduce(totals, group=group)
    count = totals[1].clamp(min=1.0)
    world = dist.get_world_size(group)
    return local_sum * (world / count).to(local_sum.dtype), totals[0] / count


def global_token_mean_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """This rank's share of the mean cross-entropy over every real token of the global batch.

    logits [..., V] and labels [...] are this rank's tokens (its DP batch rows, its CP shard of
    the sequence); labels equal to `ignore_index` (padding) count nowhere. Labels must be
    shifted for next-token prediction on the full sequence *before* sharding, so that a
    shard's last token is labelled by the next chunk. Returns global_token_mean's first value
    (log `all_reduce(loss, AVG)`).
    """
    local_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(accumulation_dtype(logits.dtype)),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    return global_token_mean(local_sum, (labels != ignore_index).sum(), group)[0]
