"""The CP exchanges along the path GPUs take, run on gloo CPU at W = 2 and 3.

On CUDA the block attention runs in fused kernels (parallel/headtail/fused_blocks.py) whose
outputs and dq come back in the inputs' bf16 and whose LSE is float32; the exchanges then
merge straight into the bf16 output rows, add a chunk's single remote dq in bf16 and keep
float32 sums only where a chunk gets several remote parts (the ring from W = 3 on). Machines
with several GPUs are lent rarely, so this runs that bookkeeping on CPU: inside each rank the
fused block functions are replaced by an emulation with the same dtype contract (the
reference block in float32, returned in the inputs' dtype as the kernels return it; GQA
dK/dV in float32, as the kernels' group sums). W = 2 takes the all-gather's view of the
reduce-scatter input and the ring's bf16 dq; W = 3 the ring's float32 running sums.

Compared with the float32 single-process result on the same bf16 inputs, as in
tests/test_cp_attention.py: within 2e-2 of the largest reference value (a few bf16 roundings
of 2**-8 each); the output is bf16 and the emulated kernels ran in every case.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed
from test_cp_attention import _compare, _inputs, lighthouse_configs

from lh_cp import causal_attention, lighthouse_attention
from lh_cp.parallel.headtail import blocks

TOLERANCE = 2e-2


def emulated_forward(q, k, v, causal):
    out, lse = blocks.block_forward(q, k, v, causal)
    emulated_forward.calls += 1
    return out.to(q.dtype), lse.float()


def emulated_backward(dout, q, k, v, out, lse, causal):
    delta = (dout.float() * out.float()).sum(-1)
    dq, dk, dv = blocks.block_backward(dout.float(), q, k, v, lse, delta, causal)
    grouped = q.shape[1] != k.shape[1]
    return dq.to(q.dtype), *(g.float() if grouped else g.to(q.dtype) for g in (dk, dv))


def fused_path_job(rank: int, world: int) -> dict:
    blocks.fused_supported = lambda q: q.dtype in (torch.float16, torch.bfloat16)
    blocks.fused_block_forward = emulated_forward
    blocks.fused_block_backward = emulated_backward
    emulated_forward.calls = 0
    group = dist.new_group(list(range(world)))
    results = {}
    configs = {name: lighthouse_configs(world)[name] for name in ("p2L3", "p2L3causal")}
    for (name, (cfg, n)), exchange, (heads, kv_heads) in itertools.product(
        configs.items(), ("allgather", "ring"), ((4, 2), (2, 2))
    ):

        def fn(q, k, v, cp, exchange, cfg=cfg):
            out = lighthouse_attention(q, k, v, cfg, cp=cp, exchange=exchange)
            results.setdefault("dtypes", set()).add(str(out.dtype))
            return out

        calls = emulated_forward.calls
        errors = _compare(
            fn, _inputs(n, heads, kv_heads, torch.bfloat16, seed=n + heads), group, exchange
        )
        results[(name, exchange, heads, kv_heads)] = errors, emulated_forward.calls > calls
    for exchange, (heads, kv_heads) in itertools.product(("allgather", "ring"), ((4, 2), (2, 2))):
        calls = emulated_forward.calls
        errors = _compare(
            causal_attention,
            _inputs(2 * world * 12, heads, kv_heads, torch.bfloat16, seed=7),
            group,
            exchange,
        )
        results[("dense", exchange, heads, kv_heads)] = errors, emulated_forward.calls > calls
    return results


@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [2, 3])
def test_fused_path_bookkeeping_matches_single_process(world):
    results = run_distributed(fused_path_job, world, timeout=160)
    for rank, res in enumerate(results):
        assert res.pop("dtypes") == {
            "torch.bfloat16",
            "torch.float32",
        }  # CP runs bf16, the reference float32
        for key, (errors, emulated) in res.items():
            assert emulated, f"rank {rank} {key}: the fused-path emulation did not run"
            for name, err in errors.items():
                assert err <= TOLERANCE, (
                    f"rank {rank} W={world} {key}: error of {name} = {err:.3e} > {TOLERANCE:g}"
                )
