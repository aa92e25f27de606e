"""The leak metric: how much a model's loss at position t reads inputs after t.

A causal language model's loss at t (predicting token t + 1) may depend only on inputs at
positions <= t. Lighthouse's tile-wide selection breaks this (docs/LIGHTHOUSE.md s.10): which
spans are refined depends on the norms of later tokens of the tile, so the output at t can
change when a later input changes, and training learns to use it. The metric measures that
directly, on a fixed probe of validation positions t:

- next token: the mean paired increase of the loss at t when only the input at t + 1 (the
  very token position t predicts) is replaced by another token; targets are unchanged;
- near future: the same when the inputs at t + 2 .. t + 4 are replaced.

- other documents (when the data has end-of-document tokens): the mean paired increase of the
  loss at a position t' when every token of the documents before t''s document is replaced
  (by a shuffle of those same tokens; end-of-document tokens stay, so the boundaries do not
  move). With document masking (docs/LIGHTHOUSE.md s.12) it is exactly zero in both modes;
  without it, it measures how much a model reads the documents packed before.

Dense attention reads nothing after t, so the first two are exactly zero in dense mode (the batches of
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
VARIANTS = ("clean", "next", "near", "documents_clean", "other_documents")


@dataclass
class LeakProbe:
    """Probe rows: row i is a validation window whose loss is read at positions[i] only.

    inputs, targets: int64 [m, N], the windows as the loader gives them (targets = inputs
    shifted by one); next_token [m]: what replaces inputs[i, t + 1]; near_tokens [m, 3]: what
    replaces inputs[i, t + 2 .. t + 4]. Every replacement differs from the token it replaces.
    With end-of-document tokens: document_positions [m], a position t' whose document does not
    start the window (-1 where the window is one document: that row reads nothing), and
    other_documents [m, N], the row with every token before t''s document shuffled.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    positions: torch.Tensor
    next_token: torch.Tensor
    near_tokens: torch.Tensor
    document_positions: torch.Tensor | None = None
    other_documents: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return self.inputs.shape[0]

    @property
    def document_rows(self) -> int:
        """Rows that probe other documents (0 without end-of-document tokens)."""
        if self.document_positions is None:
            return 0
        return int((self.document_positions >= 0).sum())

    def batch(self, variant: str, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) [r, N] of `variant` for the probe rows `rows` (default all):
        targets keep only position t of each row (IGNORE_INDEX elsewhere)."""
        if variant not in VARIANTS:
            raise ValueError(f"leak probe variant must be one of {VARIANTS}, got {variant!r}")
        rows = rows or slice(0, self.rows)
        inputs = self.inputs[rows].clone()
        positions = self.positions[rows]
        if variant in ("documents_clean", "other_documents"):
            positions = self.document_positions[rows]
            if variant == "other_documents":
                inputs = self.other_documents[rows].clone()
        index = torch.arange(inputs.shape[0])
        targets = torch.full_like(inputs, IGNORE_INDEX)
        read = positions >= 0
        targets[index[read], positions[read]] = self.targets[rows][index[read], positions[read]]
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


def _other_documents(window: np.ndarray, eod_id: int, generator: torch.Generator):
    """(t', the window with the tokens of the documents before t''s shuffled): t' drawn among
    the positions whose document starts after an end-of-document token; (-1, window) when the
    window holds no such position."""
    ends = np.flatnonzero(window[:-1] == eod_id)  # a document ends with its end-of-document token
    if ends.size == 0:
        return -1, window.copy()
    first = int(ends[0]) + 1  # positions from here on have a document before them
    t = first + int(torch.randint(len(window) - first, (1,), generator=generator))
    start = int(ends[ends < t].max()) + 1  # where t's document starts
    changed = window.copy()
    before = np.flatnonzero(window[:start] != eod_id)
    order = torch.randperm(before.size, generator=generator).numpy()
    changed[before] = window[before[order]]
    return t, changed


def make_probe(
    stream: np.ndarray, seq_len: int, count: int, seed: int, eod_id: int | None = None
) -> LeakProbe:
    """`count` probe rows from the first validation windows of `stream` (row i uses window
    i mod W, W = the windows there, at most `count`); positions and replacements drawn from
    a generator seeded by `seed`, so every validation of a run uses the same probe. With
    `eod_id` the rows also probe the other documents (LeakProbe)."""
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
    probe = LeakProbe(
        torch.stack(rows),
        torch.stack(targets),
        torch.tensor(positions),
        torch.tensor(next_tokens),
        torch.tensor(near_tokens),
    )
    if eod_id is not None:
        pairs = [_other_documents(row.numpy(), eod_id, generator) for row in probe.inputs]
        probe.document_positions = torch.tensor([t for t, _ in pairs])
        probe.other_documents = torch.from_numpy(np.stack([w for _, w in pairs]))
    return probe


def leak_nats(loss_sums: Callable[[str], float], rows: int, documents: int = 0) -> dict[str, float]:
    """The metrics from `loss_sums(variant)`, the summed loss at the probe positions of all
    `rows` probe rows for that variant; `documents`: how many rows probe other documents
    (LeakProbe.document_positions >= 0), 0 for none."""
    clean = loss_sums("clean")
    leak = {
        "val/leak_next_token_nats": (loss_sums("next") - clean) / rows,
        "val/leak_near_future_nats": (loss_sums("near") - clean) / rows,
    }
    if documents:
        other = loss_sums("other_documents") - loss_sums("documents_clean")
        leak["val/leak_other_documents_nats"] = other / documents
    return leak
