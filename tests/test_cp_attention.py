"""Context-parallel Lighthouse and dense attention equal the single-process result (gloo, CPU).

One spawned job per CP degree W in {2, 3, 4} runs every case (kind x exchange x dtype x
heads x Lighthouse config) and returns the worst absolute errors of the output and of the
q/k/v gradients; the assertions happen here, in the test process.
Tolerances: float64 <= 1e-9 (only the summation order differs: merged partial softmaxes versus
one SDPA call), float32 <= 1e-5 (the same at float32 rounding, on O(1) values of short
sequences; observed errors are below 4e-6). bfloat16 CP runs are compared with the float32
single-process run on the same bfloat16-rounded inputs, relative to the largest reference
value: <= 2e-2 (a few bfloat16 roundings of 2**-8 each: gathered entries, output, gradients).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from lh_cp import LighthouseConfig, causal_attention, lighthouse_attention
from lh_cp.parallel import (
    SentBytes,
    dense_cp_bytes,
    lighthouse_cp_bytes,
    shard_sequence,
    unshard_sequence,
)

TOLERANCE = {"torch.float64": 1e-9, "torch.float32": 1e-5, "torch.bfloat16": 2e-2}
BATCH, HEAD_DIM, CHUNK_TILES = 2, 8, 2


def lighthouse_configs(world: int) -> dict[str, tuple[LighthouseConfig, int]]:
    """Name -> (config, N): every chunk holds whole tiles; spill pool**(levels-1) - 1 = 3."""
    # tile 8, two tiles per chunk, c_L = 4
    n_a = 2 * world * 16
    # tile 8 = one tile per chunk, two levels of pool 4 (coarsest level = b entries)
    n_b = 2 * world * 8
    # tile 16, two tiles per chunk
    n_c = 2 * world * 32
    return {
        "p2L3": (LighthouseConfig(pool=2, levels=3, topk=n_a * 2 // 8, tile_budget=2), n_a),
        "p4L2": (LighthouseConfig(pool=4, levels=2, topk=n_b * 2 // 8, tile_budget=2), n_b),
        # the strictly causal selection, tile 16 (4 top-level spans for a budget of 2, so the
        # thresholds decide): each chunk's first tile starts from the thresholds of the previous
        # chunk's last tile, which cross ranks (selection_carry.py)
        "p2L3causal": (
            LighthouseConfig(
                pool=2, levels=3, topk=n_c * 2 // 16, tile_budget=2, selection="causal"
            ),
            n_c,
        ),
        # levels=1 is dense attention through the Lighthouse path: no spill, no halo
        "p2L1": (LighthouseConfig(pool=2, levels=1, topk=n_a * 2 // 8, tile_budget=2), n_a),
    }


def _inputs(n: int, heads: int, kv_heads: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, n, heads, HEAD_DIM, generator=gen, dtype=torch.float64)
    k = torch.randn(BATCH, n, kv_heads, HEAD_DIM, generator=gen, dtype=torch.float64)
    v = torch.randn(BATCH, n, kv_heads, HEAD_DIM, generator=gen, dtype=torch.float64)
    dout = torch.randn(BATCH, n, heads, HEAD_DIM, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q, k, v, dout)]


def _compare(fn, inputs, group, exchange):
    """Max abs errors (out, dq, dk, dv) of the CP run against the single-process run.

    bfloat16 inputs are compared with a float32 single-process run on the same values, and
    the errors are divided by the largest reference value (bfloat16 precision is relative).
    """
    q, k, v, dout = inputs
    low_precision = q.dtype == torch.bfloat16
    ref_dtype = torch.float32 if low_precision else q.dtype
    ref = [t.to(ref_dtype, copy=True).requires_grad_() for t in (q, k, v)]
    out_ref = fn(*ref, cp=None, exchange=exchange)
    (out_ref * dout.to(ref_dtype)).sum().backward()
    loc = [shard_sequence(t, group).requires_grad_() for t in (q, k, v)]
    out_loc = fn(*loc, cp=group, exchange=exchange)
    (out_loc * shard_sequence(dout, group)).sum().backward()

    def error(mine, theirs):
        theirs = shard_sequence(theirs, group)
        scale = theirs.abs().max().item() if low_precision else 1.0
        return (mine.to(ref_dtype) - theirs).abs().max().item() / scale

    errors = {"out": error(out_loc, out_ref)}
    for name, a, b in zip(("dq", "dk", "dv"), loc, ref):
        errors[name] = error(a.grad, b.grad)
    # The gathered output is the full single-process output.
    gathered = unshard_sequence(out_loc.detach(), group)
    errors["unshard"] = (gathered.to(ref_dtype) - out_ref).abs().max().item() / (
        out_ref.abs().max().item() if low_precision else 1.0
    )
    return errors


CASES = [
    (torch.float64, (4, 2)),
    (torch.float64, (2, 2)),
    (torch.float32, (4, 2)),
    (torch.float32, (2, 2)),
    (torch.bfloat16, (4, 2)),
]


def attention_job(rank: int, world: int) -> dict:
    group = dist.new_group(list(range(world)))
    results = {"cases": {}, "bytes": {}, "expected_bytes": {}}
    for (name, (cfg, n)), exchange, (dtype, (heads, kv_heads)) in itertools.product(
        lighthouse_configs(world).items(), ("allgather", "ring"), CASES
    ):
        inputs = _inputs(n, heads, kv_heads, dtype, seed=n + heads)

        def fn(q, k, v, cp, exchange, cfg=cfg):
            return lighthouse_attention(q, k, v, cfg, cp=cp, exchange=exchange)

        key = ("lighthouse", name, exchange, str(dtype), heads, kv_heads)
        with SentBytes() as meter:
            results["cases"][key] = _compare(fn, inputs, group, exchange)
        # unshard traffic is the test's own gather, not the layer's.
        results["bytes"][key] = {
            c: b for c, b in meter.by_category.items() if not c.startswith("unshard")
        }
        results["expected_bytes"][key] = lighthouse_cp_bytes(
            n,
            world,
            rank,
            cfg,
            batch=BATCH,
            heads=heads,
            head_dim=HEAD_DIM,
            dtype_bytes=inputs[0].element_size(),
            exchange=exchange,
        ).nonzero()
    for exchange, (dtype, (heads, kv_heads)) in itertools.product(("allgather", "ring"), CASES):
        n = 2 * world * 12  # chunk of 12 tokens: nothing Lighthouse-specific about it
        inputs = _inputs(n, heads, kv_heads, dtype, seed=7 + heads)
        key = ("dense", "-", exchange, str(dtype), heads, kv_heads)
        with SentBytes() as meter:
            results["cases"][key] = _compare(causal_attention, inputs, group, exchange)
        results["bytes"][key] = {
            c: b for c, b in meter.by_category.items() if not c.startswith("unshard")
        }
        results["expected_bytes"][key] = dense_cp_bytes(
            n,
            world,
            batch=BATCH,
            kv_heads=kv_heads,
            head_dim=HEAD_DIM,
            dtype_bytes=inputs[0].element_size(),
            exchange=exchange,
        ).nonzero()

    # A CP group of one rank (each rank alone) is the single-device computation.
    singles = [dist.new_group([r]) for r in range(world)]
    cfg, n = lighthouse_configs(1)["p2L3"]
    inputs = _inputs(n, 4, 2, torch.float64, seed=3)

    def single(q, k, v, cp, exchange):
        return lighthouse_attention(q, k, v, cfg, cp=cp, exchange=exchange)

    results["single_rank_group"] = {
        ex: _compare(single, inputs, singles[rank], ex) for ex in ("allgather", "ring")
    }

    # A chunk that is not a whole number of tiles fails on every rank before any communication.
    cfg, n = lighthouse_configs(world)["p2L3"]
    bad = LighthouseConfig(pool=2, levels=3, topk=cfg.topk // 4, tile_budget=2)  # tile 32, chunk 16
    q, k, v, _ = _inputs(n, 2, 2, torch.float64, seed=1)
    try:
        lighthouse_attention(
            shard_sequence(q, group),
            shard_sequence(k, group),
            shard_sequence(v, group),
            bad,
            cp=group,
        )
        results["bad_chunk_error"] = None
    except ValueError as err:
        results["bad_chunk_error"] = str(err)
    return results


@pytest.mark.timeout(240)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_cp_attention_matches_single_process(world):
    """Outputs and q/k/v grads of Lighthouse (3 configs, levels 3, 2 and 1) and dense attention,
    GQA and MHA, both exchanges, float64 (<= 1e-9), float32 (<= 1e-5) and bfloat16 (<= 2e-2
    relative to float32), equal the single-process result; the halo crosses ranks in every
    Lighthouse case with levels > 1 (bytes sent on the halo path are counted and must be > 0
    and equal the accounting of comm.py, as must all other traffic)."""
    results = run_distributed(attention_job, world, timeout=200)
    for rank, res in enumerate(results):
        for key, errors in res["cases"].items():
            tol = TOLERANCE[key[3]]
            for name, err in errors.items():
                assert err <= tol, (
                    f"rank {rank} W={world} {key}: max abs error of {name} = {err:.3e} > {tol:g}"
                )
            if key[0] == "lighthouse" and key[1] != "p2L1":
                assert res["bytes"][key].get("halo_forward", 0) > 0, (
                    f"rank {rank} {key}: halo path did not send"
                )
                assert res["bytes"][key].get("halo_backward", 0) > 0, (
                    f"rank {rank} {key}: halo backward did not send"
                )
            assert res["bytes"][key] == res["expected_bytes"][key], (
                f"rank {rank} W={world} {key}: sent {res['bytes'][key]} != accounted {res['expected_bytes'][key]}"
            )
        for exchange, errors in res["single_rank_group"].items():
            for name, err in errors.items():
                assert err <= 1e-9, (
                    f"rank {rank}: CP group of one rank, {exchange}: {name} error {err:.3e}"
                )
        message = res["bad_chunk_error"]
        assert message is not None and "multiple of the tile size" in message, message
