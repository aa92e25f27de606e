"""Triton selection, gather and scatter as differentiable ops: the kernel side of
lh_cp.ops.compress (compress_kernels), whose reference twin is lh_cp.ops.select, lh_cp.ops.pyramid and
lh_cp.ops.scatter.

Gather and scatter are autograd Functions whose forward and backward are the two row kernels
of rows.py, each writing every output row once: the whole path is deterministic given a
deterministic SDPA backend (benchmarks/NOTES.md records which are).
"""

from __future__ import annotations

import torch

from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.entries import Selection
from lh_cp.ops.kernels.rows import empty_entries, expand_rows, pool_rows
from lh_cp.ops.kernels.scores import token_norms
from lh_cp.ops.kernels.selection import select_plan
from lh_cp.ops.kernels.slot_plan import Plan, selection_from_fields
from lh_cp.ops.select import selection_scores


def _plan_tensors(ctx) -> Plan:
    slot_map, index, position = ctx.saved_tensors
    return Plan(slot_map, index, position, ctx.n)


class _GatherEntries(torch.autograd.Function):
    """q [B, N, H, D], k/v [B, N, Hkv, D] -> pooled entries [B, H, S, D] each (mean of a span),
    contiguous or heads-outer (empty_entries).

    Saved for backward: the int32 plan only (pooling is linear).
    """

    @staticmethod
    def forward(ctx, q, k, v, plan, cfg, heads_outer):
        group = q.shape[2] // k.shape[2]
        ctx.save_for_backward(plan.slot_map, plan.level_index, plan.level_position)
        ctx.n, ctx.cfg, ctx.group = plan.n, cfg, group
        shape = (q.shape[0], plan.level_index.shape[1], plan.level_index.shape[2], q.shape[3])
        outs = [empty_entries(*shape, x.dtype, x.device, heads_outer) for x in (q, k, v)]
        return tuple(pool_rows([q, k, v], plan, cfg, shift=0, mean=True, group=group, outs=outs))

    @staticmethod
    def backward(ctx, grad_q, grad_k, grad_v):
        plan = _plan_tensors(ctx)
        # An entry tensor that reached no loss has no gradient: zeros of the entries' shape.
        present = next(g for g in (grad_q, grad_k, grad_v) if g is not None)
        grads = [torch.zeros_like(present) if g is None else g for g in (grad_q, grad_k, grad_v)]
        (dq,) = expand_rows([grads[0]], plan, ctx.cfg, shift=0, mean=True, group=1)
        dk, dv = expand_rows(
            [grads[1], grads[2]], plan, ctx.cfg, shift=0, mean=True, group=ctx.group
        )
        return dq, dk, dv, None, None, None


class _ScatterEntries(torch.autograd.Function):
    """Entry outputs [B, H, S, D] -> token outputs [B, N, H, D] (sum of deliveries) and the
    `spill` rows [B, spill, H, D] past N: what the last spans deliver beyond the sequence (the
    halo of a CP chunk; spill = 0 on one device, which clips it).

    The spill rows are a second, small launch, so the N rows need no copy out of a longer
    buffer; backward pools the two gradients as one token tensor (pool_rows' tail).
    """

    @staticmethod
    def forward(ctx, entries, plan, cfg, spill):
        ctx.save_for_backward(plan.slot_map, plan.level_index, plan.level_position)
        ctx.n, ctx.cfg = plan.n, cfg
        ctx.entries_layout = torch.empty_like(
            entries, device="meta"
        )  # the gradient keeps the entries' strides
        ctx.set_materialize_grads(False)
        (rows,) = expand_rows([entries], plan, cfg, shift=1, mean=False)
        if spill == 0:
            return rows, rows.new_empty((rows.shape[0], 0, *rows.shape[2:]))
        (spilled,) = expand_rows(
            [entries], plan, cfg, shift=1, mean=False, rows=spill, first_row=plan.n
        )
        return rows, spilled

    @staticmethod
    def backward(ctx, grad_rows, grad_spill):
        plan = _plan_tensors(ctx)
        if grad_rows is None:  # only the spill reached a loss
            grad_rows = grad_spill.new_zeros((grad_spill.shape[0], ctx.n, *grad_spill.shape[2:]))
        tail = grad_spill if grad_spill is not None and grad_spill.shape[1] > 0 else None
        layout = ctx.entries_layout
        grad = torch.empty_strided(
            layout.shape, layout.stride(), dtype=grad_rows.dtype, device=grad_rows.device
        )
        return (
            pool_rows([grad_rows], plan, ctx.cfg, shift=1, mean=False, tail=tail, outs=[grad])[0],
            None,
            None,
            None,
        )


def gather_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: Plan,
    cfg: LighthouseConfig,
    heads_outer: bool = False,
):
    """Pooled entries of the plan (differentiable): q [B, N, H, D], k/v [B, N, Hkv, D] -> 3 x [B, H, S, D],
    heads-outer in memory if asked (empty_entries)."""
    return _GatherEntries.apply(q, k, v, plan, cfg, heads_outer)


def scatter_plan(entries: torch.Tensor, plan: Plan, cfg: LighthouseConfig, spill: int = 0):
    """Deliver entry outputs [B, H, S, D] to token rows (differentiable): ([B, N, H, D], the
    spill rows [B, spill, H, D] past N)."""
    return _ScatterEntries.apply(entries, plan, cfg, spill)


def kernel_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: LighthouseConfig,
    v: torch.Tensor | None = None,
    document_bounds: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token scores the kernel path selects from: Triton norms for "norm" (key norms per kv
    head), lh_cp.ops.select.selection_scores for the other scorers; float32 [B, H or Hkv, N]."""
    with torch.no_grad():
        if cfg.scorer == "norm":
            return token_norms(q.detach()), token_norms(k.detach())
        return selection_scores(q.detach(), k.detach(), v, cfg, document_bounds)


def select_with_plan(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: LighthouseConfig,
    v: torch.Tensor | None = None,
    preceding: torch.Tensor | None = None,
    restart: torch.Tensor | None = None,
    document_bounds: list[int] | None = None,
):
    """Triton scores and selection: (plan, start int32, level int8, internal int8); non-finite
    q, k (or v, when given) raise. `preceding`, `restart`: see
    lh_cp.ops.kernels.selection_reference.select_from_scores; scorers other than "norm" and
    `document_bounds`: see lh_cp.ops.select.selection_scores."""
    with torch.no_grad():
        return select_plan(
            *kernel_scores(q, k, cfg, v, document_bounds),
            cfg,
            None if v is None else v.detach(),
            preceding,
            restart,
        )


def select(
    q: torch.Tensor,
    k: torch.Tensor,
    cfg: LighthouseConfig,
    preceding: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
) -> Selection:
    """Kernel twin of lh_cp.ops.select.select: the public Selection, int64 fields in causal
    order (v: needed by the "dilated" and "gla" scorers)."""
    _, start, level, internal = select_with_plan(q, k, cfg, v, preceding=preceding)
    return selection_from_fields(start, level, internal, cfg)
