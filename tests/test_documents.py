"""Document masking on one device: the documents= contract and its errors, dense causal
attention that equals every document run alone, no gradient across a boundary, the head-tail
plan of the CP exchanges against a brute-force mask, the ring's byte accounting against the
plan, Lighthouse's refusal; GPU twins (varlen kernels) skipped without CUDA.

Tolerances: float64 <= 1e-9 and float32 <= 1e-5 against each document run alone (the CPU
reference runs each document alone through the same SDPA, so the errors observed are 0; the
bounds are the project's, stated for summation-order differences). bf16 GPU twins against the
float32 reference on the same bf16 inputs: <= 2e-2 of the largest reference value (a few bf16
roundings of 2**-8).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from document_cases import BATCH, LAYOUTS, N, bounds_of, documents_of, each_document_alone, inputs

from lh_cp import LighthouseConfig, causal_attention, lighthouse_attention
from lh_cp.ops.attention import SINGLE_DEVICE
from lh_cp.ops.documents import (
    DocumentsError,
    document_positions,
    is_whole_windows,
)
from lh_cp.parallel.headtail.documents import HeadTailDocuments, shard_plan
from lh_cp.parallel.headtail.sharding import local_chunk_ids
from lh_cp.parallel.headtail.traffic import dense_cp_bytes, document_ids_array, shared_column_count

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5}


@pytest.mark.parametrize(
    ("bounds", "message"),
    [
        ([0, 10, 90], "end at B \\* N = 2 \\* 48 = 96"),
        ([1, 48, 96], "start at 0"),
        ([0, 30, 20, 48, 96], "strictly increasing"),
        ([0, 30, 30, 48, 96], "strictly increasing"),
        ([0, 40, 60, 96], "every window start b \\* N must be a document boundary"),
    ],
)
def test_bad_boundaries_raise_documents_error(bounds, message):
    q, k, v, _ = inputs(2, 2, torch.float64, seed=0)
    documents = torch.tensor(bounds, dtype=torch.int32)
    with pytest.raises(DocumentsError, match=message):
        causal_attention(q, k, v, documents=documents)


def test_bad_tensors_raise_documents_error():
    q, k, v, _ = inputs(2, 2, torch.float64, seed=0)
    good = documents_of(LAYOUTS["crossing"])
    with pytest.raises(DocumentsError, match="int32"):
        causal_attention(q, k, v, documents=good.long())
    with pytest.raises(DocumentsError, match="1-D"):
        causal_attention(q, k, v, documents=good[None])
    with pytest.raises(DocumentsError, match="torch.Tensor"):
        causal_attention(q, k, v, documents=good.tolist())
    with pytest.raises(DocumentsError, match="must be on the device of q, k, v \\(cpu\\)"):
        causal_attention(q, k, v, documents=good.to("meta"))
    assert issubclass(DocumentsError, ValueError)


def test_positions_and_whole_windows():
    bounds = bounds_of(LAYOUTS["crossing"])
    positions = document_positions(bounds, BATCH, N)
    assert positions[0, :8].tolist() == [0, 1, 2, 3, 4, 0, 0, 1]
    assert positions[1].tolist() == list(range(N))
    assert not is_whole_windows(bounds, BATCH, N)
    assert is_whole_windows(bounds_of(LAYOUTS["whole"]), BATCH, N)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_document_equals_itself_run_alone(dtype):
    """Outputs and q/k/v gradients, GQA and MHA, every layout; one document per window is
    the unmasked call exactly (same path)."""
    for (name, layout), (heads, kv_heads) in itertools.product(LAYOUTS.items(), [(4, 2), (2, 2)]):
        q, k, v, dout = inputs(heads, kv_heads, dtype, seed=heads + len(name))
        bounds = bounds_of(layout)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = causal_attention(*leaves, documents=documents_of(layout))
        out.backward(dout)
        want = each_document_alone(q, k, v, dout, bounds)
        for field, got, ref in zip(
            ("out", "dq", "dk", "dv"), [out, *(t.grad for t in leaves)], want
        ):
            error = (got - ref).abs().max().item()
            assert error <= TOLERANCE[dtype], (name, heads, kv_heads, field, error)
    q, k, v, _ = inputs(4, 2, dtype, seed=1)
    unmasked = causal_attention(q, k, v)
    assert torch.equal(
        causal_attention(q, k, v, documents=documents_of(LAYOUTS["whole"])), unmasked
    )


def test_no_gradient_crosses_a_document_boundary():
    """The loss of one document's outputs has exactly zero gradient at every other document's
    q, k and v; changing another document's inputs leaves the document's outputs bit-identical."""
    q, k, v, dout = inputs(4, 2, torch.float64, seed=5)
    layout = LAYOUTS["crossing"]
    bounds, documents = bounds_of(layout), documents_of(layout)
    start, end = 6, 36  # the 30-token document of window 0
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = causal_attention(*leaves, documents=documents)
    out[0, start:end].mul(dout[0, start:end]).sum().backward()
    outside = torch.ones(BATCH, N, dtype=torch.bool)
    outside[0, start:end] = False
    for leaf in leaves:
        assert leaf.grad[outside].abs().max().item() == 0.0
        assert leaf.grad[~outside].abs().max().item() > 0.0
    changed = [t.clone() for t in (q, k, v)]
    for t in changed:
        t[outside] = torch.randn_like(t[outside])
    again = causal_attention(*changed, documents=documents)
    assert torch.equal(again[0, start:end], out.detach()[0, start:end])
    assert bounds[2:4] == [start, end]


def test_lighthouse_refuses_documents():
    q, k, v, _ = inputs(2, 2, torch.float32, seed=0)
    documents = documents_of(LAYOUTS["crossing"])
    cfg = LighthouseConfig(pool=2, levels=2, topk=12, tile_budget=2)
    with pytest.raises(
        ValueError, match="Lighthouse attention with documents= is not supported yet"
    ):
        lighthouse_attention(q, k, v, cfg, documents=documents)
    with pytest.raises(
        ValueError, match="Lighthouse attention with documents= is not supported yet"
    ):
        SINGLE_DEVICE.lighthouse(q, k, v, cfg, documents)
    out = SINGLE_DEVICE.dense(q, k, v, documents)
    assert torch.equal(out, causal_attention(q, k, v, documents=documents))


def _random_layout(rng: random.Random, n: int, batch: int) -> list[list[int]]:
    layout = []
    for _ in range(batch):
        cuts = sorted(rng.sample(range(1, n), min(rng.randint(0, 9), n - 1)))
        edges = [0, *cuts, n]
        layout.append([b - a for a, b in zip(edges, edges[1:])])
    return layout


def _plan_mask(bounds, batch, n, rank, world) -> torch.Tensor:
    """What the exchange attends to, built from the plan: bool [B, 2S, N] (local query row,
    global key position), from the own block's segments and every remote block's pieces."""
    plan = shard_plan(bounds, batch, n, rank, world, torch.device("cpu"))
    length = n // (2 * world)
    mine = local_chunk_ids(rank, world)
    positions = torch.cat([torch.arange(c * length, (c + 1) * length) for c in mine])
    mask = torch.zeros(batch, 2 * length, n, dtype=torch.bool)
    own = plan.segments.same_document() & torch.ones(2 * length, 2 * length).tril().bool()
    mask[:, :, positions] = own
    for owner in range(world):
        if owner == rank:
            continue
        kv_ids = local_chunk_ids(owner, world)
        columns = torch.cat([torch.arange(c * length, (c + 1) * length) for c in kv_ids])
        for piece in plan.pieces:
            found = piece.key_columns(mine[piece.slot], kv_ids, length)
            if found is not None:
                rows = piece.local_rows(length)
                mask[piece.batch, rows, columns[found[0] : found[1]]] = True
    return mask


def test_head_tail_plan_equals_the_document_causal_mask():
    """For random layouts and W = 1..4, the own block's runs and the remote pieces of every
    rank cover exactly the keys of the query's document at or before the query; the ring's
    shared columns equal the accounting's count, derived from token ids alone."""
    rng = random.Random(0)
    for trial in range(40):
        world = 1 + trial % 4
        batch = 1 + trial % 2
        n = 2 * world * rng.choice([3, 5, 8])
        layout = _random_layout(rng, n, batch)
        bounds = [0]
        for length in itertools.chain.from_iterable(layout):
            bounds.append(bounds[-1] + length)
        ids = torch.as_tensor(document_ids_array(bounds, batch, n))
        causal = torch.ones(n, n).tril().bool()
        full = (ids[:, :, None] == ids[:, None, :]) & causal  # [B, N, N]
        length = n // (2 * world)
        documents = HeadTailDocuments(bounds, batch, n, world)
        for rank in range(world):
            mine = local_chunk_ids(rank, world)
            rows = torch.cat([torch.arange(c * length, (c + 1) * length) for c in mine])
            if is_whole_windows(bounds, batch, n):
                continue
            assert torch.equal(_plan_mask(bounds, batch, n, rank, world), full[:, rows]), (
                layout,
                world,
                rank,
            )
            for owner in range(world):
                if owner == rank:
                    continue
                shared = documents.shared_columns(rank, owner)
                count = 0 if shared is None else shared[1] - shared[0]
                assert count == shared_column_count(ids.numpy(), world, rank, owner)


