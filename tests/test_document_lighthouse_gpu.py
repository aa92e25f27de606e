"""Lighthouse over packed documents on CUDA (skipped without a GPU): the Triton selection with
restarting causal thresholds against its twin, and the whole layer in bf16 (kernels, torch's
varlen attention) against the float64 reference on the same inputs.

Tolerances as tests/test_kernels_gpu.py: relative L2 error <= 2e-2 for out, dq, dk, dv (bf16
operands give 1e-3..1e-2). The seeds are fixed; the inputs' norms are spread so that no two
candidates' float32 scores come within the kernels' rounding of each other (a tie there could
pick different entries in the two twins).
"""

import random

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from lh_cp import LighthouseConfig, lighthouse_attention  # noqa: E402
from lh_cp.ops import kernels  # noqa: E402
from lh_cp.ops.document_lighthouse import plan_documents  # noqa: E402
from lh_cp.ops.kernels.selection import select_plan  # noqa: E402
from lh_cp.ops.kernels.selection_reference import select_from_scores  # noqa: E402
from lh_cp.ops.kernels.slot_plan import selection_from_fields  # noqa: E402

DEV = "cuda"


def _layout(seed: int, batch: int, n: int, mean: int) -> list[int]:
    rng = random.Random(seed)
    bounds = [0]
    for _ in range(batch):
        end = bounds[-1] + n
        while bounds[-1] < end:
            bounds.append(min(end, bounds[-1] + max(1, int(rng.expovariate(1 / mean)))))
    return bounds


def _inputs(batch, n, heads, kv_heads, dim, seed):
    gen = torch.Generator(device=DEV).manual_seed(seed)

    def spread(h):
        x = torch.randn(batch, n, h, dim, device=DEV, generator=gen)
        return (x * (1 + 4 * torch.rand(batch, n, h, 1, device=DEV, generator=gen))).bfloat16()

    return spread(heads), spread(kv_heads), spread(kv_heads)


@pytest.mark.parametrize("selection", ["tile_topk", "causal"])
def test_selection_with_restarts_is_identical(selection):
    cfg = LighthouseConfig(pool=4, levels=3, topk=64, tile_budget=8, selection=selection)
    batch, n, heads = 2, 8192, 4
    bounds = _layout(1, batch, n, 3000)
    restart = plan_documents(bounds, batch, n, cfg, torch.device(DEV)).restart
    scores = torch.rand(batch, heads, n, device=DEV) * 10
    keys = torch.rand(batch, heads, n, device=DEV) * 10
    _, start, level, internal = select_plan(scores, keys, cfg, restart=restart)
    got = selection_from_fields(start, level, internal, cfg)
    want = select_from_scores(scores, keys, cfg, restart=restart)
    for field in ("start", "end", "level", "internal"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field


@pytest.mark.parametrize("selection", ["tile_topk", "causal"])
@pytest.mark.parametrize("mean", [700, 5000, 40000])
def test_layer_bf16_close_to_float64(selection, mean):
    cfg = LighthouseConfig(pool=4, levels=3, topk=256, tile_budget=32, selection=selection)
    batch, n, heads, kv_heads, dim = 2, 16384, 4, 2, 64  # tiles of 2048 tokens
    bounds = _layout(mean, batch, n, mean)
    docs = torch.tensor(bounds, dtype=torch.int32, device=DEV)
    q, k, v = _inputs(batch, n, heads, kv_heads, dim, mean)
    grad_out = torch.randn(batch, n, heads, dim, device=DEV)

    def run(a, b, c, fn):
        a, b, c = (x.detach().clone().requires_grad_() for x in (a, b, c))
        out = fn(a, b, c)
        out.backward(grad_out.to(out.dtype))
        return [out.detach(), a.grad, b.grad, c.grad]

    got = run(q, k, v, lambda a, b, c: lighthouse_attention(a, b, c, cfg, documents=docs))
    with kernels.disabled():
        exact = run(
            q.double(),
            k.double(),
            v.double(),
            lambda a, b, c: lighthouse_attention(a, b, c, cfg, documents=docs),
        )
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, exact):
        err = ((g.double() - e).norm() / e.norm()).item()
        assert err <= 2e-2, (name, err)


def test_isolation_on_the_kernels():
    """The forward on the kernels: another document's inputs change nothing of this one."""
    cfg = LighthouseConfig(pool=4, levels=3, topk=256, tile_budget=32, selection="causal")
    batch, n = 1, 16384
    bounds = [0, 1000, 9000, 16384]
    docs = torch.tensor(bounds, dtype=torch.int32, device=DEV)
    q, k, v = _inputs(batch, n, 4, 2, 64, 3)
    mine = torch.zeros(1, n, 1, 1, dtype=torch.bool, device=DEV)
    mine[:, 1000:9000] = True
    changed = [torch.where(mine, x, -x) for x in (q, k, v)]
    before = lighthouse_attention(q, k, v, cfg, documents=docs)
    after = lighthouse_attention(*changed, cfg, documents=docs)
    assert torch.equal(before[:, 1000:9000], after[:, 1000:9000])


