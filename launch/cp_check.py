"""Check context parallelism on the current job: every rank of the world is one CP group.

Run under torchrun (any number of nodes and processes), e.g. through launch/multinode.sh with
PROGRAM=launch/cp_check.py. Each rank runs Lighthouse and dense attention, forward and
backward, with both exchanges, in float64, and compares its shard with the single-process
result it computes itself from the same seed. Exit status 0 and the line "cp_check passed"
on rank 0 mean every rank matched to 1e-9 (float64: only summation order differs).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from lh_cp import LighthouseConfig, causal_attention, lighthouse_attention
from lh_cp.parallel import shard_sequence

TOLERANCE = 1e-9


def max_errors(fn, group, device, n, heads=4, kv_heads=2, dim=16) -> float:
    gen = torch.Generator().manual_seed(n)
    shapes = [(2, n, heads, dim), (2, n, kv_heads, dim), (2, n, kv_heads, dim), (2, n, heads, dim)]
    q, k, v, dout = (torch.randn(s, generator=gen, dtype=torch.float64).to(device) for s in shapes)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out_ref = fn(*ref, cp=None)
    (out_ref * dout).sum().backward()
    loc = [shard_sequence(t, group).requires_grad_() for t in (q, k, v)]
    out = fn(*loc, cp=group)
    (out * shard_sequence(dout, group)).sum().backward()
    errors = [(out - shard_sequence(out_ref, group)).abs().max()]
    errors += [(a.grad - shard_sequence(b.grad, group)).abs().max() for a, b in zip(loc, ref)]
    return max(e.item() for e in errors)


def main() -> int:
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    group = dist.group.WORLD
    world, rank = dist.get_world_size(), dist.get_rank()
    chunk = 16
    n = 2 * world * chunk
    cfg = LighthouseConfig(pool=2, levels=3, topk=n * 2 // 8, tile_budget=2)  # tile 8, 2 per chunk
    worst = {}
    for exchange in ("allgather", "ring"):
        worst[f"lighthouse/{exchange}"] = max_errors(
            lambda q, k, v, cp, exchange=exchange: lighthouse_attention(
                q, k, v, cfg, cp=cp, exchange=exchange
            ),
            group,
            device,
            n,
        )
        worst[f"dense/{exchange}"] = max_errors(
            lambda q, k, v, cp, exchange=exchange: causal_attention(
                q, k, v, cp=cp, exchange=exchange
            ),
            group,
            device,
            n,
        )
    errors = torch.tensor([worst[key] for key in sorted(worst)], dtype=torch.float64, device=device)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    ok = bool((errors <= TOLERANCE).all())
    if rank == 0:
        summary = ", ".join(f"{key} {err:.1e}" for key, err in zip(sorted(worst), errors.tolist()))
        print(
            f"cp_check {'passed' if ok else 'FAILED'}: W={world}, N={n}, max abs error over ranks: {summary}"
        )
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
