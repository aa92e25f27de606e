"""Context parallelism on NCCL: correctness against one GPU, and weak scaling of one layer.

Launch with one process per GPU (NVLink multicast stays off on the lent machines):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
    torchrun --standalone --nproc-per-node W benchmarks/cp_multigpu.py --out results.json

Correctness: every rank builds the same full-length inputs (same seed), computes the
single-GPU result and its gradients, then the CP result of its head-tail shard, and compares
the shard (float32: max abs error; bf16: relative L2 error), for Lighthouse and dense
attention, both exchanges. Scaling: forward+backward of one layer at --tokens-per-gpu tokens
per GPU: the single-GPU layer (W=1, timed on rank 0 alone) and the CP layer over all W ranks
(N = W x tokens-per-gpu), CUDA events, median; plus the time of the exchange's collective
alone at the same size, to show what share of the step it takes.

W=1 (--nproc-per-node 1) runs the CP code path on one GPU without communication, which
isolates the path's own overhead; --block-backends cudnn,flash times both block kernels in
one run; --paired (W=1) also times the single-GPU layer and the CP path in turn within each
repeat, so that clock drift during the run cannot favour either; --profile prints rank 0's
kernel table of one CP Lighthouse step. On an 80 GB GPU
use --skip-check: the float32 dense GQA reference at 32K runs on PyTorch's math backend and
needs more memory than that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lh_cp import LighthouseConfig, causal_attention, lighthouse_attention
from lh_cp.parallel import shard_sequence
from lh_cp.parallel.transport import all_gather_flat

NVLS_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def bench_config(args) -> LighthouseConfig:
    """The Lighthouse config of every measurement here, from the command line."""
    return LighthouseConfig(
        pool=args.pool, levels=args.levels, topk=args.topk, tile_budget=args.tile_budget
    )


def layer(kind: str, cfg: LighthouseConfig, group=None, exchange: str = "allgather"):
    if kind == "lighthouse":
        return lambda q, k, v: lighthouse_attention(q, k, v, cfg, cp=group, exchange=exchange)
    return lambda q, k, v: causal_attention(q, k, v, cp=group, exchange=exchange)


def forward_backward(fn, q, k, v, dout):
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*inputs)
    out.backward(dout)
    return out.detach(), [t.grad for t in inputs]


def compare(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return (got.double() - want.double()).abs().max().item()
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def check_correctness(args, group, rank, world) -> list[dict]:
    rows = []
    n, heads, dim = args.check_tokens, args.heads, args.dim
    cfg = bench_config(args)
    for dtype in (torch.float32, torch.bfloat16):
        for kv_heads in (heads, max(1, heads // 4)):
            gen = torch.Generator(device="cuda").manual_seed(1234 + kv_heads)
            make = lambda h, gen=gen, dtype=dtype: torch.randn(
                1, n, h, dim, device="cuda", generator=gen
            ).to(dtype)
            q, k, v, dout = make(heads), make(kv_heads), make(kv_heads), make(heads)
            for kind in ("lighthouse", "dense"):
                ref_out, ref_grads = forward_backward(layer(kind, cfg), q, k, v, dout)
                local = [shard_sequence(t, group) for t in (q, k, v, dout)]
                for exchange in ("allgather", "ring"):
                    out, grads = forward_backward(layer(kind, cfg, group, exchange), *local)
                    errors = [compare(out, shard_sequence(ref_out, group), dtype)]
                    errors += [
                        compare(g, shard_sequence(r, group), dtype)
                        for g, r in zip(grads, ref_grads)
                    ]
                    worst = torch.tensor(errors, device="cuda", dtype=torch.float64)
                    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
                    row = dict(
                        kind=kind,
                        exchange=exchange,
                        dtype=str(dtype).replace("torch.", ""),
                        W=world,
                        N=n,
                        heads=heads,
                        kv_heads=kv_heads,
                        metric="max_abs" if dtype == torch.float32 else "rel_l2",
                        out=worst[0].item(),
                        dq=worst[1].item(),
                        dk=worst[2].item(),
                        dv=worst[3].item(),
                    )
                    rows.append(row)
                    if rank == 0:
                        print(
                            f"check {kind:10} {exchange:9} {row['dtype']:8} Hkv={kv_heads} {row['metric']}: "
                            f"out {row['out']:.2e} dq {row['dq']:.2e} dk {row['dk']:.2e} dv {row['dv']:.2e}",
                            flush=True,
                        )
            del q, k, v, dout
            torch.cuda.empty_cache()
    return rows


def one_time_ms(fn, inputs, dout, group) -> float:
    """One forward+backward of fn on fresh leaves of `inputs`, CUDA events."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    if group is not None:
        dist.barrier(group)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(*inputs).backward(dout)
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop)


