"""Attention of one block of queries against one block of keys, with its log-sum-exp.

Context parallelism splits a causal attention into blocks (query chunk i, key chunk j). Each
block's output is normalised by its own softmax denominator, so partial results are combined
by their log-sum-exp (LSE); the backward of a block needs only the final output, the final LSE
and the block's inputs. This file is the pure-PyTorch reference of those steps: explicit
softmax in float32 (float64 for float64 inputs), so that CPU results match the single-device
path to the tolerances the tests state.

Layout: q [B, H, Sq, D], k and v [B, Hk, Sk, D] with H % Hk == 0 (GQA: query head h reads
key/value head h // (H // Hk)); scale 1/sqrt(D), as the single-device SDPA.

Document masking (documents.py) keeps every remote call an unmasked rectangle: each query
piece (rows of one chunk) attends to one range of a block's columns. Only the rank's own block
changes: causal attention restricted to the documents' runs in local order, a same-document
mask here and one varlen kernel call on GPUs (fused_blocks.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lh_cp.ops import kernels
from lh_cp.ops.kernels.merge_reference import merge_reference
from lh_cp.ops.pyramid import accumulation_dtype
from lh_cp.parallel.headtail.documents import (
    OwnSegments,
    QueryPiece,
    whole_chunks,
)
from lh_cp.parallel.headtail.fused_blocks import (
    fused_block_backward,
    fused_block_forward,
    fused_supported,
    fused_varlen_backward,
    fused_varlen_forward,
)


def _causal_mask(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """True where key j is in the future of query i, the diagonal aligned bottom-right: the
    last Sq keys are the query block itself, every key before them is visible (Sq <= Sk)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).triu(diagonal=1 + sk - sq)


def _scores(
    qg: torch.Tensor, k: torch.Tensor, causal: bool, same_document: torch.Tensor | None = None
) -> torch.Tensor:
    """qg [B, Hk, G, Sq, D], k [B, Hk, Sk, D] -> scaled scores [B, Hk, G, Sq, Sk]; keys in the
    future (causal) or outside the query's document (same_document [B, Sq, Sk] False) are -inf."""
    scores = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * qg.shape[-1] ** -0.5
    if causal:
        scores = scores.masked_fill(
            _causal_mask(scores.shape[-2], scores.shape[-1], scores.device), float("-inf")
        )
    if same_document is not None:
        scores = scores.masked_fill(~same_document[:, None, None], float("-inf"))
    return scores


def block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    same_document: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of one block: returns out [B, H, Sq, D] and lse [B, H, Sq].

    Both in the accumulation dtype (float32, or float64 for float64 inputs). causal=True: the
    keys end with the query block itself (Sq <= Sk), query i sees keys 0 .. i + Sk - Sq; with
    Sq == Sk that is the diagonal block of a chunk with itself. same_document [B, Sq, Sk]: also
    only keys where it is True (every query must keep at least one key).
    """
    acc = accumulation_dtype(q.dtype)
    batch, heads, sq, dim = q.shape
    kv_heads = k.shape[1]
    qg = q.to(acc).reshape(batch, kv_heads, heads // kv_heads, sq, dim)
    scores = _scores(qg, k.to(acc), causal, same_document)  # [B, Hk, G, Sq, Sk]
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
    same_document: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one block given the *final* lse [B, H, Sq] and delta = rowsum(dout * out).

    With the final LSE, exp(scores - lse) is this block's share of the full softmax, so the
    per-block gradients simply add up: dq [B, H, Sq, D], dk and dv [B, Hk, Sk, D], all in the
    accumulation dtype. causal and same_document mask as in block_forward.
    """
    acc = accumulation_dtype(q.dtype)
    batch, heads, sq, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    qg = q.to(acc).reshape(batch, kv_heads, group, sq, dim)
    doutg = dout.to(acc).reshape(batch, kv_heads, group, sq, dim)
    k_acc, v_acc = k.to(acc), v.to(acc)
    scores = _scores(qg, k_acc, causal, same_document)
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


