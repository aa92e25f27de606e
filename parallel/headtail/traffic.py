"""Closed-form bytes each rank sends per attention layer under CP (forward and backward).

The categories are those transport.SentBytes records, so a test can compare this accounting
with what the code actually sends. Conventions (they follow the implementation):
- K and V travel in the activation dtype; gradients dK/dV are accumulated and sent in float32
  (float64 for float64 activations), see ring.py.
- Ring: W - 1 K/V hops forward, W - 1 again in backward (K/V are not kept), and W dK/dV hops
  (the accumulator returns to its owner). All-gather: W - 1 shares forward, W - 1 gradient
  shares in the reduce-scatter (ring-algorithm volume), and no K/V traffic in backward.
- Lighthouse exchanges compressed entries of every *query* head (selection is per query head,
  LIGHTHOUSE.md s.3), S_c per chunk; dense attention exchanges tokens of the Hkv K/V heads.
- Halo (Lighthouse only): each spill is c_L - 1 positions of the output, activation dtype; an
  interior rank sends two per direction, the first and last rank one (see halo.py).
- The causal selection (LIGHTHOUSE.md s.11) also all-gathers float32 thresholds, [B, H, L-1, 2]
  per chunk (selection_carry.py); the paper's selection sends none.
- Dense attention with documents (headtail/documents.py): the all-gather sends what it sends
  without them (a collective of equal shares). The ring sends, at each step s, rank r's block
  straight to rank r + s, only the columns from the first to the last one that any query of
  rank r + s attends to (an earlier key of its own document), K and V for all B rows, in
  forward and again in backward; and the dK/dV of the columns it received back to their
  owner. Counted here from the documents' token ids, independently of the exchange's pieces.

`python -m lh_cp.parallel.headtail.traffic [--world 8] [--heads 8] ...` prints the README table
(Lighthouse versus dense, an interior rank; MiB = 2**20 bytes).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.documents import check_documents
from lh_cp.parallel.headtail.attention import chunk_config
from lh_cp.parallel.headtail.exchange import exchange_function
from lh_cp.parallel.headtail.sharding import local_chunk_ids


@dataclass(frozen=True)
class CommBytes:
    """Bytes one rank sends for one layer, by category (SentBytes category names)."""

    kv_forward: int = 0
    kv_backward: int = 0
    dkv_backward: int = 0
    halo_forward: int = 0
    halo_backward: int = 0
    selection_thresholds: int = 0

    @property
    def forward(self) -> int:
        return self.kv_forward + self.halo_forward + self.selection_thresholds

    @property
    def backward(self) -> int:
        return self.kv_backward + self.dkv_backward + self.halo_backward

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def nonzero(self) -> dict[str, int]:
        """Categories with traffic, as SentBytes.by_category lists them."""
        return {name: value for name, value in asdict(self).items() if value}


def _grad_bytes(dtype_bytes: int) -> int:
    return 8 if dtype_bytes == 8 else 4


def _exchange_bytes(
    block_elements: int, world: int, dtype_bytes: int, exchange: str
) -> dict[str, int]:
    """Traffic of one exchange of a K+V block of `block_elements` elements per rank."""
    exchange_function(exchange)  # a known exchange
    if world == 1:
        return {}
    grad = _grad_bytes(dtype_bytes)
    if exchange == "ring":
        return {
            "kv_forward": (world - 1) * block_elements * dtype_bytes,
            "kv_backward": (world - 1) * block_elements * dtype_bytes,
            "dkv_backward": world * block_elements * grad,
        }
    return {
        "kv_forward": (world - 1) * block_elements * dtype_bytes,
        "dkv_backward": (world - 1) * block_elements * grad,
    }


def lighthouse_cp_bytes(
    n: int,
    world: int,
    rank: int,
    cfg: LighthouseConfig,
    *,
    batch: int,
    heads: int,
    head_dim: int,
    dtype_bytes: int,
    exchange: str,
) -> CommBytes:
    """Bytes rank `rank` of `world` sends in one Lighthouse layer (forward + backward) at length n."""
    local_cfg = chunk_config(cfg, n, world)
    chunk = n // (2 * world)
    entries_per_chunk = local_cfg.selected_length(chunk)  # S_c
    block = 2 * batch * heads * 2 * entries_per_chunk * head_dim  # K and V of two chunks
    counts = _exchange_bytes(block, world, dtype_bytes, exchange)
    spill = local_cfg.coarsest_span - 1
    if spill and world > 1:
        messages = int(rank < world - 1) + int(rank > 0)
        halo = messages * batch * spill * heads * head_dim * dtype_bytes
        counts["halo_forward"] = halo
        counts["halo_backward"] = halo
    if cfg.uses_thresholds and world > 1:
        # selection_carry.py: float32 [B, H, L-1, 2] per chunk, two chunks, all-gathered.
        counts["selection_thresholds"] = (world - 1) * 2 * batch * heads * (cfg.levels - 1) * 2 * 4
    return CommBytes(**counts)


def _local_positions(rank: int, world: int, chunk: int) -> np.ndarray:
    """Window positions of a rank's 2 * chunk tokens, in local order (head chunk, tail chunk)."""
    return np.concatenate(
        [np.arange(c * chunk, (c + 1) * chunk) for c in local_chunk_ids(rank, world)]
    )


