"""Conformance with peers' context-parallel test designs: their shapes, their input
distributions and their stated tolerances, against lh-cp's dense and Lighthouse CP (all-gather
and ring exchanges) on gloo, W = 2 and 4, outputs and the gradients of q, k and v, compared
with the single-process result of the same inputs.

Sources (read for their designs; no code taken):
- ring-flash-attention, test/test_zigzag_ring_flash_attn_func.py: batch 1, 5 heads, head dim
  128, causal, bf16, randn inputs, head-tail ("zigzag") shards; it prints the differences and
  states no tolerance, so ours applies (below).
- TransformerEngine, tests/pytorch/attention/test_attention_with_cp.py and
  run_attention_with_cp.py: batch 2, 12 heads of 128, MHA (12 KV heads), GQA (2) and MQA (1),
  causal, inputs clamp(randn, -1, 1), bf16 tolerances atol = rtol = 2.5e-2 (MHA) and 3.5e-2
  (GQA/MQA) on outputs and gradients.
- PyTorch, test/distributed/tensor/test_attention.py (RingAttentionTest): batch 8, 8 heads of
  32, rand inputs in [0, 1), bf16 with atol = 8e-3 * W and rtol = 1e-3 * W on outputs and
  gradients.
- yunchang (long-context-attention), test/test_hybrid_attn.py: batch 1, 32 heads of 40, bf16,
  randn inputs, outputs checked with atol = 1e-2, rtol = 0 (gradients only printed).
- GQA 32/4 with head dim 128 (Llama-3-8B's attention), bf16: TransformerEngine's GQA bound.
Sequence lengths are scaled down to 256 tokens so the whole set runs on a 2-core CPU, and
causal throughout (lh-cp's attention is causal). Every case runs in float32 with lh-cp's
float32 bound against the single-process result, 1e-5 absolute (observed: a few 1e-7), far
stricter than any of the peers' bf16 bounds. In bf16 the peers compare two bf16 paths built
from the same kernels, whose rounding errors coincide; lh-cp's CP path and PyTorch's
single-device SDPA round differently (the CP path accumulates in float32). So in bf16 both are
compared with the float32 computation on the same bf16-rounded inputs ("truth"): the dense CP
output must meet the source's stated bf16 tolerance there (ring-flash-attention states none:
lh-cp's 2e-2 relative applies), and every field of both kinds (output and the q, k, v
gradients) must be at most 2x the single-device bf16 error plus 1e-3, i.e. CP is as accurate
as one device. The peers' output bounds are for dense attention: a Lighthouse output sums
several deliveries and reaches 2-6 where a dense one stays below about 1, and there one bf16
step (0.0156 in [2, 4)) already exceeds yunchang's absolute 1e-2, on one device too. Against that
truth even PyTorch's single-device bf16 SDPA exceeds RingAttentionTest's gradient bound (dv of
its case: 40 elements beyond 0.016 + 0.002 |x|), which is why gradients are not held to the
peers' bf16 bounds here.

Document masking ("dense_documents"): the same shapes and bounds with packed documents
(DOCUMENT_LENGTHS: documents crossing the chunk boundaries of W = 2 and 4, a one-token
document), against the single-process document-masked attention on the same inputs, which
tests/test_documents.py holds equal to every document run alone.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

from lh_cp import LighthouseConfig, causal_attention, lighthouse_attention
from lh_cp.parallel import shard_sequence

N = 256
# Lighthouse: tile T = 256 * 2 / 32 = 16 tokens, so every chunk of 2W = 4 or 8 chunks (64 or
# 32 tokens) holds whole tiles; pool 2, 2 levels: spans of 2, a spill of one row into the next chunk.
LIGHTHOUSE = LighthouseConfig(pool=2, levels=2, topk=32, tile_budget=2)
OWN_BF16_RELATIVE = 2e-2
OWN_FLOAT32_ABSOLUTE = 1e-5

# name -> (batch, heads, kv heads, head dim, input distribution, the source's bf16 output check):
# ("peer", atol, rtol) as stated, ("peer_scaled", atol, rtol) times W, ("relative", bound) where
# the source states none (lh-cp's bound, relative to the largest reference value).
CASES = {
    "ring_flash_attention_zigzag": (1, 5, 5, 128, "randn", ("relative", OWN_BF16_RELATIVE)),
    "transformer_engine_mha": (2, 12, 12, 128, "clamped_randn", ("peer", 2.5e-2, 2.5e-2)),
    "transformer_engine_gqa": (2, 12, 2, 128, "clamped_randn", ("peer", 3.5e-2, 3.5e-2)),
    "transformer_engine_mqa": (2, 12, 1, 128, "clamped_randn", ("peer", 3.5e-2, 3.5e-2)),
    "pytorch_ring_attention": (8, 8, 8, 32, "rand", ("peer_scaled", 8e-3, 1e-3)),
    "yunchang_hybrid": (1, 32, 32, 40, "randn", ("peer", 1e-2, 0.0)),
    "gqa_32_4": (1, 32, 4, 128, "randn", ("peer", 3.5e-2, 3.5e-2)),
}


def _inputs(name: str, dtype: torch.dtype) -> list[torch.Tensor]:
    batch, heads, kv_heads, dim, kind, _ = CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    shapes = [
        (batch, N, heads, dim),
        (batch, N, kv_heads, dim),
        (batch, N, kv_heads, dim),
        (batch, N, heads, dim),
    ]
    if kind == "rand":
        tensors = [torch.rand(s, generator=gen) for s in shapes]
    else:
        tensors = [torch.randn(s, generator=gen) for s in shapes]
        if kind == "clamped_randn":
            tensors = [t.clamp(-1, 1) for t in tensors]
    return [t.to(dtype) for t in tensors]


def _run(fn, inputs, **kwargs):
    q, k, v, dout = (t.clone() for t in inputs)
    for t in (q, k, v):
        t.requires_grad_()
    out = fn(q, k, v, **kwargs)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


# Each window's document lengths (sum N), alternating by batch row.
DOCUMENT_LENGTHS = ([37, 1, 90, 64, 64], [128, 100, 28])
KINDS = ("dense", "lighthouse", "dense_documents")


def _documents(batch: int) -> torch.Tensor:
    """The documents= boundaries of `batch` windows of N tokens."""
    bounds = [0]
    for row in range(batch):
        for length in DOCUMENT_LENGTHS[row % 2]:
            bounds.append(bounds[-1] + length)
    return torch.tensor(bounds, dtype=torch.int32)


def _attention(kind: str):
    if kind == "lighthouse":
        return lambda q, k, v, **kw: lighthouse_attention(q, k, v, LIGHTHOUSE, **kw)
    if kind == "dense_documents":
        return lambda q, k, v, **kw: causal_attention(
            q, k, v, documents=_documents(q.shape[0]), **kw
        )
    return causal_attention


def _job(rank: int, world: int) -> dict:
    """Every case on this rank: its CP shard of out, dq, dk, dv per exchange."""
    import torch.distributed as dist

    group = dist.group.WORLD
    results = {}
    for name in CASES:
        for kind in KINDS:
            for dtype in (torch.float32, torch.bfloat16):
                local = [shard_sequence(t, group) for t in _inputs(name, dtype)]
                for exchange in ("allgather", "ring"):
                    results[(name, kind, str(dtype).removeprefix("torch."), exchange)] = _run(
                        _attention(kind), local, cp=group, exchange=exchange
                    )
    return results


def _references() -> dict:
    """(case, kind, dtype) -> [out, dq, dk, dv] in one process: for bf16 the float32 computation
    on the bf16-rounded inputs (the truth) and, under (.., "bfloat16_one_device"), the bf16 one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        references = {}
        for name in CASES:
            for kind in KINDS:
                references[(name, kind, "float32")] = _run(
                    _attention(kind), _inputs(name, torch.float32)
                )
                low = _inputs(name, torch.bfloat16)
                references[(name, kind, "bfloat16")] = _run(
                    _attention(kind), [t.float() for t in low]
                )
                references[(name, kind, "bfloat16_one_device")] = [
                    t.float() for t in _run(_attention(kind), low)
                ]
        return references
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def references():
    return _references()


