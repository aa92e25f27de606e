"""Loss of a sharded global batch: the mean over all its real tokens, whatever the DP/CP split."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lh_cp.pyramid import accumulation_dtype


def global_token_mean_loss(
    logits: torch.Tensor, labels: torch.Tensor, group: dist.ProcessGroup, ignore_index: int = -100
) -> torch.Tensor:
    """This rank's share of the mean cross-entropy over every real token of the global batch.

    logits [..., V] and labels [...] are this rank's tokens (its DP batch rows, its CP shard of
    the sequence); labels equal to `ignore_index` (padding) count nowhere. `group` spans every
    rank that holds different tokens of the global batch (dp_replicate x dp_shard x cp, the
    mesh's "dp_cp" axis). Labels must be shifted for next-token prediction on the full
    sequence *before* sharding, so that a shard's last token is labelled by the next chunk.

    Returns W * (sum of local token losses) / (real tokens in the global batch), W the group
    size, so that (a) the average of the returned values over the group is the global token
    mean, and (b) FSDP's default gradient averaging over the same ranks produces exactly the
    gradient of that global mean. Log `all_reduce(loss, AVG)`.
    """
    local_sum = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(accumulation_dtype(logits.dtype)), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    count = (labels != ignore_index).sum().to(torch.float64)
    dist.all_reduce(count, group=group)
    world = dist.get_world_size(group)
    return local_sum * (world / count.clamp(min=1.0)).to(local_sum.dtype)
