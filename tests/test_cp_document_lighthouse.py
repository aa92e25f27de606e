"""Lighthouse over packed documents under CP (gloo, CPU) equals one process (LIGHTHOUSE.md s.12).

One spawned job per W in {2, 3, 4} runs every case (layout x selection x GQA) in float64
through the public call (`lighthouse_attention(..., cp=group, exchange=..., documents=...)`)
with every exchange that takes documents: "allgather" and "ring" (head-tail shards) at every
W, "ulysses_compressed" (contiguous shards) at W = 2 and 4 (the heads, 4, must divide over
W). Each job returns the worst absolute errors of the output and the q/k/v gradients against
the single-process layer on the same inputs, and the bytes each rank sent (transport's
SentBytes) next to the closed-form accounting (traffic.lighthouse_documents_cp_bytes,
ulysses.traffic.compressed_ulysses_document_bytes); the assertions happen here.
Tolerance 1e-9: the same attention rows are summed in a different order (a document's keys
gathered from several chunks, or merged by log-sum-exp over the ring's steps, against one call
per document); a misplaced or missing key changes values at O(1e-1).
Layouts: documents crossing chunk and rank boundaries, one-token documents, a document
filling a window, many short documents, long documents around the middle, one document per
window (the unmasked layer).
The ring's attention is also run on random packed streams with the fused kernels' dtype
contract emulated on CPU (bf16 blocks, float32 LSE and accumulators, as
tests/test_cp_documents.py does for dense layers) against float64 on the same inputs: relative
error <= 2e-2 (bf16 operands).
At W = 2 the job also runs rope="entries" (LIGHTHOUSE.md s.14, positions restarting per
document) through every exchange, and a small model with it under allgather and ring, against
one process (1e-9).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dist_utils import run_distributed

from lh_cp import LighthouseConfig, lighthouse_attention
from lh_cp.parallel import SentBytes, shard_sequence, unshard_sequence

TOLERANCE = 1e-9
BF16_TOLERANCE = 2e-2  # relative to the largest float64 value: bf16 operands, float32 merges
HEADS = ((4, 4), (4, 2))


def _layouts(n: int) -> list[list[int]]:
    """Boundaries of two windows of n tokens (B = 2), several shapes each."""
    half, quarter = n // 2, n // 4
    return [
        [0, 3, half + 5, n - 2, n, n + 1, 2 * n - quarter, 2 * n],  # crossings, a 1-token doc
        [0, n, n + quarter + 1, 2 * n],  # a window that is one document
        [0, *range(7, n, 7), n, *range(n + 5, 2 * n, 5), 2 * n],  # many short documents
        [0, quarter - 1, n - quarter + 2, n, 2 * n],  # long documents around the middle
        [0, n, 2 * n],  # one document per window: the unmasked layer
    ]


def _cases(world: int):
    n = 2 * world * 16  # chunks of 16 tokens: two tiles of 8 (p = 2, L = 3, c_L = 4)
    for selection in ("tile_topk", "causal"):
        cfg = LighthouseConfig(
            pool=2, levels=3, topk=n * 2 // 8, tile_budget=2, selection=selection
        )
        for index, bounds in enumerate(_layouts(n)):
            yield f"{selection}/{index}", cfg, n, bounds


def _exchanges(world: int) -> tuple[str, ...]:
    return ("allgather", "ring", "ulysses_compressed") if world in (2, 4) else ("allgather", "ring")


def _expected_bytes(exchange, docs, cfg, n, world, rank, heads) -> dict[str, int]:
    from lh_cp.parallel.headtail.traffic import lighthouse_documents_cp_bytes
    from lh_cp.parallel.ulysses.traffic import compressed_ulysses_document_bytes

    shape = dict(batch=2, heads=heads, head_dim=8, dtype_bytes=8)
    if exchange == "ulysses_compressed":
        counts = compressed_ulysses_document_bytes(docs, n, world, rank, cfg, **shape)
        return {k: v for k, v in dataclasses.asdict(counts).items() if v}
    return lighthouse_documents_cp_bytes(
        docs, n, world, rank, cfg, exchange=exchange, **shape
    ).nonzero()


def _layout_of(exchange: str):
    """(shard, unshard) of the exchange's layout."""
    from lh_cp.parallel.ulysses.sharding import ulysses_shard, ulysses_unshard

    if exchange == "ulysses_compressed":
        return ulysses_shard, ulysses_unshard
    return shard_sequence, lambda x, group: unshard_sequence(x.detach(), group)


def _cp_run(q, k, v, dout, cfg, docs, group, exchange, rope=None):
    """out, dq, dk, dv of the whole window (gathered from the shards) and this rank's bytes;
    rope: the whole window's (cos, sin) [B, n, D/2] (cfg.rope = "entries"), sharded here."""
    shard, unshard = _layout_of(exchange)
    local = [shard(x, group).clone().requires_grad_() for x in (q, k, v)]
    local_rope = None if rope is None else tuple(shard(t, group) for t in rope)
    with SentBytes() as meter:
        out = lighthouse_attention(
            *local, cfg, cp=group, exchange=exchange, documents=docs, rope=local_rope
        )
        (out * shard(dout, group)).sum().backward()
    got = [unshard(x.detach(), group) for x in (out, *(t.grad for t in local))]
    return got, dict(meter.by_category)