def time_ms(fn, inputs_list, dout, group, warmup: int, repeats: int) -> float:
    times = [
        one_time_ms(fn, inputs_list[i % len(inputs_list)], dout, group)
        for i in range(warmup + repeats)
    ]
    return statistics.median(times[warmup:])


def paired_w1(args, group) -> list[dict]:
    """W = 1: the single-GPU layer and the CP path (both exchanges) timed in turn within every
    repeat (single, all-gather, ring, single, ...), so that a drift of the GPU's clocks during
    the run reaches all three alike; each row gives the medians and the median of the
    per-repeat ratios CP / single."""
    n, heads, dim = args.tokens_per_gpu, args.heads, args.dim
    cfg = bench_config(args)
    gen = torch.Generator(device="cuda").manual_seed(99)
    make = lambda: torch.randn(1, n, heads, dim, device="cuda", generator=gen).bfloat16()
    sets, dout = [[make() for _ in range(3)] for _ in range(2)], make()
    fns = {"single": (layer("lighthouse", cfg), None)}
    fns.update({e: (layer("lighthouse", cfg, group, e), group) for e in ("allgather", "ring")})
    times = {name: [] for name in fns}
    for i in range(args.warmup + args.repeats):
        for name, (fn, fn_group) in fns.items():
            ms = one_time_ms(fn, sets[i % 2], dout, fn_group)
            if i >= args.warmup:
                times[name].append(ms)
    rows = []
    for exchange in ("allgather", "ring"):
        ratios = [cp / single for cp, single in zip(times[exchange], times["single"])]
        row = dict(
            kind="lighthouse",
            exchange=exchange,
            W=1,
            N=n,
            repeats=args.repeats,
            single_gpu_ms=statistics.median(times["single"]),
            cp_ms=statistics.median(times[exchange]),
            paired_ratio=statistics.median(ratios),
            ratios=ratios,
            device=torch.cuda.get_device_name(),
            torch=torch.__version__,
        )
        rows.append(row)
        print(
            f"paired W=1 {exchange:9} N={n}: single {row['single_gpu_ms']:.2f} ms, CP {row['cp_ms']:.2f} ms, "
            f"median ratio of {args.repeats} pairs {row['paired_ratio']:.3f} "
            f"(range {min(ratios):.3f}-{max(ratios):.3f})",
            flush=True,
        )
    return rows


def collective_ms(numel: int, group, repeats: int) -> float:
    """All-gather of `numel` bf16 elements per rank: the Lighthouse all-gather exchange's size."""
    world = dist.get_world_size(group)
    src = torch.randn(numel, device="cuda").bfloat16()
    dst = torch.empty(world * numel, device="cuda", dtype=torch.bfloat16)
    times = []
    for i in range(repeats + 2):
        dist.barrier(group)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        all_gather_flat(dst, src, group=group)
        stop.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(stop))
    return statistics.median(times)


