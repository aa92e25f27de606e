"""The index plan the fast gather and scatter run on, and how to build it from a Selection.

A Selection lists the entries of each (batch, head) in causal order. The kernels need two other
views of the same entries, both int32 and both pure index arithmetic (no float work):

- `level_index`, `level_position` [B, H, S]: the entries grouped by level, level 1 first, each
  level a fixed-size block (P * topk entries for levels 1..L-1, N / c_L for level L). Within a
  block every entry has the same span, which the gather and scatter-backward kernels take as a
  compile-time constant. `level_index` is the entry's index inside its level (start / span),
  `level_position` its position in causal order (its row in the gathered [B, H, S, D] tensors).
- `slot_map` [B, H, M]: for every pyramid slot (level-major, level l holds N / c_l slots) the
  causal position of the entry in that slot, or -1 if it was not selected. Every token lies in
  at most one selected entry per level, so "which entries cover / deliver to token t" becomes
  one lookup per level, and the gather-backward and scatter-forward kernels write each output
  row once, without atomics.

Everything here is plain PyTorch and runs on CPU; the selection kernel writes the same plan
directly. Offsets are int64 in PyTorch; the int32 fields hold values < S or < M, both far below
2**31 for every N up to 2**31 / 2 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.entries import Selection
from lh_cp.ops.pyramid import level_offsets


def level_block_sizes(n: int, cfg: LighthouseConfig) -> list[int]:
    """Entries of each level (index l-1) per (batch, head): P*topk below the top, N/c_L at the top."""
    cfg.tile_size(n)
    below = [cfg.pool * cfg.topk] * (cfg.levels - 1)
    return below + [n // cfg.coarsest_span]


def level_block_offsets(n: int, cfg: LighthouseConfig) -> list[int]:
    """Start of each level's block in the level-grouped lists; the last item is S."""
    offsets, total = [], 0
    for size in level_block_sizes(n, cfg):
        offsets.append(total)
        total += size
    offsets.append(total)
    return offsets


@dataclass(frozen=True)
class Plan:
    """Index views of one selection for the kernels (see module docstring).

    slot_map: int32 [B, H, M], causal position of the entry in each pyramid slot, or -1.
    level_index: int32 [B, H, S], entry index inside its level, grouped by level.
    level_position: int32 [B, H, S], causal position of the same entries.
    n: sequence length the plan was built for.
    """

    slot_map: torch.Tensor
    level_index: torch.Tensor
    level_position: torch.Tensor
    n: int

    @staticmethod
    def from_selection(sel: Selection, n: int, cfg: LighthouseConfig) -> Plan:
        """Build the plan from a Selection in causal order (any device, plain PyTorch)."""
        batch, heads, s = sel.start.shape
        if s != cfg.selected_length(n):
            raise ValueError(
                f"selection has {s} entries, the configuration gives S={cfg.selected_length(n)} for N={n}"
            )
        device = sel.start.device
        position = torch.arange(s, device=device, dtype=torch.int64).expand(batch, heads, s)
        # Stable sort by level keeps causal order inside a level; the blocks then have the
        # fixed sizes of level_block_sizes because every tile emits the same count per level.
        order = torch.sort(sel.level, dim=-1, stable=True).indices
        span = sel.end - sel.start
        index = (sel.start // span).gather(-1, order)
        offsets = torch.tensor(level_offsets(n, cfg)[:-1], device=device, dtype=torch.int64)
        slots = offsets[sel.level - 1] + sel.start // span  # [B, H, S]
        slot_map = torch.full(
            (batch, heads, level_offsets(n, cfg)[-1]), -1, dtype=torch.int32, device=device
        )
        slot_map.scatter_(-1, slots, position.to(torch.int32))
        return Plan(slot_map, index.to(torch.int32), order.to(torch.int32), n)


def selection_from_fields(
    start: torch.Tensor, level: torch.Tensor, internal: torch.Tensor, cfg: LighthouseConfig
) -> Selection:
    """The public Selection (int64 start/end/level, bool internal) from compact kernel outputs."""
    level = level.to(torch.int64)
    start = start.to(torch.int64)
    span = cfg.pool ** (level - 1)
    return Selection(start, start + span, level, internal.to(torch.bool), cfg.levels)
