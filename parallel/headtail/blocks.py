"""Attention of one block of queries against one block of keys, with its log-sum-exp.

Context parallelism splits a causal attention into blocks (query chunk i, key chunk j). Each
block's output is normalised by its own softmax denominator, so partial results are combined
by their log-sum-exp (LSE); the backward of a block needs only the final output, the final LSE
and the block's inputs. This file is the pure-PyTorch reference of those steps: explicit
softmax in float32 (float64 for float64 inputs), so that CPU results match the single-device
path to the tolerances the tests state.

Layout: q [B, H, Sq, D], k and v [B, Hk, Sk, D] with H % Hk == 0 (GQA: query head h reads
key/value head h // (H // Hk)); scale 1/sqrt(D), as the single-device SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lh_cp.ops import kernels
from lh_cp.ops.kernels.merge_reference import merge_reference
from lh_cp.ops.pyramid import accumulation_dtype
from lh_cp.parallel.headtail.fused_blocks import (
    fused_block_backward,
    fused_block_forward,
    fused_supported,
)


def _causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """True where key j is in the future of query i, the diagonal aligned bottom-right: the
    last Sq keys are the query block itself, every key before them is visible (Sq <= Sk)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(diagonal=1 + sk - sq)


def _scores(qg: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """qg [B, Hk, G, Sq, D], k [B, Hk, Sk, D] -> scaled scores [B, Hk, G, Sq, Sk]."""
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * qg.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(
            _causal_mask(scores.shape[-2], scores.shape[-1], scores.device), float("-inf")
        )
    return scores


def block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one block: returns out [B, H, Sq, D] and lse [B, H, Sq].

    Both in the accumulation dtype (float32, or float64 for float64 inputs). causal=True: the
    keys end with the query block itself (Sq <= Sk), query i sees keys 0 .. i + Sk - Sq; with
    Sq == Sk that is the diagonal block of a chunk with itself.
    """
    acc = accumulation_dtype(q.dtype)
    batch, heads, sq, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.to(acc).reshape(batch, kv_heads, heads // kv_heads, sq, dim)
    scores = _scores(qg, k.to(acc), causal)  # [B, Hk, G, Sq, Sk]
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hk, G, Sq]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.matmul(probs, v.to(acc).unsqueeze(2))  # [B, Hk, G, Sq, D]
    return out.reshape(batch, heads, sq, dim), lse.reshape(batch, heads, sq)


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *final* lse [B, H, Sq] and delta = rowsum(dout * out).

    With the final LSE, exp(scores - lse) is this block's share of the full softmax, so the
    per-block gradients simply add up: dq [B, H, Sq, D], dk and dv [B, Hk, Sk, D], all in the
    accumulation dtype.
    """
    acc = accumulation_dtype(q.dtype)
    batch, heads, sq, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qg = q.to(acc).reshape(batch, kv_heads, group, sq, dim)
    doutg = dout.to(acc).reshape(batch, kv_heads, group, sq, dim)
    k_acc, v_acc = k.to(acc), v.to(acc)
    scores = _scores(qg, k_acc, causal)
    probs = torch.exp(scores - lse.reshape(batch, kv_heads, group, sq, 1))  # masked -> 0
    dv = torch.matmul(probs.transpose(-1, -2), doutg).sum(dim=2)  # [B, Hk, Sk, D]
    dprobs = torch.matmul(doutg, v_acc.unsqueeze(2).transpose(-1, -2))  # [B, Hk, G, Sq, Sk]
    dscores = probs * (dprobs - delta.reshape(batch, kv_heads, group, sq, 1)) * dim**-0.5
    dq = torch.matmul(dscores, k_acc.unsqueeze(2)).reshape(batch, heads, sq, dim)
    dk = torch.matmul(dscores.transpose(-1, -2), qg).sum(dim=2)
    return dq, dk, dv


def _forward_fn(q: torch.Tensor):
    """The fused-kernel twin (cuDNN or flash) on CUDA half precision, the reference elsewhere."""
    return fused_block_forward if fused_supported(q) else block_forward


def chunk_rows(x: torch.Tensor, slot: int, length: int) -> torch.Tensor:
    """Chunk `slot` (0 or 1) of a [.., 2S, ..] tensor whose dim 2 holds a rank's two chunks of
    `length` = S rows each, as a contiguous tensor (the kernels want one)."""
    return x.narrow(2, slot * length, length).contiguous()


def visible_prefix(q_id: int, kv_ids: list[int] | tuple[int, ...]) -> int:
    """How many leading chunks of a key block (chunk ids kv_ids, ascending, none of them q_id)
    query chunk q_id sees: those before it. They always form a prefix of the block, so one
    unmasked call covers them."""
    seen = sum(1 for c in kv_ids if c < q_id)
    if any(c > q_id for c in kv_ids[:seen]) or q_id in kv_ids:
        raise ValueError(f"chunks {kv_ids} are not an ascending block of chunks other than {q_id}")
    return seen


def own_block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank's two chunks against themselves, q [B, H, 2S, D], k/v [B, Hk, 2S, D] in local
    order (head chunk r, then tail chunk 2W-1-r): one square causal call, since the tail
    chunk sees all of the earlier head chunk and the head chunk only itself, causally.
    Returns out [B, H, 2S, D] (the kernel's dtype) and lse [B, H, 2S] (float32 or float64)."""
    return _forward_fn(q)(q, k, v, True)


def merge_into(
    out_acc: torch.Tensor,
    lse_acc: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dest: torch.Tensor | None = None,
) -> None:
    """merge_reference, through its one-pass Triton twin (lh_cp/ops/kernels/merge.py) where the
    kernels run; dest None merges in place into out_acc."""
    dest = out_acc if dest is None else dest
    if kernels.available(out_acc, out, dest) and lse_acc.dtype == lse.dtype == torch.float32:
        from lh_cp.ops.kernels.merge import merge_kernel

        merge_kernel(out_acc, lse_acc, out, lse, dest)
    else:
        merge_reference(out_acc, lse_acc, out, lse, dest)


def merges_per_chunk(q_ids: tuple[int, int], key_blocks: list) -> list[int]:
    """How many of the key blocks (chunk ids of each, in arrival order) each query chunk sees."""
    return [sum(1 for kv_ids in key_blocks if visible_prefix(q_id, kv_ids) > 0) for q_id in q_ids]


class Accumulated:
    """The output and LSE of the rank's two query chunks [B, H, 2S, D] over the key blocks
    seen so far, starting from the own block's result (at W = 1 that is all: nothing is
    converted or merged).

    Every remote block is folded in by one merge (merge_into) whose destination is chosen so
    that nothing is converted apart: a chunk's last merge writes its final rows into `out`
    itself (in the block kernel's dtype: the layer's output); a chunk that has more merges to
    come keeps a running sum in the accumulation dtype in between (the ring at W >= 3), so the
    partial results of W - 1 blocks are never rounded to bf16 on the way.
    `key_blocks`: the chunk ids of each remote block, in the order add_remote receives them.
    """

    def __init__(
        self, out: torch.Tensor, lse: torch.Tensor, q_ids: tuple[int, int], key_blocks: list
    ) -> None:
        self.out, self.lse, self.q_ids = out, lse, q_ids
        self.merges_left = merges_per_chunk(q_ids, key_blocks)
        self.running: list[torch.Tensor | None] = [None, None]
        self.query_rows: dict[int, torch.Tensor] = {}  # each chunk's contiguous q rows, copied once

    def add_remote(self, q: torch.Tensor, kv: torch.Tensor, kv_ids, length: int) -> None:
        """Attend each query chunk to the prefix of the block kv [2, B, Hk, M*S, D] (chunks
        kv_ids, ascending) it sees, one unmasked call each, and merge by LSE."""
        block = _forward_fn(q)
        for slot, q_id in enumerate(self.q_ids):
            seen = visible_prefix(q_id, kv_ids)
            if seen == 0:
                continue
            if self.merges_left[slot] == 0:
                raise ValueError(
                    f"key block {kv_ids} reaches query chunk {q_id} after its last listed block"
                )
            keys = kv[:, :, :, : seen * length]
            if slot not in self.query_rows:
                self.query_rows[slot] = chunk_rows(q, slot, length)
            out, lse = block(self.query_rows[slot], keys[0], keys[1], False)
            rows = slice(slot * length, (slot + 1) * length)
            self.merges_left[slot] -= 1
            final_rows, running = self.out[:, :, rows], self.running[slot]
            if self.merges_left[slot] == 0:
                dest = final_rows
            else:
                dest = (
                    running
                    if running is not None
                    else torch.empty(
                        final_rows.shape, dtype=accumulation_dtype(q.dtype), device=q.device
                    )
                )
            merge_into(
                final_rows if running is None else running, self.lse[:, :, rows], out, lse, dest
            )
            self.running[slot] = dest if self.merges_left[slot] else None

    def saved_output(self, q: torch.Tensor) -> torch.Tensor:
        """The output as the block backward reads it: in q's dtype for the fused kernels, in
        the accumulation dtype for the reference."""
        return self.out.to(q.dtype) if fused_supported(q) else self.out


@dataclass(frozen=True)
class BackwardInputs:
    """What every block's backward reads, prepared once per layer: the queries, the output
    gradient and the final output in the form the block kernels want, delta = rowsum(dout *
    out) for the reference (the fused kernels compute it themselves), and the final LSE,
    [B, H, 2S, ..]; and, made on first use and kept for the layer, each query chunk's rows of
    them as contiguous tensors (the ring reads a chunk's rows once per remote block)."""

    q: torch.Tensor
    dout: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    delta: torch.Tensor | None
    fused: bool
    _chunks: dict = field(default_factory=dict, repr=False, compare=False)

    def chunk(self, slot: int, length: int) -> tuple:
        """q, dout, out, lse, delta of query chunk `slot` (`length` rows each), contiguous."""
        if slot not in self._chunks:
            self._chunks[slot] = tuple(
                None if x is None else chunk_rows(x, slot, length)
                for x in (self.q, self.dout, self.out, self.lse, self.delta)
            )
        return self._chunks[slot]

    def block_backward(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool,
        slot: int | None = None,
        length: int = 0,
    ):
        """dq, dk, dv of the queries (all 2S rows with slot None, else chunk `slot` of `length`
        rows) against keys k, v."""
        if slot is None:
            q, dout, out, lse, delta = self.q, self.dout, self.out, self.lse, self.delta
        else:
            q, dout, out, lse, delta = self.chunk(slot, length)
        if self.fused:
            return fused_block_backward(dout, q, k, v, out, lse, causal)
        return block_backward(dout, q, k, v, lse, delta, causal)


def backward_inputs(
    dout: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> BackwardInputs:
    """dout [B, H, 2S, D], the queries and the saved out and lse of the forward -> BackwardInputs.

    The fused kernels take dout and out in q's dtype (converted here once, not per block)."""
    if fused_supported(q):
        return BackwardInputs(q, dout.to(q.dtype).contiguous(), out.to(q.dtype), lse, None, True)
    acc = accumulation_dtype(q.dtype)
    dout, out = dout.to(acc), out.to(acc)
    return BackwardInputs(q, dout, out, lse, (dout * out).sum(dim=-1), False)


def remote_backward(
    grads: BackwardInputs,
    kv: torch.Tensor,
    q_ids: tuple[int, int],
    kv_ids,
    length: int,
    dkv_acc: torch.Tensor,
) -> list[tuple[slice, torch.Tensor]]:
    """The gradients of the unmasked calls of Accumulated.add_remote for one block: dK/dV are
    added into dkv_acc [2, B, Hk, M*S, D] (accumulation dtype); each query chunk's dq is
    returned with its rows of the rank's [B, H, 2S, D] queries, for the caller to add where
    its own sum lives (in the kernel's dtype after the own block's dq, or a float32 sum)."""
    dq_parts = []
    for slot, q_id in enumerate(q_ids):
        seen = visible_prefix(q_id, kv_ids)
        if seen == 0:
            continue
        keys = kv[:, :, :, : seen * length]
        dq, dk, dv = grads.block_backward(keys[0], keys[1], False, slot, length)
        dq_parts.append((slice(slot * length, (slot + 1) * length), dq))
        dkv_acc[0, :, :, : seen * length] += dk
        dkv_acc[1, :, :, : seen * length] += dv
    return dq_parts


def add_rows(dq: torch.Tensor, dq_parts: list[tuple[slice, torch.Tensor]]) -> None:
    """dq [B, H, 2S, D] += each (rows, part) of remote_backward, in place."""
    for rows, part in dq_parts:
        dq[:, :, rows] += part
