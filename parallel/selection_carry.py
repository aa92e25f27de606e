"""The causal selection's one dependence across ranks (LIGHTHOUSE.md s.11).

Under selection "causal" a tile decides with thresholds that the tile before it computed from
its own tokens. The first tile of a CP chunk (or Ulysses shard) therefore needs what the last
tile of the previous chunk hands on: [B, H, L-1, 2] floats per chunk, gathered here in one
small all-gather. Nothing else of the selection crosses ranks, and the paper's selection
("tile_topk") sends nothing here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from lh_cp.parallel.transport import all_gather


def preceding_thresholds(
    carry: torch.Tensor,
    my_chunks: list[int],
    locate: Callable[[int], tuple[int, int]],
    group: dist.ProcessGroup,
) -> torch.Tensor:
    """The thresholds each of this rank's chunks starts from: [P, B, H, L-1, 2].

    carry [P, B, H, L-1, 2]: selection_carry of this rank's P chunks, in slot order;
    my_chunks: their global chunk indices; locate(c) -> (rank, slot) of global chunk c. The
    sequence's first chunk starts from -inf, as the single device does (thresholds_in_use).
    """
    everyone = all_gather(carry, group, "selection_thresholds")  # [W, P, B, H, L-1, 2]
    rows = []
    for chunk in my_chunks:
        if chunk == 0:
            rows.append(torch.full_like(carry[0], float("-inf")))
        else:
            rank, slot = locate(chunk - 1)
            rows.append(everyone[rank, slot])
    return torch.stack(rows)
