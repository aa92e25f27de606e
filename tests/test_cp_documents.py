"""Dense attention with documents under context parallelism (gloo, CPU): every document's
outputs and q/k/v gradients equal that document run alone, on every rank's shard.

One spawned job per W in {2, 3, 4} runs every case and returns the worst errors; the
assertions happen here. Head-tail layout, both exchanges: the layouts of document_cases.py
(documents crossing chunk and rank boundaries and the middle of the window, a one-token
document, many short documents, documents aligned to chunk starts, one document per window),
float64 and float32, GQA and MHA; bytes sent equal the accounting (traffic.dense_cp_bytes,
counted from token ids); no gradient crosses a boundary; the ranks disagreeing (different or
invalid documents on one rank, documents on one rank only) raise a named error on every rank;
Lighthouse refuses documents. The GPU bookkeeping (bf16 block results, float32 LSE, the own
block in a varlen call) runs with emulated kernels, as tests/test_cp_fused_path.py does.
Plain Ulysses (W = 2, 4, DeepSpeed over gloo): the contiguous shard of each document alone.

Tolerances: float64 <= 1e-9 and float32 <= 1e-5 (summation order only: partial softmaxes
merged by LSE against one SDPA call per document; a misplaced key changes values at O(1e-1));
bf16 emulated fused path <= 2e-2 of the largest float32 reference value.
"""

from __future__ import annotations

import importlib.util
import itertools

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from document_cases import LAYOUTS, N, bounds_of, documents_of, each_document_alone, inputs

from lh_cp import LighthouseConfig, causal_attention, lighthouse_attention
from lh_cp.parallel import SentBytes, dense_cp_bytes, shard_sequence

TOLERANCE = {"torch.float64": 1e-9, "torch.float32": 1e-5, "torch.bfloat16": 2e-2}
HEADS = ((4, 2), (2, 2))
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def _errors(got: list[torch.Tensor], want: list[torch.Tensor], relative: bool = False) -> dict:
    errors = {}
    for field, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        scale = b.abs().max().item() if relative else 1.0
        errors[field] = (a.double() - b.double()).abs().max().item() / scale
    return errors


def _cp_run(q, k, v, dout, documents, group, exchange):
    """The rank's shards of out, dq, dk, dv, and the bytes it sent (by category)."""
    leaves = [shard_sequence(t, group).requires_grad_() for t in (q, k, v)]
    with SentBytes() as meter:
        out = causal_attention(*leaves, cp=group, exchange=exchange, documents=documents)
        out.backward(shard_sequence(dout, group))
    return [out.detach(), *(t.grad for t in leaves)], dict(meter.by_category)


def _raised(fn) -> str | None:
    try:
        fn()
    except ValueError as err:
        return f"{type(err).__name__}: {err}"
    return None


def _head_tail_cases(rank: int, world: int, group) -> dict:
    results = {}
    for (name, layout), exchange, dtype, (heads, kv_heads) in itertools.product(
        LAYOUTS.items(), ("allgather", "ring"), (torch.float64, torch.float32), HEADS
    ):
        q, k, v, dout = inputs(heads, kv_heads, dtype, seed=heads + kv_heads + len(name))
        want = each_document_alone(q, k, v, dout, bounds_of(layout))
        got, sent = _cp_run(q, k, v, dout, documents_of(layout), group, exchange)
        expected = dense_cp_bytes(
            N,
            world,
            batch=q.shape[0],
            kv_heads=kv_heads,
            head_dim=q.shape[-1],
            dtype_bytes=q.element_size(),
            exchange=exchange,
            documents=bounds_of(layout),
            rank=rank,
        ).nonzero()
        results[(name, exchange, str(dtype), heads, kv_heads)] = (
            _errors(got, [shard_sequence(t, group) for t in want]),
            sent,
            expected,
        )
    return results


