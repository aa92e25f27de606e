"""The leak metric: how much a model's loss at position t reads inputs after t.

A causal language model's loss at t (predicting token t + 1) may depend only on inputs at
positions <= t. Lighthouse's tile-wide selection breaks this (docs/LIGHTHOUSE.md s.10): which
spans are refined depends on the norms of later tokens of the tile, so the output at t can
change when a later input changes, and training learns to use it. The metric measures that
directly, on a fixed probe of validation positions t:

- next token: the mean paired increase of the loss at t when only the input at t + 1 (the
  very token position t predicts) is replaced by another token; targets are unchanged;
- near future: the same when the inputs at t + 2 .. t + 4 are replaced.

Dense attention reads nothing after t, so both are exactly zero in dense mode (the batches of
the clean and perturbed forwards have identical shapes, so every kernel sees the same rows in
the same arrangement and position t's arithmetic is bit-identical). A positive value is loss
the model loses when its side channel into the future is disturbed.

Cost: three forwards (clean, next, near) of `positions` sequences each, without gradient, at
every validation where it runs: about `positions` training steps' worth of a one-sequence
batch (a forward is about a third of a training step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lh_cp.data.loader import IGNORE_INDEX

NEAR_OFFSETS = (2, 3, 4)  # the near-future inputs replaced: t + 2 .. t + 4
VARIANTS = ("clean", "next", "near")


@dataclass
class LeakProbe:
    """Probe rows: row i is a validation window whose loss is read at positions[i] only.

    inputs, targets: int64 [m, N], the windows as the loader gives them (targets = inputs
    shifted by one); next_token [m]: what replaces inputs[i, t + 1]; near_tokens [m, 3]: what
    replaces inputs[i, t + 2 .. t + 4]. Every replacement differs from the token it replaces.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    next_token: torch.Tensor
    near_tokens: torch.Tensor

    @property
    def rows(self) -> int:
        return self.inputs.shape[0]

    def batch(self, variant: str, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) [r, N] of `variant` for the probe rows `rows` (default all):
        targets keep only position t of each row (IGNORE_INDEX elsewhere)."""
        if variant not in VARIANTS:
            raise ValueError(f"leak probe variant must be one of {VARIANTS}, got {variant!r}")
        rows = rows or slice(0, self.rows)
        inputs = self.inputs[rows].clone()
        positions = self.positions[rows]
        index = torch.arange(inputs.shape[0])
        targets = torch.full_like(inputs, IGNORE_INDEX)
        targets[index, positions] = self.targets[rows][index, positions]
        if variant == "next":
            inputs[index, positions + 1] = self.next_token[rows]
        elif variant == "near":
            for column, offset in enumerate(NEAR_OFFSETS):
                inputs[index, positions + offset] = self.near_tokens[rows][:, column]
        return inputs, targets


def _replacement(window: np.ndarray, original: int, generator: torch.Generator) -> int:
    """Another token of the same window (so the replacement is in-distribution), != original."""
    different = np.flatnonzero(window != original)
    if different.size == 0:
        raise ValueError(
            f"the leak probe cannot replace token {original}: its validation window holds no other token"
        )
    return int(window[different[int(torch.randint(different.size, (1,), generator=generator))]])


def make_probe(stream: np.ndarray, seq_len: int, count: int, seed: int) -> LeakProbe:
    """`count` probe rows from the first validation windows of `stream` (row i uses window
    i mod W, W = the windows there, at most `count`); positions and replacements drawn from
    a generator seeded by `seed`, so every validation of a run uses the same probe."""
    windows = min(count, (len(stream) - 1) // seq_len)
    if windows < 1 or seq_len <= max(NEAR_OFFSETS):
        raise ValueError(
            f"the leak probe needs a validation window of data.seq_len={seq_len} > {max(NEAR_OFFSETS)} "
            f"tokens; the validation split holds {len(stream)} tokens"
        )
    generator = torch.Generator().manual_seed(seed)
    rows, targets, positions, next_tokens, near_tokens = [], [], [], [], []
    for i in range(count):
        begin = (i % windows) * seq_len
        window = np.asarray(stream[begin : begin + seq_len + 1]).astype(np.int64)
        t = int(torch.randint(seq_len - max(NEAR_OFFSETS), (1,), generator=generator))
        rows.append(torch.from_numpy(window[:-1]))
        targets.append(torch.from_numpy(window[1:]))
        positions.append(t)
        next_tokens.append(_replacement(window[:-1], int(window[t + 1]), generator))
        near_tokens.append(
            [_replacement(window[:-1], int(window[t + o]), generator) for o in NEAR_OFFSETS]
        )
    return LeakProbe(
        torch.stack(rows),
        torch.stack(targets),
        torch.tensor(positions),
        torch.tensor(next_tokens),
        torch.tensor(near_tokens),
    )


def leak_nats(loss_sums: Callable[[str], float], rows: int) -> dict[str, float]:
    """The two metrics from `loss_sums(variant)`, the summed loss at the probe positions of
    all `rows` probe rows for that variant."""
    clean = loss_sums("clean")
    return {
        "val/leak_next_token_nats": (loss_sums("next") - clean) / rows,
        "val/leak_near_future_nats": (loss_sums("near") - clean) / rows,
    }