def test_ring_bytes_with_documents():
    """Short documents: a rank receives only from the two ranks holding its chunks'
    neighbours, a few columns each; one document per window: the unmasked ring's bytes; the
    all-gather's bytes never change."""
    n, world = 4096, 8
    bounds = list(range(0, n + 1, 64))  # 64 documents of 64 tokens; chunk 256
    shape = dict(batch=1, kv_heads=8, head_dim=128, dtype_bytes=2)
    unmasked = dense_cp_bytes(n, world, exchange="ring", **shape)
    masked = [
        dense_cp_bytes(n, world, exchange="ring", documents=bounds, rank=r, **shape)
        for r in range(world)
    ]
    assert all(m.total == 0 for m in masked)  # documents aligned to chunks: nothing shared
    shifted = [0, 32, *range(96, n, 64), n]  # every document crosses a chunk boundary
    masked = [
        dense_cp_bytes(n, world, exchange="ring", documents=shifted, rank=r, **shape)
        for r in range(world)
    ]
    column = 2 * 8 * 128
    for rank, sent in enumerate(masked):
        # each of the rank's chunks after the first reaches back 32 columns into its predecessor
        assert 0 < sent.kv_forward <= 2 * 32 * column * 2, (rank, sent)
        assert sent.total < unmasked.total / 10
    whole = dense_cp_bytes(n, world, exchange="ring", documents=[0, n], **shape)
    assert whole == unmasked
    gather = dense_cp_bytes(n, world, exchange="allgather", documents=shifted, rank=3, **shape)
    assert gather == dense_cp_bytes(n, world, exchange="allgather", **shape)


