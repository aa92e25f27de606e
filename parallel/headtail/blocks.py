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

from dataclasses import dataclass

import torch

from lh_cp.parallel.headtail.fused_blocks import fused_block_backward, fused_block_forward, fused_supported
from lh_cp.pyramid import accumulation_dtype


def _causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """True where key j is in the future of query i (diagonal block: Sq == Sk)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(diagonal=1)


def _scores(qg: torch.Tensor, k: torch.Tensor, causal: bool) -> torch.Tensor:
    """qg [B, Hk, G, Sq, D], k [B, Hk, Sk, D] -> scaled scores [B, Hk, G, Sq, Sk]."""
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * qg.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(_causal_mask(scores.shape[-2], scores.shape[-1], scores.device), float("-inf"))
    return scores


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one block: returns out [B, H, Sq, D] and lse [B, H, Sq].

    Both in the accumulation dtype (float32, or float64 for float64 inputs). causal=True is
    the diagonal block of a chunk with itself (Sq == Sk, query i sees keys 0..i).
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


def empty_accumulators(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and LSE accumulators for queries like q [.., S, D] that have seen no key yet:
    out 0 and lse -inf (merge_into gives them weight 0), in the accumulation dtype."""
    acc = accumulation_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    return out, lse


def merge_into(out_acc: torch.Tensor, lse_acc: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fold a block result (out [.., S, D], lse [.., S]) into running accumulators, in place.

    An empty accumulator has lse -inf and out 0: its weight exp(-inf - lse) is exactly 0.
    `out` may be in a lower precision than the accumulator; products are taken in the latter.
    """
    merged = torch.logaddexp(lse_acc, lse)
    out_acc.mul_(torch.exp(lse_acc - merged).unsqueeze(-1)).add_(out * torch.exp(lse - merged).unsqueeze(-1))
    lse_acc.copy_(merged)


def visible_blocks(q_ids: tuple[int, ...], kv_ids: tuple[int, ...]) -> list[tuple[int, int, bool]]:
    """(query slot, key slot, causal) for every pair where the key chunk is not in the future.

    Chunk i sees all of chunk j < i and itself causally; later chunks are skipped entirely.
    """
    return [(qi, ki, kid == qid) for qi, qid in enumerate(q_ids) for ki, kid in enumerate(kv_ids) if kid <= qid]


def accumulate_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_ids: tuple[int, ...],
    kv_ids: tuple[int, ...],
    out_acc: torch.Tensor,
    lse_acc: torch.Tensor,
) -> None:
    """Attend the local query chunks to one key/value block and merge the results in place.

    Chunk-major layout, so that a chunk is a contiguous [B, Hx, S, D] slice the kernels take
    as is: q [2, B, H, S, D] (chunks q_ids); k, v [2, B, Hk, S, D] (chunks kv_ids); out_acc
    [2, B, H, S, D] and lse_acc [2, B, H, S] in the accumulation dtype.
    """
    block = _forward_fn(q)
    for qi, ki, causal in visible_blocks(q_ids, kv_ids):
        out, lse = block(q[qi], k[ki], v[ki], causal)
        merge_into(out_acc[qi], lse_acc[qi], out, lse)


@dataclass(frozen=True)
class BackwardInputs:
    """What every block's backward reads, prepared once per layer: the output gradient and
    the final output in the form the block kernels want, delta = rowsum(dout * out) for the
    reference (the fused kernels compute it themselves), and the final LSE."""

    dout: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor
    delta: torch.Tensor | None
    fused: bool


def backward_inputs(dout: torch.Tensor, q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> BackwardInputs:
    """dout [2, B, H, S, D], the float32 out and lse of the merged forward -> BackwardInputs.

    The fused kernels take dout and out in q's dtype (converted here once, not per block)."""
    if fused_supported(q):
        return BackwardInputs(dout.to(q.dtype).contiguous(), out.to(q.dtype), lse, None, True)
    dout = dout.to(out.dtype)
    return BackwardInputs(dout, out, lse, (dout * out).sum(dim=-1), False)


def accumulate_backward(
    grads: BackwardInputs,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_ids: tuple[int, ...],
    kv_ids: tuple[int, ...],
    dq_acc: torch.Tensor,
    dk_acc: torch.Tensor,
    dv_acc: torch.Tensor,
) -> None:
    """Add one key/value block's contribution to dq_acc [2, B, H, S, D] and dk/dv_acc [2, B, Hk, S, D]
    (accumulation dtype; the blocks' gradients may be in q's dtype and are widened by the sum)."""
    for qi, ki, causal in visible_blocks(q_ids, kv_ids):
        if grads.fused:
            dq, dk, dv = fused_block_backward(grads.dout[qi], q[qi], k[ki], v[ki], grads.out[qi], grads.lse[qi], causal)
        else:
            dq, dk, dv = block_backward(grads.dout[qi], q[qi], k[ki], v[ki], grads.lse[qi], grads.delta[qi], causal)
        dq_acc[qi] += dq
        dk_acc[ki] += dk
        dv_acc[ki] += dv