def _no_gradient_across(group) -> dict:
    """The loss of the 30-token document (window 0, tokens 6..35) only: every q/k/v gradient
    outside it is exactly zero on this rank's shard, and some inside is not (on the ranks
    holding some of it)."""
    found = {}
    q, k, v, dout = inputs(4, 2, torch.float64, seed=11)
    inside = torch.zeros(q.shape[:2], dtype=torch.bool)
    inside[0, 6:36] = True
    for exchange in ("allgather", "ring"):
        leaves = [shard_sequence(t, group).requires_grad_() for t in (q, k, v)]
        out = causal_attention(
            *leaves, cp=group, exchange=exchange, documents=documents_of(LAYOUTS["crossing"])
        )
        mine = shard_sequence(inside, group)
        (out * shard_sequence(dout, group))[mine].sum().backward()
        found[exchange] = [
            (
                leaf.grad[~mine].abs().max().item(),
                leaf.grad[mine].abs().max().item() if mine.any() else 0.0,
            )
            for leaf in leaves
        ]
    return found


def _disagreements(rank: int, world: int, group) -> dict:
    """Every rank's error message when one rank passes other documents, invalid documents,
    or documents where the others pass None; and Lighthouse with documents."""
    q, k, v, _ = inputs(4, 2, torch.float32, seed=2)
    local = [shard_sequence(t, group) for t in (q, k, v)]
    crossing = documents_of(LAYOUTS["crossing"])

    def call(documents):
        return lambda: causal_attention(*local, cp=group, exchange="ring", documents=documents)

    # Whether documents are given is agreed with the shapes, at a signature's first call:
    # shapes no other call of this job uses (3 heads).
    fresh = [shard_sequence(t, group) for t in inputs(3, 3, torch.float32, seed=4)[:3]]
    cfg = LighthouseConfig(pool=2, levels=2, topk=2 * N // 8, tile_budget=2)
    return {
        "different": _raised(call(documents_of(LAYOUTS["short"]) if rank == 0 else crossing)),
        "invalid": _raised(
            call(torch.tensor([0, 5, 90], dtype=torch.int32) if rank == 1 else crossing)
        ),
        "only_rank_0": _raised(
            lambda: causal_attention(
                *fresh, cp=group, exchange="ring", documents=crossing if rank == 0 else None
            )
        ),
        "lighthouse": _raised(
            lambda: lighthouse_attention(*local, cfg, cp=group, documents=crossing)
        ),
    }


def _emulate_fused_kernels():
    """Replace the fused block functions by the reference with their dtype contract: outputs
    and dq in the inputs' bf16, LSE float32, GQA dK/dV float32 (tests/test_cp_fused_path.py)."""
    from lh_cp.parallel.headtail import blocks

    calls = {"varlen": 0}

    def forward(q, k, v, causal, same=None):
        out, lse = blocks.block_forward(q, k, v, causal, same)
        return out.to(q.dtype), lse.float()

    def backward(dout, q, k, v, out, lse, causal, same=None):
        delta = (dout.float() * out.float()).sum(-1)
        dq, dk, dv = blocks.block_backward(dout.float(), q, k, v, lse, delta, causal, same)
        grouped = q.shape[1] != k.shape[1]
        return dq.to(q.dtype), *(g.float() if grouped else g.to(q.dtype) for g in (dk, dv))

    def varlen_forward(q, k, v, cu, longest, segments=None):
        calls["varlen"] += 1
        return forward(q, k, v, True, _same_document(cu, q.shape[0], q.shape[2]))

    def varlen_backward(dout, q, k, v, out, lse, cu, longest):
        return backward(dout, q, k, v, out, lse, True, _same_document(cu, q.shape[0], q.shape[2]))

    blocks.fused_supported = lambda q: q.dtype == torch.bfloat16
    blocks.fused_block_forward = forward
    blocks.fused_block_backward = backward
    blocks.fused_varlen_forward = varlen_forward
    blocks.fused_varlen_backward = varlen_backward
    return calls


def _same_document(cu: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """bool [B, L, L] from varlen cumulative run lengths over B * L tokens."""
    lengths = (cu[1:] - cu[:-1]).long()
    ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths).view(batch, length)
    return ids[:, :, None] == ids[:, None, :]


def _fused_path(group) -> dict:
    calls = _emulate_fused_kernels()
    results = {}
    for name, exchange in itertools.product(("crossing", "short"), ("allgather", "ring")):
        q, k, v, dout = inputs(4, 2, torch.bfloat16, seed=21)
        want = each_document_alone(*(t.float() for t in (q, k, v, dout)), bounds_of(LAYOUTS[name]))
        got, _ = _cp_run(q, k, v, dout, documents_of(LAYOUTS[name]), group, exchange)
        results[(name, exchange)] = (
            _errors(got, [shard_sequence(t, group) for t in want], relative=True),
            str(got[0].dtype),
        )
    results["varlen_calls"] = calls["varlen"]
    return results


def _ulysses_cases(rank: int, world: int, group) -> dict:
    from lh_cp.parallel.ulysses.plain import ulysses_attention
    from lh_cp.parallel.ulysses.sharding import ulysses_shard

    results = {}
    for (name, layout), dtype in itertools.product(LAYOUTS.items(), (torch.float64, torch.float32)):
        q, k, v, dout = inputs(4, 2, dtype, seed=31 + len(name))
        want = each_document_alone(q, k, v, dout, bounds_of(layout))
        leaves = [ulysses_shard(t, group).clone().requires_grad_() for t in (q, k, v)]
        out = ulysses_attention(*leaves, None, group, documents_of(layout))
        out.backward(ulysses_shard(dout, group))
        results[(name, str(dtype))] = _errors(
            [out.detach(), *(t.grad for t in leaves)], [ulysses_shard(t, group) for t in want]
        )
    return results


def documents_job(rank: int, world: int, ulysses: bool) -> dict:
    group = dist.new_group(list(range(world)))
    results = {
        "head_tail": _head_tail_cases(rank, world, group),
        "no_gradient_across": _no_gradient_across(group),
        "disagreements": _disagreements(rank, world, group),
    }
    if ulysses:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        results["ulysses"] = _ulysses_cases(rank, world, group)
    results["fused_path"] = _fused_path(group)  # last: it replaces the block functions
    return results


_RESULTS: dict[int, list] = {}


def _results(world: int) -> list:
    if world not in _RESULTS:
        ulysses = HAS_DEEPSPEED and world in (2, 4)
        _RESULTS[world] = run_distributed(documents_job, world, ulysses, timeout=280)
    return _RESULTS[world]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_cp_documents_equal_each_document_alone(world):
    results = _results(world)
    for exchange, field in itertools.product(("allgather", "ring"), range(3)):
        # the document's own q/k/v do get gradient, on the ranks that hold some of it
        assert max(r["no_gradient_across"][exchange][field][1] for r in results) > 0
    for rank, result in enumerate(results):
        cases = result["head_tail"]
        assert len(cases) == len(LAYOUTS) * 2 * 2 * len(HEADS)
        for key, (errors, sent, expected) in cases.items():
            tolerance = TOLERANCE[key[2]]
            assert max(errors.values()) <= tolerance, (rank, world, key, errors)
            assert sent == expected, (rank, world, key, sent, expected)
        for exchange, grads in result["no_gradient_across"].items():
            for outside, _ in grads:
                assert outside == 0.0, (rank, exchange, grads)
        messages = result["disagreements"]
        assert messages["different"].startswith(
            "DocumentsError: the ranks of the context-parallel group pass different documents"
        ), messages
        if rank == 1:
            assert messages["invalid"].startswith(
                "DocumentsError: documents must start at 0 and end at B * N"
            ), messages
        else:
            assert messages["invalid"].startswith(
                "DocumentsError: rank(s) [1] of the context-parallel group passed invalid documents"
            ), messages
        assert "documents given (0 or 1): rank 1 0, rank 0 1" in messages["only_rank_0"], messages
        assert "Lighthouse attention with documents= is not supported yet" in messages["lighthouse"]
        fused = result["fused_path"]
        assert fused.pop("varlen_calls") > 0
        for key, (errors, dtype) in fused.items():
            assert dtype == "torch.bfloat16" and max(errors.values()) <= TOLERANCE[dtype], (
                rank,
                key,
                errors,
            )


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="needs DeepSpeed: pip install --no-build-isolation deepspeed"
)
@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_documents_equal_each_document_alone(world):
    for rank, result in enumerate(_results(world)):
        assert len(result["ulysses"]) == len(LAYOUTS) * 2
        for key, errors in result["ulysses"].items():
            assert max(errors.values()) <= TOLERANCE[key[1]], (rank, world, key, errors)
