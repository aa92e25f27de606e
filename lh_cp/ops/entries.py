"""The Selection (which pyramid entries each head attends over, in causal order: LIGHTHOUSE.md
s.4-5) and the input checks every selection path shares (head counts, finite inputs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.pyramid import level_offsets


@dataclass(frozen=True)
class Selection:
    """The entries chosen for every (batch, head), sorted by their causal key.

    start, end: int64 [B, H, S], the token span [start, end) of each entry.
    level: int64 [B, H, S], the pyramid level (1 = single token).
    internal: bool [B, H, S], True for refined entries kept besides their children.
    levels: the pyramid depth L the keys are computed with.
    """

    start: torch.Tensor
    end: torch.Tensor
    level: torch.Tensor
    internal: torch.Tensor
    levels: int

    @property
    def key(self) -> torch.Tensor:
        """Causal key: L*start for leaves, L*(end-1) + (level-1) for internal entries."""
        leaf_key = self.levels * self.start
        internal_key = self.levels * (self.end - 1) + (self.level - 1)
        return torch.where(self.internal, internal_key, leaf_key)

    def slots(self, rows: int, cfg: LighthouseConfig, shift: int = 0) -> torch.Tensor:
        """Index of each entry in a flat level-major pyramid whose level 1 has `rows` rows.

        The entry of level l starting at token s is row s / c_l + shift of level l.
        """
        offsets = torch.tensor(level_offsets(rows, cfg)[:-1], device=self.start.device)
        span = self.end - self.start
        return offsets[self.level - 1] + self.start // span + shift

    def shifted(self, offset: int) -> Selection:
        """The same entries with token positions moved by `offset` (a chunk's global start)."""
        return Selection(
            self.start + offset, self.end + offset, self.level, self.internal, self.levels
        )


class NonFiniteInput(ValueError):
    """q, k or v of a Lighthouse layer holds NaN or inf (check_finite)."""


def check_finite(
    query_scores: torch.Tensor, key_scores: torch.Tensor, v: torch.Tensor | None = None
) -> None:
    """Raise NonFiniteInput (a ValueError) unless every q and k norm (hence every q and k entry) and every entry
    of v is finite: one reduction and one host sync for all three, the one the selection
    needs anyway. A NaN or inf would otherwise spread through the attention to almost every
    output row. amax propagates NaN and never overflows (a sum of large finite values could)."""
    parts = [query_scores.amax(), key_scores.amax()] + (
        [*torch.aminmax(v)] if v is not None else []
    )  # one pass over v
    if bool(torch.stack([x.float() for x in parts]).isfinite().all()):
        return
    # Count (batch, token) positions: a GQA key norm repeated per query head counts once.
    bad_positions = [
        ("q", (~query_scores.isfinite()).any(dim=1)),
        ("k", (~key_scores.isfinite()).any(dim=1)),
    ]
    if v is not None:
        bad_positions.append(("v", (~v.isfinite()).flatten(2).any(dim=2)))  # v [B, N, Hkv, D]
    bad = [
        f"{name} at {int(mask.sum())} token position(s)"
        for name, mask in bad_positions
        if bool(mask.any())
    ]
    raise NonFiniteInput(
        f"Lighthouse attention needs finite inputs: NaN or inf in {', '.join(bad)}"
    )


class EmptyInput(ValueError):
    """q or k has a zero-sized dimension (B, N, H or D = 0): nothing to attend (check_heads)."""


def check_heads(q: torch.Tensor, k: torch.Tensor) -> None:
    """q [B, N, H, D] and k [B, N, Hkv, D] must agree on B, N, D, and H % Hkv == 0; no
    dimension may be 0 (EmptyInput: an empty batch, sequence, head or head dimension has no
    attention to compute, and would otherwise fail deep inside a reduction or a division)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"expected q [B, N, H, D] and k [B, N, Hkv, D], got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    for name, t, dims in (("q", q, "BNHD"), ("k", k, ("B", "N", "Hkv", "D"))):
        empty = [f"{dim}=0" for dim, size in zip(dims, t.shape) if size == 0]
        if empty:
            raise EmptyInput(
                f"{name} has shape {tuple(t.shape)} with {', '.join(empty)}: attention needs B, N, "
                f"H, Hkv and D >= 1 (q [B, N, H, D], k and v [B, N, Hkv, D])"
            )
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B, N and D")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"query heads must be a multiple of key/value heads (GQA): H={q.shape[2]}, Hkv={k.shape[2]}"
        )
