"""What one rank computes for a batch: its CP shard, the forward, the global-token-mean loss,
validation loss and greedy predictions for the passkey evaluation.

Every function here is collective over the runtime's groups: all ranks call it together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.data import BatchLoader
from lh_cp.leak import IGNORE_INDEX, LeakProbe, leak_nats
from lh_cp.parallel import shard_positions, shard_sequence, unshard_sequence
from lh_cp.parallel.ulysses_sharding import ulysses_positions, ulysses_shard, ulysses_unshard
from lh_cp.recipe import Recipe
from lh_cp.runtime import Runtime


def local_shard(rt: Runtime, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This rank's CP shard of each [B, N] tensor (dim 1) and its global positions [N / cp]:
    head-tail chunks, or contiguous shards under the Ulysses exchanges (rt.contiguous).

    Targets are shifted before sharding (the loader does it), so a shard's last token is
    labelled by the first token of the next chunk even when that chunk lives elsewhere.
    """
    n = tensors[0].shape[1]
    moved = [t.to(rt.device, non_blocking=True) for t in tensors]
    if rt.cp_group is None:
        return (*moved, torch.arange(n, device=rt.device))
    if rt.contiguous:
        return (*(ulysses_shard(t, rt.cp_group, dim=1) for t in moved), ulysses_positions(n, rt.cp_group, rt.device))
    return (*(shard_sequence(t, rt.cp_group, dim=1) for t in moved), shard_positions(n, rt.cp_group, rt.device))


def _forward_sums(model, rt: Runtime, recipe: Recipe, inputs, targets):
    tokens, labels, positions = local_shard(rt, inputs, targets)
    par = recipe.parallel
    return model(tokens, positions, labels, cp_group=rt.cp_group, exchange=par.exchange, dense_exchange=par.dense_exchange)


def training_loss(model, rt: Runtime, recipe: Recipe, inputs, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, global mean loss for logging).

    The backpropagated value is W * (local loss sum) / (real tokens of the global batch), W the
    size of the loss group: FSDP (or DeepSpeed, over every rank) averages gradients over the
    same W ranks, which leaves the gradient of the global token mean. (lh_cp.parallel.global_token_mean_loss applies the same
    normaliser to full logits; the model's chunked loss never forms them.)
    """
    loss_sum, count = _forward_sums(model, rt, recipe, inputs, targets)
    totals = torch.stack([loss_sum.detach().double(), count.double()])
    dist.all_reduce(totals, group=rt.loss_group)
    world = dist.get_world_size(rt.loss_group)
    loss = loss_sum * (world / totals[1].clamp(min=1.0)).to(loss_sum.dtype)
    return loss, totals[0] / totals[1].clamp(min=1.0)


@torch.no_grad()
def validation_loss(model, rt: Runtime, recipe: Recipe, stream) -> float:
    """Mean token loss over the first eval.val_batches global batches of the validation split."""
    data = recipe.data
    loader = BatchLoader(stream, data.seq_len, data.batch_size, rt.dp_rank, rt.dp_size, data.seed, shuffle=False, name="validation")
    totals = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for _ in range(recipe.eval.val_batches):
        loss_sum, count = _forward_sums(model, rt, recipe, *loader.next_batch())
        totals += torch.stack([loss_sum.double(), count.double()])
    dist.all_reduce(totals, group=rt.loss_group)
    return float(totals[0] / totals[1])


@torch.no_grad()
def probe_leak(model, rt: Runtime, recipe: Recipe, probe: LeakProbe) -> dict[str, float]:
    """The leak metric of the model's current attention mode (lh_cp/leak.py) on `probe`.

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
            total += _forward_sums(model, rt, recipe, inputs, targets)[0].double()
        dist.all_reduce(total, group=rt.loss_group)
        return float(total)

    return leak_nats(loss_sums, probe.rows)


def greedy_predictor(model, rt: Runtime, recipe: Recipe):
    """tokens [B, L] -> argmax next token [B, L], computed by all ranks (each its CP shard)."""
    par = recipe.parallel

    @torch.no_grad()
    def predict(tokens: torch.Tensor) -> torch.Tensor:
        local, positions = local_shard(rt, tokens)
        predicted = model(local, positions, cp_group=rt.cp_group, exchange=par.exchange,
                          dense_exchange=par.dense_exchange, predict=True)  # [B, L / cp]
        if rt.cp_group is not None:
            unshard = ulysses_unshard if rt.contiguous else unshard_sequence
            predicted = unshard(predicted, rt.cp_group, dim=1)  # [B, L]
        return predicted.cpu()

    return predict