def own_block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: OwnSegments | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank's two chunks against themselves, q [B, H, 2S, D], k/v [B, Hk, 2S, D] in local
    order (head chunk r, then tail chunk 2W-1-r): one square causal call, since the tail
    chunk sees all of the earlier head chunk and the head chunk only itself, causally; with
    documents (segments), causal inside each run of one document (documents.py).
    Returns out [B, H, 2S, D] (the kernel's dtype) and lse [B, H, 2S] (float32 or float64)."""
    if segments is None:
        return _forward_fn(q)(q, k, v, True)
    if fused_supported(q):
        return fused_varlen_forward(q, k, v, segments.cu, segments.longest)
    return block_forward(q, k, v, True, segments.same_document())


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


def merges_per_piece(
    pieces: tuple[QueryPiece, ...], q_ids: tuple[int, int], key_blocks: list, length: int
) -> list[int]:
    """How many of the key blocks (chunk ids of each, in arrival order) each query piece
    attends to."""
    return [
        sum(
            1
            for kv_ids in key_blocks
            if piece.key_columns(q_ids[piece.slot], kv_ids, length) is not None
        )
        for piece in pieces
    ]


def piece_rows(x: torch.Tensor, piece: QueryPiece, length: int) -> torch.Tensor:
    """The piece's rows of a [B, H, 2S, ..] tensor of the rank's two chunks, contiguous."""
    if piece.is_whole_chunk(length):
        return chunk_rows(x, piece.slot, length)
    return x[piece.batch, :, piece.local_rows(length)].contiguous()


class Accumulated:
    """The output and LSE of the rank's two query chunks [B, H, 2S, D] over the key blocks
    seen so far, starting from the own block's result (at W = 1 that is all: nothing is
    converted or merged).

    Every remote block is folded in by one merge (merge_into) per query piece (documents.py;
    without documents a piece is a whole chunk) whose destination is chosen so that nothing is
    converted apart: a piece's last merge writes its final rows into `out` itself (in the
    block kernel's dtype: the layer's output); a piece that has more merges to come keeps a
    running sum in the accumulation dtype in between (the ring at W >= 3), so the partial
    results of W - 1 blocks are never rounded to bf16 on the way.
    `key_blocks`: the chunk ids of each remote block, in the order add_remote receives them;
    `pieces`: the query pieces (default: each chunk whole, no documents).
    """

    def __init__(
        self,
        out: torch.Tensor,
        lse: torch.Tensor,
        q_ids: tuple[int, int],
        key_blocks: list,
        pieces: tuple[QueryPiece, ...] | None = None,
    ) -> None:
        self.out, self.lse, self.q_ids = out, lse, q_ids
        length = out.shape[2] // 2
        self.pieces = whole_chunks(length) if pieces is None else pieces
        self.merges_left = merges_per_piece(self.pieces, q_ids, key_blocks, length)
        self.running: list[torch.Tensor | None] = [None] * len(self.pieces)
        self.query_rows: dict[int, torch.Tensor] = {}  # each piece's contiguous q rows, copied once

    def add_remote(
        self, q: torch.Tensor, kv: torch.Tensor, kv_ids, length: int, first_column: int = 0
    ) -> None:
        """Attend each query piece to the columns of the block kv [2, B, Hk, M, D] (chunks
        kv_ids, ascending; its column 0 is the block's column `first_column`, where only a
        part of it travelled) it sees, one unmasked call each, and merge by LSE."""
        block = _forward_fn(q)
        for index, piece in enumerate(self.pieces):
            q_id = self.q_ids[piece.slot]
            columns = piece.key_columns(q_id, kv_ids, length)
            if columns is None:
                continue
            if self.merges_left[index] == 0:
                raise ValueError(
                    f"key block {kv_ids} reaches query chunk {q_id} after its last listed block"
                )
            keys = kv[:, piece.batch, :, columns[0] - first_column : columns[1] - first_column]
            if index not in self.query_rows:
                self.query_rows[index] = piece_rows(q, piece, length)
            out, lse = block(self.query_rows[index], keys[0], keys[1], False)
            rows = piece.local_rows(length)
            self.merges_left[index] -= 1
            final_rows, running = self.out[piece.batch, :, rows], self.running[index]
            if self.merges_left[index] == 0:
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
                final_rows if running is None else running,
                self.lse[piece.batch, :, rows],
                out,
                lse,
                dest,
            )
            self.running[index] = dest if self.merges_left[index] else None

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

    def piece(self, piece: QueryPiece, length: int) -> tuple:
        """q, dout, out, lse, delta of a query piece's rows, contiguous."""
        key = (piece.slot, piece.batch.start, piece.batch.stop, piece.rows)
        if key not in self._chunks:
            self._chunks[key] = tuple(
                None if x is None else piece_rows(x, piece, length)
                for x in (self.q, self.dout, self.out, self.lse, self.delta)
            )
        return self._chunks[key]

    def own_backward(self, k: torch.Tensor, v: torch.Tensor, segments: OwnSegments | None = None):
        """dq, dk, dv of all 2S query rows against the rank's own keys k, v (own_block_forward's
        call: causal, inside each document's run with segments)."""
        q, dout, out, lse, delta = self.q, self.dout, self.out, self.lse, self.delta
        if segments is None:
            if self.fused:
                return fused_block_backward(dout, q, k, v, out, lse, True)
            return block_backward(dout, q, k, v, lse, delta, True)
        if self.fused:
            return fused_varlen_backward(dout, q, k, v, out, lse, segments.cu, segments.longest)
        return block_backward(dout, q, k, v, lse, delta, True, segments.same_document())

    def piece_backward(self, k: torch.Tensor, v: torch.Tensor, piece: QueryPiece, length: int):
        """dq, dk, dv of a query piece's rows against keys k, v (an unmasked call)."""
        q, dout, out, lse, delta = self.piece(piece, length)
        if self.fused:
            return fused_block_backward(dout, q, k, v, out, lse, False)
        return block_backward(dout, q, k, v, lse, delta, False)


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
    pieces: tuple[QueryPiece, ...] | None = None,
    first_column: int = 0,
) -> list[tuple[tuple[slice, slice], torch.Tensor]]:
    """The gradients of the unmasked calls of Accumulated.add_remote for one block (kv
    [2, B, Hk, M, D], whose column 0 is the block's column `first_column`): dK/dV are added
    into dkv_acc (kv's shape, accumulation dtype); each query piece's dq is returned with its
    (batch rows, rows) of the rank's [B, H, 2S, D] queries, for the caller to add where its own
    sum lives (in the kernel's dtype after the own block's dq, or a float32 sum)."""
    dq_parts = []
    for piece in whole_chunks(length) if pieces is None else pieces:
        columns = piece.key_columns(q_ids[piece.slot], kv_ids, length)
        if columns is None:
            continue
        first, last = columns[0] - first_column, columns[1] - first_column
        keys = kv[:, piece.batch, :, first:last]
        dq, dk, dv = grads.piece_backward(keys[0], keys[1], piece, length)
        dq_parts.append(((piece.batch, piece.local_rows(length)), dq))
        dkv_acc[0, piece.batch, :, first:last] += dk
        dkv_acc[1, piece.batch, :, first:last] += dv
    return dq_parts


def add_rows(dq: torch.Tensor, dq_parts: list[tuple[tuple[slice, slice], torch.Tensor]]) -> None:
    """dq [B, H, 2S, D] += each ((batch rows, rows), part) of remote_backward, in place."""
    for (batch, rows), part in dq_parts:
        dq[batch, :, rows] += part
