"""The CP Lighthouse layer on its CUDA kernels against its reference path (skipped without a GPU).

- The chunk step's twins (tests/chunk_twins.py): identical chunk-local selection, entries,
  deliveries (the chunk's rows and its spill rows) and gradients within 1e-5 (float32,
  compiled kernels).
- The whole CP layer in a process group of one rank (its two chunks are chunks 0 and 1, so the
  first chunk's spill lands on the second on the same rank; W >= 2 runs in
  benchmarks/cp_multigpu.py): the kernel path against the reference path (kernels disabled)
  on the same inputs. float32: within 1e-5 absolute + 1e-5 relative (same selection, only
  float32 summation order differs). bf16: relative L2 error against a float64 reference at most
  2e-2 and at most 2x the bf16 reference path's own error + 1e-3 (as tests/test_kernels_gpu.py).
- Compressed Ulysses in an NCCL group of one rank (its all-to-all on CUDA tensors): the kernel
  path against the reference path, with the same tolerances.
- The exchanges' LSE merge: the Triton kernel against its twin (tests/merge_twins.py,
  tolerances there), and the merges of every rank of W = 2..4 over each exchange's key blocks
  in bf16 on the cuDNN blocks (W >= 2 needs no second GPU here: no collective is involved):
  the merge kernel within one bf16 ulp of the reference merge on the same block outputs, and
  within 1e-2 relative L2 of one float64 attention over the whole sequence (bf16 inputs,
  bf16 output: about 4e-3 is the rounding alone).
"""

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

from chunk_twins import check_chunk_twins  # noqa: E402
from dist_utils import free_port  # noqa: E402
from merge_twins import accumulated_rows, assert_within_ulp, check_merge_twins, full_rows  # noqa: E402

from lh_cp import LighthouseConfig, lighthouse_attention  # noqa: E402
from lh_cp.ops import kernels  # noqa: E402

DEV = "cuda"


def test_chunk_twins_compiled():
    check_chunk_twins(DEV)


@pytest.fixture(scope="module")
def one_rank_group():
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield dist.group.WORLD
    dist.destroy_process_group()


def _layer(q, k, v, grad_out, cfg, group, exchange):
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = lighthouse_attention(q, k, v, cfg, cp=group, exchange=exchange)
    out.backward(grad_out.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("exchange", ["allgather", "ring"])
@pytest.mark.parametrize(
    "pool,levels,topk,budget,n,batch,heads,kv_heads,dim,selection",
    [
        (4, 3, 256, 32, 16384, 1, 4, 2, 64, "tile_topk"),
        (2, 4, 64, 8, 4096, 1, 3, 3, 72, "tile_topk"),
        # two sequences: the heads-outer entries' exchange layout is not contiguous then
        (2, 4, 64, 8, 4096, 2, 3, 3, 72, "tile_topk"),
        # the second chunk starts from the first chunk's thresholds (selection_carry.py)
        (4, 3, 256, 32, 16384, 1, 4, 2, 64, "causal"),
    ],
)
def test_cp_kernel_path_matches_reference_path(
    one_rank_group, exchange, pool, levels, topk, budget, n, batch, heads, kv_heads, dim, selection
):
    cfg = LighthouseConfig(
        pool=pool, levels=levels, topk=topk, tile_budget=budget, selection=selection
    )
    torch.manual_seed(n + levels)
    q = torch.randn(batch, n, heads, dim, device=DEV)
    k, v = (torch.randn(batch, n, kv_heads, dim, device=DEV) for _ in range(2))
    grad_out = torch.randn(batch, n, heads, dim, device=DEV)
    got32 = _layer(q, k, v, grad_out, cfg, one_rank_group, exchange)
    bf16 = [x.bfloat16() for x in (q, k, v)]
    with kernels.disabled():
        want32 = _layer(q, k, v, grad_out, cfg, one_rank_group, exchange)
        # float64 of the bf16 values: the same norms, so the same selection
        exact = _layer(*(x.double() for x in bf16), grad_out, cfg, one_rank_group, exchange)
        ref_bf16 = _layer(*bf16, grad_out, cfg, one_rank_group, exchange)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got32, want32):
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    got_bf16 = _layer(*bf16, grad_out, cfg, one_rank_group, exchange)
    for name, g, r, e in zip(("out", "dq", "dk", "dv"), got_bf16, ref_bf16, exact):
        err, ref_err = rel_err(g, e), rel_err(r, e)
        assert err <= 2e-2 and err <= 2 * ref_err + 1e-3, (name, err, ref_err)