def _emulate_fused_segments():
    """Replace the ring's fused segment kernels by the reference with their dtype contract:
    outputs and gradients in the inputs' bf16, LSE float32."""
    from lh_cp.parallel.headtail import blocks, stream_ring

    calls = {"forward": 0, "backward": 0}

    def forward(q, k, v, cu_q, cu_k, longest_q, longest_k, causal):
        calls["forward"] += 1
        out, lse = blocks.segments_forward(q, k, v, cu_q.tolist(), cu_k.tolist(), causal)
        return out.to(q.dtype), lse.float()

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, longest_q, longest_k, causal):
        calls["backward"] += 1
        delta = (dout.float() * out.float()).sum(-1)
        grads = blocks.segments_backward(
            dout.float(), q, k, v, lse, delta, cu_q.tolist(), cu_k.tolist(), causal
        )
        return tuple(g.to(q.dtype) for g in grads)

    stream_ring.fused_supported = lambda q: q.dtype == torch.bfloat16
    stream_ring.fused_segments_forward = forward
    stream_ring.fused_segments_backward = backward
    return calls


def _fused_ring(rank: int, world: int, group) -> dict:
    """The ring's attention on random packed streams (crossing layout) in bf16 with emulated
    fused kernels against the same inputs in float64 (the reference, checked exactly above):
    relative errors of out, dq, dk, dv, and how often the emulated kernels ran."""
    from lh_cp.ops.document_lighthouse import chunk_stream, document_regions, plan_streams
    from lh_cp.parallel.headtail.attention import chunk_config
    from lh_cp.parallel.headtail.sharding import local_chunk_ids
    from lh_cp.parallel.headtail.stream_ring import stream_ring_attention, stream_ring_plan

    calls = _emulate_fused_segments()
    _, cfg, n, bounds = next(iter(_cases(world)))
    chunk, regions = n // (2 * world), document_regions(bounds, 2, n, cfg)
    streams = [
        [chunk_stream(regions, b, c * chunk, chunk, cfg, n) for c in range(2 * world)]
        for b in range(2)
    ]
    local_cfg = chunk_config(cfg, n, world)
    mine = [streams[b][c] for b in range(2) for c in local_chunk_ids(rank, world)]
    plan = plan_streams(mine, chunk, local_cfg.selected_length(chunk), local_cfg.tiles, "cpu")
    ring = stream_ring_plan(streams, plan.pieces, rank, world, torch.device("cpu"))
    gen = torch.Generator().manual_seed(rank)
    q, k, v, dout = (
        torch.randn(plan.length, 4, 8, generator=gen).bfloat16().double() for _ in "qkvo"
    )
    results = []
    for dtype in (torch.float64, torch.bfloat16):
        leaves = [x.to(dtype).clone().requires_grad_() for x in (q, k, v)]
        out = stream_ring_attention(*leaves, group, ring)
        out.backward(dout.to(dtype))
        results.append([out.detach(), *(x.grad for x in leaves)])
    want, got = results
    errors = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want)]
    return {"errors": errors, "dtype": str(got[0].dtype), **calls}


def _job(rank: int, world: int) -> dict:
    import torch.distributed as dist

    group = dist.group.WORLD
    errors, sent = {}, {}
    for name, cfg, n, bounds in _cases(world):
        for heads, kv_heads in HEADS:
            gen = torch.Generator().manual_seed(len(errors))
            q, dout = (
                torch.randn(2, n, heads, 8, generator=gen, dtype=torch.float64) for _ in "ab"
            )
            k, v = (
                torch.randn(2, n, kv_heads, 8, generator=gen, dtype=torch.float64) for _ in "ab"
            )
            docs = torch.tensor(bounds, dtype=torch.int32)
            ref = [x.clone().requires_grad_() for x in (q, k, v)]
            out = lighthouse_attention(*ref, cfg, documents=docs)
            (out * dout).sum().backward()
            want = [out.detach()] + [t.grad for t in ref]
            for exchange in _exchanges(world):
                key = f"{name}/H{heads}Hkv{kv_heads}/{exchange}"
                got, meter = _cp_run(q, k, v, dout, cfg, docs, group, exchange)
                errors[key] = [(a - b).abs().max().item() for a, b in zip(got, want)]
                sent[key] = (
                    meter,
                    _expected_bytes(exchange, bounds, cfg, n, world, rank, heads),
                )
    return {
        "errors": errors,
        "sent": sent,
        "fused_ring": _fused_ring(rank, world, group),
        "rope_entries": _rope_entries(world, group) if world == 2 else {},
    }


