"""RoPE at pooled entries (LighthouseConfig.rope = "entries", docs/LIGHTHOUSE.md s.14).

The rotation itself (`rotate`, rotate-half / HF Llama layout) is the one the model applies to
tokens (lh_cp.model.transformer.apply_rope calls it), so a level-1 entry rotated here equals
the model's rotated token bit for bit. With rope = "entries" the layer receives q and k before
rotation plus the rotation tables (cos, sin) of its local tokens, and rotates each gathered q
and k entry at the position of the last token it covers (`rotate_entries`); v is never rotated.
"""

from __future__ import annotations

import torch

from lh_cp.ops.config import LighthouseConfig

RopeTables = tuple[torch.Tensor, torch.Tensor]
"""(cos, sin) of the layer's local tokens, each [N, D/2] (positions shared by every row) or
[B, N, D/2] (per row, e.g. positions restarting at each packed document)."""


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each vector of x [..., D] by cos/sin [..., D/2] (broadcast
    against x without its last dimension)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def check_rope(
    rope: RopeTables | None, cfg: LighthouseConfig | None, q: torch.Tensor
) -> RopeTables | None:
    """The tables of a layer call with q [B, N, H, D], as [B, N, D/2] each (a view, expanded
    over B when shared), or None for cfg.rope == "tokens" (and dense, cfg None). Raises
    ValueError naming the rule: tables required by rope="entries", refused by rope="tokens"
    (q and k already rotated), and shaped [N, D/2] or [B, N, D/2] on q's device."""
    wants = cfg is not None and cfg.rope == "entries"
    if rope is None:
        if wants:
            raise ValueError(
                'LighthouseConfig.rope="entries" needs the rotation tables of the local tokens: '
                "pass rope=(cos, sin), each [N, D/2] or [B, N, D/2], with q and k unrotated"
            )
        return None
    if not wants:
        setting = "dense attention" if cfg is None else f"LighthouseConfig.rope={cfg.rope!r}"
        raise ValueError(
            f"rope=(cos, sin) was given but {setting} takes q and k already rotated; "
            'pass rope only with LighthouseConfig.rope="entries"'
        )
    if not isinstance(rope, (tuple, list)) or len(rope) != 2:
        raise ValueError(f"rope must be a pair (cos, sin) of tensors, got {type(rope).__name__}")
    batch, n, _, dim = q.shape
    tables = []
    for name, t in zip(("cos", "sin"), rope):
        if not isinstance(t, torch.Tensor) or t.shape not in (
            (n, dim // 2),
            (batch, n, dim // 2),
        ):
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(
                f"rope {name} must be [N, D/2] = [{n}, {dim // 2}] or [B, N, D/2] = "
                f"[{batch}, {n}, {dim // 2}] for q {tuple(q.shape)}, got {shape}"
            )
        if t.device != q.device or not t.is_floating_point():
            raise ValueError(
                f"rope {name} must be a floating-point tensor on q's device {q.device}, "
                f"got {t.dtype} on {t.device}"
            )
        tables.append(t.expand(batch, n, dim // 2))
    return tables[0], tables[1]


def rotate_tokens(
    q: torch.Tensor, k: torch.Tensor, rope: RopeTables | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, N, H, D], k [B, N, Hkv, D] rotated at their own positions with the checked tables
    [B, N, D/2] (what the model does under rope="tokens"); unchanged when rope is None."""
    if rope is None:
        return q, k
    cos, sin = (t.unsqueeze(-2) for t in rope)  # [B, N, 1, D/2]
    return rotate(q, cos, sin), rotate(k, cos, sin)


def _gathered(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table [B, N, D/2] at rows [B, H, S] -> [B, H, S, D/2]."""
    batch, heads, s = rows.shape
    index = rows.reshape(batch, heads * s, 1).expand(-1, -1, table.shape[-1])
    return table.gather(1, index).view(batch, heads, s, -1)


def _rotated_like(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotate(x, cos, sin) in a tensor with x's memory layout (heads-outer entries stay so)."""
    out = torch.empty_like(x)
    out.copy_(rotate(x, cos, sin))
    return out


class _RotateEntries(torch.autograd.Function):
    """Entries [B, H, S, D] rotated at token rows [B, H, S]. The rotation is orthogonal, so the
    gradient is the incoming gradient rotated back (cos, -sin). Saved: the rows and the tables
    (the model's, alive anyway); the gathered angles are formed again in backward."""

    @staticmethod
    def forward(ctx, x, rows, cos, sin):
        ctx.save_for_backward(rows, cos, sin)
        return _rotated_like(x, _gathered(cos, rows), _gathered(sin, rows))

    @staticmethod
    def backward(ctx, grad):
        rows, cos, sin = ctx.saved_tensors
        return _rotated_like(grad, _gathered(cos, rows), -_gathered(sin, rows)), None, None, None


def rotate_entries(x: torch.Tensor, last_rows: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """Entries x [B, H, S, D] rotated at the tables' (cos, sin) [B, N, D/2] rows `last_rows`
    [B, H, S] (int64: the local index of the last token each entry covers, end - 1)."""
    cos, sin = rope
    return _RotateEntries.apply(x, last_rows, cos.to(x.dtype), sin.to(x.dtype))
