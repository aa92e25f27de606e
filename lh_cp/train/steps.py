"""What one rank computes for a batch: its CP shard, the forward, the global-token-mean loss,
validation loss and greedy predictions for the passkey evaluation.

Every function here is collective over the runtime's groups: all ranks call it together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.data.loader import BatchLoader
from lh_cp.model.loss import IGNORE_INDEX
from lh_cp.parallel import global_token_mean
from lh_cp.train.leak import LeakProbe, leak_nats
from lh_cp.train.recipe import Recipe
from lh_cp.train.runtime import Runtime


def local_shard(rt: Runtime, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's CP shard of each [B, N] tensor (dim 1) and its global positions [N / cp]:
    head-tail chunks, or contiguous shards under the Ulysses exchanges (rt.cp's layout).

    Targets are shifted before sharding (the loader does it), so a shard's last token is
    labelled by the first token of the next chunk even when that chunk lives elsewhere.
    """
    n = tensors[0].shape[1]
    moved = [t.to(rt.device, non_blocking=True) for t in tensors]
    if rt.cp is None:
        return (*moved, torch.arange(n, device=rt.device))
    return (*(rt.cp.shard(t, dim=1) for t in moved), rt.cp.positions(n, rt.device))


def _forward_sums(model, rt: Runtime, inputs, targets):
    tokens, labels, positions = local_shard(rt, inputs, targets)
    return model(tokens, positions, labels)


def training_loss(model, rt: Runtime, inputs, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, global mean loss for logging).

    The backpropagated value is W * (local loss sum) / (real tokens of the global batch), W the
    size of the loss group (lh_cp.parallel.global_token_mean): FSDP (or DeepSpeed, over every
    rank) averages gradients over the same W ranks, which leaves the gradient of the global
    token mean.
    """
    loss_sum, count = _forward_sums(model, rt, inputs, targets)
    return global_token_mean(loss_sum, count, rt.loss_group)


@torch.no_grad()
def validation_loss(model, rt: Runtime, recipe: Recipe, stream) -> float:
    """Mean token loss over the first eval.val_batches global batches of the validation split."""
    data = recipe.data
    loader = BatchLoader(
        stream,
        data.seq_len,
        data.batch_size,
        rt.dp_rank,
        rt.dp_size,
        data.seed,
        shuffle=False,
        name="validation",
    )
    totals = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for _ in range(recipe.eval.val_batches):
        loss_sum, count = _forward_sums(model, rt, *loader.next_batch())
        totals += torch.stack([loss_sum.double(), count.double()])
    dist.all_reduce(totals, group=rt.loss_group)
    return float(totals[0] / totals[1])


@torch.no_grad()
def probe_leak(model, rt: Runtime, recipe: Recipe, probe: LeakProbe) -> dict[str, float]:
    """The leak metric of the model's current attention mode (lh_cp/train/leak.py) on `probe`.

    Data-parallel rank r takes a contiguous share of the probe rows and runs them
    data.batch_size rows per forward; every rank runs the same number of forwards (a rank
    short of rows forwards one row without targets), as FSDP's collectives need, and each
    variant is cut into the same row groups, so clean and perturbed forwards have the same shapes.
    """
    share = -(-probe.rows // rt.dp_size)
    first, group = rt.dp_rank * share, recipe.data.batch_size

    def loss_sums(variant: str) -> float:
        total = torch.zeros((), dtype=torch.float64, device=rt.device)
        for begin in range(0, share, group):
            lo, hi = first + begin, min(first + begin + group, first + share, probe.rows)
            if hi > lo:
                inputs, targets = probe.batch(variant, slice(lo, hi))
            else:
                inputs, targets = probe.batch("clean", slice(0, 1))
                targets = torch.full_like(targets, IGNORE_INDEX)
            total += _forward_sums(model, rt, inputs, targets)[0].double()
        dist.all_reduce(total, group=rt.loss_group)
        return float(total)

    return leak_nats(loss_sums, probe.rows)


def greedy_predictor(model, rt: Runtime):
    """tokens [B, L] -> argmax next token [B, L], computed by all ranks (each its CP shard)."""

    @torch.no_grad()
    def predict(tokens: torch.Tensor) -> torch.Tensor:
        local, positions = local_shard(rt, tokens)
        predicted = model(local, positions, predict=True)  # [B, L / cp]
        if rt.cp is not None:
            predicted = rt.cp.unshard(predicted, dim=1)  # [B, L]
        return predicted.cpu()

    return predict