def _head_tail(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s head-tail shard (chunks rank and 2W-1-rank) of a full [B, N, ...] tensor."""
    chunks = t.chunk(2 * world, dim=1)
    return torch.cat([chunks[rank], chunks[2 * world - 1 - rank]], dim=1)


def _max_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want.float()).abs().max().item()


def _check_bf16_output(label: str, world: int, got: torch.Tensor, want: torch.Tensor) -> None:
    rule = CASES[label.split()[0]][5]
    if rule[0] == "relative":
        error = _max_error(got, want) / want.abs().max().item()
        assert error <= rule[1], (label, error)
        return
    atol, rtol = (
        (rule[1] * world, rule[2] * world) if rule[0] == "peer_scaled" else (rule[1], rule[2])
    )
    torch.testing.assert_close(
        got.float(), want.float(), atol=atol, rtol=rtol, msg=lambda m: f"{label} out: {m}"
    )


@pytest.mark.timeout(600)
@pytest.mark.parametrize("world", [2, 4])
def test_peer_shapes_and_tolerances(world, references):
    results = run_distributed(_job, world, timeout=540)
    checked = 0
    for rank, rank_results in enumerate(results):
        for (name, kind, dtype, exchange), got in rank_results.items():
            label = f"{name} {kind} {exchange} W={world} rank {rank}"
            want = [_head_tail(t, rank, world) for t in references[(name, kind, dtype)]]
            if dtype == "float32":
                for field, a, b in zip(("out", "dq", "dk", "dv"), got, want):
                    assert _max_error(a, b) <= OWN_FLOAT32_ABSOLUTE, (
                        label,
                        field,
                        _max_error(a, b),
                    )
                    checked += 1
                continue
            one_device = [
                _head_tail(t, rank, world) for t in references[(name, kind, "bfloat16_one_device")]
            ]
            if kind != "lighthouse":
                _check_bf16_output(label, world, got[0], want[0])
            for field, a, b, c in zip(("out", "dq", "dk", "dv"), got, want, one_device):
                assert _max_error(a, b) <= 2 * _max_error(c, b) + 1e-3, (
                    label,
                    field,
                    _max_error(a, b),
                    _max_error(c, b),
                )
                checked += 1
    assert (
        checked == world * len(CASES) * len(KINDS) * 2 * 2 * 4
    )  # ranks x cases x kinds x dtypes x exchanges x fields