def weak_scaling(args, group, rank, world) -> list[dict]:
    rows = []
    per_gpu, heads, dim = args.tokens_per_gpu, args.heads, args.dim
    cfg = bench_config(args)
    for kind in args.scale_kinds.split(","):
        gen = torch.Generator(device="cuda").manual_seed(99 + rank)
        make = lambda n, gen=gen: torch.randn(
            1, n, heads, dim, device="cuda", generator=gen
        ).bfloat16()
        single_ms = torch.zeros(1, device="cuda")
        if rank == 0:
            sets = [[make(per_gpu) for _ in range(3)] for _ in range(2)]
            single_ms[0] = time_ms(
                layer(kind, cfg), sets, make(per_gpu), None, args.warmup, args.repeats
            )
            del sets
        dist.broadcast(single_ms, 0, group=group)
        torch.cuda.empty_cache()
        for exchange, block_backend in [
            (e, b) for e in ("allgather", "ring") for b in args.block_backends.split(",")
        ]:
            sets = [[make(per_gpu) for _ in range(3)] for _ in range(2)]
            torch.cuda.reset_peak_memory_stats()
            # The CP blocks follow PyTorch's global cuDNN SDPA switch (parallel/fused_blocks.py).
            torch.backends.cuda.enable_cudnn_sdp(block_backend == "cudnn")
            cp_ms = time_ms(
                layer(kind, cfg, group, exchange),
                sets,
                make(per_gpu),
                group,
                args.warmup,
                args.repeats,
            )
            torch.backends.cuda.enable_cudnn_sdp(True)
            peak = torch.cuda.max_memory_allocated() / 2**30
            del sets
            torch.cuda.empty_cache()
            n_global = per_gpu * world
            if kind == "lighthouse":
                chunk = per_gpu // 2
                entries_per_chunk = chunk // cfg.coarsest_span + (cfg.levels - 1) * cfg.pool * (
                    cfg.topk // (2 * world)
                )
                exchanged = 2 * 2 * entries_per_chunk * heads * dim  # k and v, two chunks
            else:
                exchanged = 2 * per_gpu * heads * dim
            comm = collective_ms(exchanged, group, args.repeats) if world > 1 else 0.0
            row = dict(
                kind=kind,
                exchange=exchange,
                block_backend=block_backend,
                W=world,
                tokens_per_gpu=per_gpu,
                N=n_global,
                single_gpu_ms=single_ms.item(),
                cp_ms=cp_ms,
                tokens_per_s_per_gpu=per_gpu / (cp_ms / 1e3),
                single_tokens_per_s=per_gpu / (single_ms.item() / 1e3),
                weak_scaling_efficiency=single_ms.item() / cp_ms,
                allgather_collective_ms=comm,
                peak_mem_gb=peak,
                device=torch.cuda.get_device_name(),
                torch=torch.__version__,
            )
            rows.append(row)
            if rank == 0:
                print(
                    f"scale {kind:10} {exchange:9} {block_backend:5} W={world} N={n_global}: "
                    f"single {row['single_gpu_ms']:.2f} ms, "
                    f"CP {cp_ms:.2f} ms, efficiency {row['weak_scaling_efficiency']:.3f}, all-gather alone "
                    f"{comm:.2f} ms, peak {peak:.2f} GB",
                    flush=True,
                )
    return rows


def profile_step(args, group, rank) -> None:
    """One CP Lighthouse forward+backward (all-gather exchange) under torch.profiler."""
    cfg = bench_config(args)
    make = lambda: torch.randn(
        1, args.tokens_per_gpu, args.heads, args.dim, device="cuda"
    ).bfloat16()
    q, k, v, dout = make(), make(), make(), make()
    fn = layer("lighthouse", cfg, group, "allgather")
    for _ in range(2):
        forward_backward(fn, q, k, v, dout)
    torch.cuda.synchronize()
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    ) as prof:
        forward_backward(fn, q, k, v, dout)
        torch.cuda.synchronize()
    if rank == 0:
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=30, max_name_column_width=60
            ),
            flush=True,
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--check-tokens", type=int, default=32768)
    p.add_argument("--tokens-per-gpu", type=int, default=131072)
    p.add_argument("--scale-kinds", default="lighthouse,dense")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--tile-budget", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--block-backends",
        default="cudnn",
        help="CP block kernels to time, comma-separated: cudnn (the default path), flash",
    )
    p.add_argument("--skip-check", action="store_true")
    p.add_argument(
        "--profile",
        action="store_true",
        help="print rank 0's CUDA-time profile of one CP Lighthouse step",
    )
    p.add_argument(
        "--paired",
        action="store_true",
        help="W=1 only: also time the single-GPU layer and the CP path in turn within each repeat",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    for key, value in NVLS_OFF.items():
        if os.environ.get(key) != value:
            print(
                f"refusing to run: set {key}={value} (NVLink multicast must stay off)",
                file=sys.stderr,
            )
            return 2
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.paired and world != 1:
        print(
            f"--paired compares the CP path with the single-GPU layer on one GPU: run it with "
            f"--nproc-per-node 1, not {world}",
            file=sys.stderr,
        )
        dist.destroy_process_group()
        return 2
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    group = dist.group.WORLD
    result = {"check": [] if args.skip_check else check_correctness(args, group, rank, world)}
    result["scaling"] = weak_scaling(args, group, rank, world)
    if args.paired:
        result["paired"] = paired_w1(args, group)
    if args.profile:
        profile_step(args, group, rank)
    if rank == 0 and args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