def _rope_entries(world: int, group) -> dict[str, list[float]]:
    """rope="entries" (LIGHTHOUSE.md s.14) with positions restarting per document: every
    exchange against one process, on the crossing layout and on one document per window (the
    unmasked CP paths); the shards' tables are the window's tables sharded like q. Returns
    the worst errors of out, dq, dk, dv per case, and of the logits of a model (one dense and
    one Lighthouse layer, float64) whose Attention hands its shard's tables to the layer."""
    from lh_cp.model.transformer import rope_tables

    errors = {}
    _, cfg, n, _ = next(iter(_cases(world)))
    cfg = dataclasses.replace(cfg, rope="entries")
    for index in (0, 4):
        bounds = _layouts(n)[index]
        flat = torch.cat([torch.arange(z - a) for a, z in zip(bounds[:-1], bounds[1:])])
        rope = rope_tables(flat.view(2, n), 8, 100.0, torch.float64)  # [B, n, D/2] each
        gen = torch.Generator().manual_seed(index)
        q, dout = (torch.randn(2, n, 4, 8, generator=gen, dtype=torch.float64) for _ in "ab")
        k, v = (torch.randn(2, n, 2, 8, generator=gen, dtype=torch.float64) for _ in "ab")
        docs = torch.tensor(bounds, dtype=torch.int32)
        ref = [x.clone().requires_grad_() for x in (q, k, v)]
        out = lighthouse_attention(*ref, cfg, documents=docs, rope=rope)
        (out * dout).sum().backward()
        want = [out.detach()] + [t.grad for t in ref]
        for exchange in _exchanges(world):
            got, _ = _cp_run(q, k, v, dout, cfg, docs, group, exchange, rope)
            errors[f"{index}/{exchange}"] = [(a - b).abs().max().item() for a, b in zip(got, want)]
        errors.update(_rope_entries_model(cfg, n, bounds, flat.view(2, n), index, group))
    return errors


def _rope_entries_model(cfg, n, bounds, positions, index, group) -> dict[str, list[float]]:
    from lh_cp.model.transformer import ModelConfig, Transformer
    from lh_cp.ops.attention import SINGLE_DEVICE
    from lh_cp.parallel.context import ContextParallel, attach_context_parallel

    torch.manual_seed(index)
    shape = ModelConfig(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=32)
    model = Transformer(shape, cfg, dense_layers=(0,)).double()
    tokens = torch.randint(0, 32, (2, n), generator=torch.Generator().manual_seed(index))
    docs = torch.tensor(bounds, dtype=torch.int32)
    want = model(tokens, positions, documents=docs)  # [B, n, vocab]
    errors = {}
    for exchange in ("allgather", "ring"):
        context = ContextParallel(group, exchange, "ring")
        attach_context_parallel(model, context)
        got = model(context.shard(tokens), context.shard(positions), documents=docs)
        attach_context_parallel(model, SINGLE_DEVICE)
        errors[f"{index}/model/{exchange}"] = [(got - context.shard(want)).abs().max().item()]
    return errors


@pytest.mark.parametrize("world", [2, 3, 4])
def test_cp_equals_one_process(world):
    results = run_distributed(_job, world)
    for rank, result in enumerate(results):
        assert len(result["errors"]) == 2 * len(_layouts(8)) * len(HEADS) * len(_exchanges(world))
        for case, errs in result["errors"].items():
            assert max(errs) <= TOLERANCE, (world, rank, case, errs)
        for case, (meter, expected) in result["sent"].items():
            assert meter == expected, (world, rank, case, meter, expected)
        if world == 2:
            assert len(result["rope_entries"]) == 2 * (len(_exchanges(world)) + 2)
        for case, errs in result["rope_entries"].items():
            assert max(errs) <= TOLERANCE, (world, rank, "rope entries", case, errs)
        fused = result["fused_ring"]
        assert fused["dtype"] == "torch.bfloat16" and fused["forward"] > 0, fused
        assert fused["backward"] > 0 and max(fused["errors"]) <= BF16_TOLERANCE, fused


@pytest.mark.parametrize("world", [2, 4])
def test_ring_sends_less_than_the_all_gather_with_short_documents(world):
    """The accounting (held equal to the meter above) on a layout of short documents: the ring
    sends only rows of documents that continue into a later chunk, the all-gather every row."""
    from lh_cp.parallel.headtail.traffic import lighthouse_documents_cp_bytes

    name, cfg, n, bounds = list(_cases(world))[2]
    shape = dict(batch=2, heads=4, head_dim=8, dtype_bytes=2)
    for rank in range(world):
        ring = lighthouse_documents_cp_bytes(bounds, n, world, rank, cfg, exchange="ring", **shape)
        gather = lighthouse_documents_cp_bytes(
            bounds, n, world, rank, cfg, exchange="allgather", **shape
        )
        assert 0 < ring.kv_forward < gather.kv_forward / 4, (name, rank, ring, gather)