@pytest.fixture(scope="module")
def one_rank_nccl(one_rank_group):
    return dist.new_group([0], backend="nccl")


@pytest.mark.parametrize(
    "pool,levels,topk,budget,n,heads,kv_heads,dim,selection",
    [
        (4, 3, 256, 32, 16384, 4, 2, 64, "tile_topk"),
        (2, 4, 64, 8, 4096, 2, 1, 72, "tile_topk"),
        (4, 3, 256, 32, 16384, 4, 2, 64, "causal"),
    ],
)
def test_compressed_ulysses_kernel_path_matches_reference_path(
    one_rank_nccl, monkeypatch, pool, levels, topk, budget, n, heads, kv_heads, dim, selection
):
    import lh_cp.ops.compress

    kernel_calls = []
    original = lh_cp.ops.compress.compress_kernels
    monkeypatch.setattr(
        lh_cp.ops.compress,
        "compress_kernels",
        lambda *a, **kw: kernel_calls.append(1) or original(*a, **kw),
    )
    cfg = LighthouseConfig(
        pool=pool, levels=levels, topk=topk, tile_budget=budget, selection=selection
    )
    torch.manual_seed(n + levels + 1)
    q = torch.randn(1, n, heads, dim, device=DEV)
    k, v = (torch.randn(1, n, kv_heads, dim, device=DEV) for _ in range(2))
    grad_out = torch.randn(1, n, heads, dim, device=DEV)
    got32 = _layer(q, k, v, grad_out, cfg, one_rank_nccl, "ulysses_compressed")
    assert kernel_calls == [1]  # compressed Ulysses took the kernel path on CUDA
    bf16 = [x.bfloat16() for x in (q, k, v)]
    with kernels.disabled():
        want32 = _layer(q, k, v, grad_out, cfg, one_rank_nccl, "ulysses_compressed")
        exact = _layer(
            *(x.double() for x in bf16), grad_out, cfg, one_rank_nccl, "ulysses_compressed"
        )
        ref_bf16 = _layer(*bf16, grad_out, cfg, one_rank_nccl, "ulysses_compressed")
    for name, a, b in zip(("out", "dq", "dk", "dv"), got32, want32):
        torch.testing.assert_close(
            a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    got_bf16 = _layer(*bf16, grad_out, cfg, one_rank_nccl, "ulysses_compressed")
    for name, g, r, e in zip(("out", "dq", "dk", "dv"), got_bf16, ref_bf16, exact):
        err, ref_err = rel_err(g, e), rel_err(r, e)
        assert err <= 2e-2 and err <= 2 * ref_err + 1e-3, (name, err, ref_err)


def test_merge_twins_compiled():
    check_merge_twins(DEV)


@pytest.mark.parametrize("exchange", ["allgather", "ring"])
@pytest.mark.parametrize("world", [2, 3, 4])
def test_accumulated_merges_with_the_kernel(world, exchange):
    torch.manual_seed(world)
    length = 256
    q = torch.randn(1, 4, 2 * world * length, 64, device=DEV).bfloat16()
    k, v = (torch.randn(1, 2, 2 * world * length, 64, device=DEV).bfloat16() for _ in range(2))
    for rank in range(world):
        out, lse = accumulated_rows(q, k, v, rank, world, exchange)
        assert out.dtype == torch.bfloat16  # merged into the final rows, not a float32 copy
        with kernels.disabled():
            ref_out, ref_lse = accumulated_rows(q, k, v, rank, world, exchange)
        assert_within_ulp(out, ref_out, torch.bfloat16, f"rank {rank}")
        torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
        want_out, _ = full_rows(q, k, v, rank, world)
        assert rel_err(out, want_out) <= 1e-2, (rank, rel_err(out, want_out))