def _bf16_case(heads, kv_heads, seed, device):
    q, k, v, dout = (t.to(device) for t in inputs(heads, kv_heads, torch.bfloat16, seed, 64))
    return q, k, v, dout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_varlen_single_device_equals_each_document_alone():
    """bf16 on CUDA: torch's varlen kernel, GQA and MHA, against every document alone in
    float32 on the same bf16 inputs."""
    from lh_cp.ops.attention import varlen_supported

    for (name, layout), (heads, kv_heads) in itertools.product(LAYOUTS.items(), [(8, 2), (4, 4)]):
        q, k, v, dout = _bf16_case(heads, kv_heads, seed=3, device="cuda")
        assert varlen_supported(q)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = causal_attention(*leaves, documents=documents_of(layout, "cuda"))
        out.backward(dout)
        want = each_document_alone(*(t.float() for t in (q, k, v, dout)), bounds_of(layout))
        for field, got, ref in zip(
            ("out", "dq", "dk", "dv"), [out, *(t.grad for t in leaves)], want
        ):
            error = (got.float() - ref).abs().max().item() / ref.abs().max().item()
            assert error <= 2e-2, (name, heads, kv_heads, field, error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fused_varlen_block_equals_the_reference_block():
    """The CP own block with documents: fused_varlen_forward / _backward (flash varlen) against
    the reference block with the same-document mask, bf16 against float32."""
    from lh_cp.parallel.headtail.blocks import block_backward, block_forward
    from lh_cp.parallel.headtail.fused_blocks import fused_varlen_backward, fused_varlen_forward

    for world, (heads, kv_heads) in itertools.product((1, 2, 4), [(8, 2), (4, 4)]):
        bounds = bounds_of(LAYOUTS["crossing"])
        plan = shard_plan(bounds, BATCH, N, world - 1, world, torch.device("cuda"))
        length = N // (2 * world)
        mine = local_chunk_ids(world - 1, world)
        q, k, v, dout = _bf16_case(heads, kv_heads, seed=world, device="cuda")

        # [B, N, h, D] -> the rank's chunks [B, h, 2S, D]
        q, k, v, dout = (
            torch.cat([x[:, c * length : (c + 1) * length] for c in mine], 1)
            .transpose(1, 2)
            .contiguous()
            for x in (q, k, v, dout)
        )
        same = plan.segments.same_document()
        out, lse = fused_varlen_forward(q, k, v, plan.segments.cu, plan.segments.longest)
        ref_out, ref_lse = block_forward(q.float(), k.float(), v.float(), True, same)
        assert (out.float() - ref_out).abs().max().item() <= 2e-2 * ref_out.abs().max().item()
        assert (lse - ref_lse).abs().max().item() <= 1e-2
        grads = fused_varlen_backward(
            dout, q, k, v, ref_out, ref_lse, plan.segments.cu, plan.segments.longest
        )
        delta = (dout.float() * ref_out).sum(-1)
        ref_grads = block_backward(
            dout.float(), q.float(), k.float(), v.float(), ref_lse, delta, True, same
        )
        for got, ref in zip(grads, ref_grads):
            assert (got.float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cp_one_rank_with_documents_equals_single_device(tmp_path):
    """The CP exchange at W = 1 on CUDA (a gloo group of one: nothing is sent, the own block is
    the fused varlen call) equals the single-device varlen call, bf16."""
    import torch.distributed as dist

    started = not dist.is_initialized()
    if started:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1
        )
    try:
        group = dist.new_group([0])
        layout = LAYOUTS["crossing"]
        for exchange in ("allgather", "ring"):
            q, k, v, dout = _bf16_case(8, 2, seed=7, device="cuda")
            want = causal_attention(q, k, v, documents=documents_of(layout, "cuda"))
            got = causal_attention(
                q, k, v, cp=group, exchange=exchange, documents=documents_of(layout, "cuda")
            )
            error = (got.float() - want.float()).abs().max().item()
            assert error <= 2e-2 * want.float().abs().max().item(), (exchange, error)
    finally:
        if started:
            dist.destroy_process_group()


def _exchange_blocks_errors(device: str, dtype: torch.dtype, head_dim: int) -> dict:
    """One rank's all-gather computation with documents, its remote block taken from the full
    inputs (no communication): the own block (varlen call on GPUs) plus one unmasked call per
    query piece (odd rectangles: one-token documents, single columns), merged by LSE, and the
    dq of own_backward plus remote_backward; worst errors against the float reference of the
    whole masked attention (relative to its largest value in half precision), W = 2, 3, 4,
    every rank, B = 2."""
    from lh_cp.parallel.headtail.blocks import (
        Accumulated,
        add_rows,
        backward_inputs,
        block_backward,
        block_forward,
        own_block_forward,
        remote_backward,
    )

    worst = {"out": 0.0, "dq": 0.0}
    half = dtype in (torch.float16, torch.bfloat16)
    for layout_name in ("crossing", "short"):
        bounds = bounds_of(LAYOUTS[layout_name])
        q, k, v, dout = (
            x.to(device).transpose(1, 2) for x in inputs(8, 2, dtype, seed=5, head_dim=head_dim)
        )
        wide = torch.float32 if half else dtype
        qw, kw, vw, dw = (x.to(wide) for x in (q, k, v, dout))
        ids = torch.as_tensor(document_ids_array(bounds, BATCH, N), device=device)
        same = ids[:, :, None] == ids[:, None, :]
        ref_out, ref_lse = block_forward(qw, kw, vw, True, same)
        delta = (dw * ref_out).sum(-1)
        ref_dq = block_backward(dw, qw, kw, vw, ref_lse, delta, True, same)[0]
        for world in (2, 3, 4):
            length = N // (2 * world)
            for rank in range(world):
                plan = shard_plan(bounds, BATCH, N, rank, world, torch.device(device))
                mine = local_chunk_ids(rank, world)
                remote = [c for c in range(2 * world) if c not in mine]

                def rows(x, chunks, length=length):
                    return torch.cat([x[:, :, c * length : (c + 1) * length] for c in chunks], 2)

                ql, kl, vl, dl = (rows(x, mine).contiguous() for x in (q, k, v, dout))
                kv_remote = torch.stack([rows(k, remote), rows(v, remote)])
                acc = Accumulated(
                    *own_block_forward(ql, kl, vl, plan.segments), mine, [remote], plan.pieces
                )
                acc.add_remote(ql, kv_remote, remote, length)
                grads = backward_inputs(dl, ql, acc.saved_output(ql), acc.lse)
                dq = grads.own_backward(kl, vl, plan.segments)[0].to(wide)
                dkv = torch.zeros(kv_remote.shape, dtype=wide, device=device)
                add_rows(
                    dq, remote_backward(grads, kv_remote, mine, remote, length, dkv, plan.pieces)
                )
                for field, got, want in (("out", acc.out, ref_out), ("dq", dq, ref_dq)):
                    want = rows(want, mine)
                    scale = want.abs().max().item() if half else 1.0
                    error = (got.to(wide) - want).abs().max().item() / scale
                    worst[field] = max(worst[field], error)
    return worst


def test_exchange_blocks_with_documents_equal_the_reference():
    """The pieces and own-block runs of every rank, through Accumulated and the block
    backward, reproduce the masked attention's rows: float64 <= 1e-9."""
    worst = _exchange_blocks_errors("cpu", torch.float64, head_dim=8)
    assert max(worst.values()) <= 1e-9, worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_exchange_blocks_with_documents_equal_the_reference():
    """The same on CUDA bf16: the own block in flash's varlen kernel, the pieces in the fused
    cuDNN/flash block kernels; <= 2e-2 of the largest float32 reference value."""
    worst = _exchange_blocks_errors("cuda", torch.bfloat16, head_dim=64)
    assert max(worst.values()) <= 2e-2, worst
