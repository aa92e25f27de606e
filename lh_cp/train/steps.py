"""What one rank computes for a batch: its CP shard, the forward, the global-token-mean loss,
validation loss and greedy predictions for the passkey evaluation.

Every function here is collective over the runtime's groups: all ranks call it together.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.data.loader import Batch, BatchLoader, document_batch
from lh_cp.model.loss import IGNORE_INDEX
from lh_cp.ops.documents import document_positions
from lh_cp.parallel import global_token_mean
from lh_cp.train.leak import LeakProbe, leak_nats
from lh_cp.train.recipe import Recipe
from lh_cp.train.runtime import Runtime


def local_shard(
    rt: Runtime,
    *tensors: torch.Tensor,
    documents: torch.Tensor | None = None,
    positions: str = "window",
) -> tuple[torch.Tensor | None, ...]:
    """This rank's CP shard of each [B, N] tensor (dim 1), the positions of its tokens and the
    documents on the device: head-tail chunks, or contiguous shards under the Ulysses
    exchanges (rt.cp's layout).

    positions: 'window', each token's index in its window ([N / cp], shared by every row), or
    with documents 'document', its index in its document ([B, N / cp]); documents stay the
    global tensor of the whole batch (every CP rank of a replica holds the same).
    Targets are shifted before sharding (the loader does it), so a shard's last token is
    labelled by the first token of the next chunk even when that chunk lives elsewhere.
    """
    batch, n = tensors[0].shape
    moved = [t.to(rt.device, non_blocking=True) for t in tensors]
    if documents is not None and positions == "document":
        where = document_positions(documents.tolist(), batch, n, rt.device)  # [B, N]
        where = where if rt.cp is None else rt.cp.shard(where, dim=1)
    elif rt.cp is None:
        where = torch.arange(n, device=rt.device)
    else:
        where = rt.cp.positions(n, rt.device)
    if documents is not None:
        documents = documents.to(rt.device)
    if rt.cp is not None:
        moved = [rt.cp.shard(t, dim=1) for t in moved]
    return (*moved, where, documents)


def _forward_sums(model, rt: Runtime, batch: Batch, positions: str):
    tokens, labels, where, documents = local_shard(
        rt, batch.inputs, batch.targets, documents=batch.documents, positions=positions
    )
    return model(tokens, where, labels, documents=documents)


def training_loss(
    model, rt: Runtime, batch: Batch, positions: str = "window"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, global mean loss for logging) of a loader's batch; positions:
    data.positions.

    The backpropagated value is W * (local loss sum) / (real tokens of the global batch), W the
    size of the loss group (lh_cp.parallel.global_token_mean): FSDP (or DeepSpeed, over every
    rank) averages gradients over the same W ranks, which leaves the gradient of the global
    token mean.
    """
    loss_sum, count = _forward_sums(model, rt, batch, positions)
    return global_token_mean(loss_sum, count, rt.loss_group)


@torch.no_grad()
def validation_loss(model, rt: Runtime, recipe: Recipe, stream, eod_id: int | None = None) -> float:
    """Mean token loss over the first eval.val_batches global batches of the validation split;
    eod_id: the end-of-document token where data.document_masking is on (same masking as
    training), else None."""
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
        eod_id=eod_id,
    )
    totals = torch.zeros(2, dtype=torch.float64, device=rt.device)
    for _ in range(recipe.eval.val_batches):
        loss_sum, count = _forward_sums(model, rt, loader.next_batch(), data.positions)
        totals += torch.stack([loss_sum.double(), count.double()])
    dist.all_reduce(totals, group=rt.loss_group)
    return float(totals[0] / totals[1])


@torch.no_grad()
def probe_leak(
    model, rt: Runtime, recipe: Recipe, probe: LeakProbe, eod_id: int | None = None
) -> dict[str, float]:
    """The leak metric of the model's current attention mode (lh_cp/train/leak.py) on `probe`;
    eod_id as for validation_loss (each variant's documents read off its own inputs).

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
            batch = document_batch(inputs, targets, eod_id)
            total += _forward_sums(model, rt, batch, recipe.data.positions)[0].double()
        dist.all_reduce(total, group=rt.loss_group)
        return float(total)

    return leak_nats(loss_sums, probe.rows)


def greedy_predictor(model, rt: Runtime, eod_id: int | None = None, positions: str = "window"):
    """tokens [B, L] -> argmax next token [B, L], computed by all ranks (each its CP shard);
    eod_id and positions as in training (documents read off the tokens)."""

    @torch.no_grad()
    def predict(tokens: torch.Tensor) -> torch.Tensor:
        documents = document_batch(tokens, tokens, eod_id).documents
        local, where, documents = local_shard(rt, tokens, documents=documents, positions=positions)
        predicted = model(local, where, predict=True, documents=documents)  # [B, L / cp]
        if rt.cp is not None:
            predicted = rt.cp.unshard(predicted, dim=1)  # [B, L]
        return predicted.cpu()

    return predict