def shared_column_count(ids: np.ndarray, world: int, receiver: int, owner: int) -> int:
    """Columns of `owner`'s block (its 2S tokens in local order) from the first to the last one
    that some query of `receiver` attends to, over all rows of ids [B, N] (each token's
    document); 0 when none. A key is attended to when a later query of the receiver lies in
    its document."""
    chunk = ids.shape[1] // (2 * world)
    queries = _local_positions(receiver, world, chunk)
    keys = _local_positions(owner, world, chunk)
    needed = np.zeros(keys.size, dtype=bool)
    for row in ids:
        latest = np.full(int(row.max()) + 1, -1)
        np.maximum.at(latest, row[queries], queries)  # the receiver's last query per document
        needed |= latest[row[keys]] > keys
    columns = np.flatnonzero(needed)
    return 0 if columns.size == 0 else int(columns[-1] - columns[0] + 1)


def document_ids_array(documents: Sequence[int] | torch.Tensor, batch: int, n: int) -> np.ndarray:
    """Each token's document index, int64 [B, N], from cumulative boundaries (checked by
    lh_cp.ops.documents.check_documents: DocumentsError names a broken rule)."""
    tensor = torch.as_tensor(documents, dtype=torch.int32).cpu()
    bounds = check_documents(tensor, batch, n, tensor.device)
    return np.repeat(np.arange(len(bounds) - 1), np.diff(bounds)).reshape(batch, n)


def dense_cp_bytes(
    n: int,
    world: int,
    *,
    batch: int,
    kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
    exchange: str,
    documents: Sequence[int] | torch.Tensor | None = None,
    rank: int = 0,
) -> CommBytes:
    """Bytes rank `rank` sends in one dense causal layer under CP (forward + backward) at
    length n; documents: the batch's cumulative boundaries (the same for every rank without
    them, or with the all-gather)."""
    if n % (2 * world) != 0:
        raise ValueError(f"N must be a multiple of 2 * W for head-tail sharding: N={n}, W={world}")
    block = 2 * batch * kv_heads * (n // world) * head_dim
    if documents is None or exchange != "ring" or world == 1:
        return CommBytes(**_exchange_bytes(block, world, dtype_bytes, exchange))
    ids = document_ids_array(documents, batch, n)
    if ids[:, -1].tolist() == list(range(batch)):  # one document per window: unmasked
        return CommBytes(**_exchange_bytes(block, world, dtype_bytes, exchange))
    column = 2 * batch * kv_heads * head_dim  # K and V elements of one column
    sent = sum(shared_column_count(ids, world, (rank + s) % world, rank) for s in range(1, world))
    returned = sum(
        shared_column_count(ids, world, rank, (rank - s) % world) for s in range(1, world)
    )
    return CommBytes(
        kv_forward=sent * column * dtype_bytes,
        kv_backward=sent * column * dtype_bytes,
        dkv_backward=returned * column * _grad_bytes(dtype_bytes),
    )


MIB = 2**20


def _length_label(n: int) -> str:
    return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def traffic_table(
    lengths: list[int],
    world: int,
    cfg: LighthouseConfig,
    *,
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
) -> str:
    """A markdown table, one row per sequence length."""
    rank = 1 if world > 2 else 0
    rows = [
        "| N | S selected | Lighthouse ring fwd | Lighthouse ring fwd+bwd | Lighthouse all-gather fwd+bwd "
        "| dense ring fwd | dense ring fwd+bwd | dense / Lighthouse (ring, fwd+bwd) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    shape = dict(batch=batch, head_dim=head_dim, dtype_bytes=dtype_bytes)
    for n in lengths:
        ring = lighthouse_cp_bytes(n, world, rank, cfg, heads=heads, exchange="ring", **shape)
        gather = lighthouse_cp_bytes(
            n, world, rank, cfg, heads=heads, exchange="allgather", **shape
        )
        dense = dense_cp_bytes(n, world, kv_heads=kv_heads, exchange="ring", **shape)
        rows.append(
            f"| {_length_label(n)} | {cfg.selected_length(n)} | {ring.forward / MIB:.1f} MiB | {ring.total / MIB:.1f} MiB "
            f"| {gather.total / MIB:.1f} MiB | {dense.forward / MIB:.1f} MiB | {dense.total / MIB:.1f} MiB "
            f"| {dense.total / ring.total:.1f}x |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=8, help="CP degree W")
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[128 * 1024, 256 * 1024, 512 * 1024, 1024 * 1024]
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype-bytes", type=int, default=2, help="activation bytes (2 = bf16)")
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--tile-budget", type=int, default=128)
    args = parser.parse_args(argv)
    cfg = LighthouseConfig(
        pool=args.pool, levels=args.levels, topk=args.topk, tile_budget=args.tile_budget
    )
    print(
        f"Bytes sent by one interior rank per attention layer, forward and backward; W={args.world}, "
        f"B={args.batch}, H={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, {args.dtype_bytes}-byte "
        f"activations, float32 gradients; Lighthouse pool={cfg.pool}, levels={cfg.levels}, topk={cfg.topk}, "
        f"tile_budget={cfg.tile_budget}."
    )
    print()
    print(
        traffic_table(
            args.lengths,
            args.world,
            cfg,
            batch=args.batch,
            heads=args.heads,
            kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            dtype_bytes=args.dtype_bytes,
        )
    )


if __name__ == "__main__":
    main()