@pytest.mark.parametrize("causal", [True, False])
def test_fused_segments_match_reference(causal):
    """flash attention's varlen kernel over separate query and key segments (the ring's steps:
    unmasked rectangles; its own stream: causal runs, keys ending with the queries) against
    the reference twin in float64 on the same bf16 values: out, lse, dq, dk, dv."""
    from lh_cp.parallel.headtail.blocks import segments_backward, segments_forward
    from lh_cp.parallel.headtail.fused_blocks import fused_segments_backward, fused_segments_forward

    rng = random.Random(5)
    queries = [rng.randint(1, 300) for _ in range(9)]
    keys = [q if causal else rng.randint(1, 500) for q in queries]
    qb, kb = [0], [0]
    for a, b in zip(queries, keys):
        qb.append(qb[-1] + a)
        kb.append(kb[-1] + b)
    gen = torch.Generator(device=DEV).manual_seed(int(causal))
    q, dout = (torch.randn(qb[-1], 4, 64, device=DEV, generator=gen).bfloat16() for _ in "qo")
    k, v = (torch.randn(kb[-1], 4, 64, device=DEV, generator=gen).bfloat16() for _ in "kv")
    cu_q, cu_k = (torch.tensor(b, dtype=torch.int32, device=DEV) for b in (qb, kb))
    out, lse = fused_segments_forward(q, k, v, cu_q, cu_k, max(queries), max(keys), causal)
    exact = [x.double() for x in (q, k, v, dout)]
    ref_out, ref_lse = segments_forward(*exact[:3], qb, kb, causal)
    grads = fused_segments_backward(
        dout, q, k, v, out, lse, cu_q, cu_k, max(queries), max(keys), causal
    )
    delta = (exact[3] * ref_out).sum(-1)
    ref_grads = segments_backward(exact[3], *exact[:3], ref_lse, delta, qb, kb, causal)
    for name, got, want in zip(
        ("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (ref_out, ref_lse, *ref_grads)
    ):
        assert got.shape == want.shape, (name, got.shape, want.shape)
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err <= 2e-2, (name, err)


def test_stream_merge_with_the_kernel():
    """The ring's merge of a step's rows into the running result (merge_rows: rows [M, H, D]
    seen as [1, 1, M * H, D] by the Triton merge, the step's LSE a transposed view as flash
    returns it) against the reference merge on the same values: within float32 rounding."""
    from lh_cp.parallel.headtail.stream_ring import merge_rows

    gen = torch.Generator(device=DEV).manual_seed(2)
    rows, heads, dim = 1000, 8, 64
    out_acc = torch.randn(rows, heads, dim, device=DEV, generator=gen)
    lse_acc = torch.randn(heads, rows, device=DEV, generator=gen).t()  # [P, H], as flash's
    picked = torch.randperm(rows, device=DEV, generator=gen)[:300]
    out = torch.randn(300, heads, dim, device=DEV, generator=gen).bfloat16()
    lse = torch.randn(heads, 300, device=DEV, generator=gen).t()
    results = []
    for use_kernel in (True, False):
        acc, acc_lse = out_acc.clone(), lse_acc.clone()
        if use_kernel:
            merge_rows(acc, acc_lse, picked, out, lse)
        else:
            with kernels.disabled():
                merge_rows(acc, acc_lse, picked, out, lse)
        results.append((acc, acc_lse))
    (got, got_lse), (want, want_lse) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse, want_lse, rtol=1e-6, atol=1e-6)
    untouched = torch.ones(rows, dtype=torch.bool, device=DEV)
    untouched[picked] = False
    assert torch.equal(got[untouched], out_acc[untouched])


@pytest.mark.parametrize("exchange", ["allgather", "ring", "ulysses_compressed"])
@pytest.mark.parametrize("selection", ["tile_topk", "causal"])
def test_cp_one_rank_equals_one_device(selection, exchange):
    """The CP paths at W = 1 against the single-device layer, both on the kernels, in bf16.
    Head-tail (two chunks on one rank): the tail chunk's pieces attend to keys from the head
    chunk, so the all-gather's varlen call has more keys than queries and its causal mask must
    align at the end, and the ring's own stream runs the fused segment kernel on runs that
    span both chunks. Compressed Ulysses: the shard's stream through the varlen kernel."""
    import torch.distributed as dist
    from dist_utils import free_port

    from lh_cp.ops.documents import check_documents
    from lh_cp.parallel.headtail.lighthouse_documents import lighthouse_documents_cp
    from lh_cp.parallel.ulysses.compressed_documents import compressed_ulysses_documents

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        cfg = LighthouseConfig(pool=4, levels=3, topk=256, tile_budget=32, selection=selection)
        batch, n = 2, 16384
        bounds = [0, 5000, 9000, 16384, 16384 + 3000, 32768]  # documents cross the chunk edge
        docs = torch.tensor(bounds, dtype=torch.int32, device=DEV)
        q, k, v = _inputs(batch, n, 4, 2, 64, 11)
        grad_out = torch.randn(batch, n, 4, 64, device=DEV)

        def cp(a, b, c):
            checked = check_documents(docs, batch, n, a.device)
            if exchange == "ulysses_compressed":
                return compressed_ulysses_documents(a, b, c, cfg, checked, dist.group.WORLD)
            return lighthouse_documents_cp(a, b, c, cfg, checked, dist.group.WORLD, exchange)

        results = []
        for fn in (lambda a, b, c: lighthouse_attention(a, b, c, cfg, documents=docs), cp):
            a, b, c = (x.detach().clone().requires_grad_() for x in (q, k, v))
            out = fn(a, b, c)
            out.backward(grad_out.to(out.dtype))
            results.append([out.detach(), a.grad, b.grad, c.grad])
        for name, got, want in zip(("out", "dq", "dk", "dv"), *results):
            err = ((got.double() - want.double()).norm() / want.double().norm()).item()
            assert err <= 1e-2, (name, err)
    finally:
        dist.destroy_process_group()
