"""Cost of the per-call rank agreement of context-parallel attention (lh_cp/parallel/agreement.py).

Every cp= attention call first all-gathers CALL_WORDS int64 words per rank (a hash of the
call's description, a non-finite mask from one aminmax over each of q, k, v for Lighthouse,
two checksum words of the documents) and reads them on the host: one small collective and one
host sync per call. Timed here per call, as mean wall time over --repeats calls in a row with
one synchronisation at the end (so a lost overlap between host and device counts):
- agreement alone (Lighthouse: with the finiteness check; dense: without);
- the layer's forward without the agreement, and with it: the difference is what a layer pays;
- the same layer's forward + backward, for scale (the agreement runs in the forward only).

Run alone (a group of one rank: the collective is then a local copy, the sync and the
finiteness reductions are real) or under torchrun (a CP group of every rank):

    python benchmarks/agreement_overhead.py --out agreement_1gpu.json            # one GPU
    torchrun --nproc-per-node 2 benchmarks/agreement_overhead.py --tokens 8192 --heads 4 --kv-heads 2 \
        --dim 64 --levels 2 --topk 256 --tile-budget 16                          # gloo, 2 CPU ranks
    torchrun --nproc-per-node 8 benchmarks/agreement_overhead.py --out a8.json   # 8 GPUs, NCCL
    python benchmarks/agreement_overhead.py --smoke                              # toy sizes, CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lh_cp import LighthouseConfig  # noqa: E402
from lh_cp.ops.attention import single_device_causal, single_device_lighthouse  # noqa: E402
from lh_cp.parallel import ContextParallel, shard_sequence  # noqa: E402
from lh_cp.parallel.agreement import agree_on_call, attention_call  # noqa: E402


def start_group(device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=120)
    if "RANK" in os.environ:
        dist.init_process_group(backend, timeout=timeout)
    else:
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)


def per_call_ms(fn, repeats: int, device: torch.device) -> float:
    """Mean milliseconds per fn() over `repeats` calls in a row after 3 warm-ups, synchronised
    once before and once after the loop."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    begin = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - begin) * 1e3 / repeats


def time_layer(q, k, v, cfg, context, group, repeats: int, device: torch.device) -> dict:
    """Per-call milliseconds of the agreement, of the layer's forward with and without it, and
    of its forward + backward; cfg None is the dense layer. With `context` (world > 1) the
    layer is the CP call with its own agreement switched off (main), else the single-device
    function."""
    exchange = "allgather" if cfg is not None else "ring"

    def agree():
        agree_on_call(attention_call(q, k, v, cfg, exchange), group)

    def layer():
        if context is None:
            return (
                single_device_causal(q, k, v)
                if cfg is None
                else single_device_lighthouse(q, k, v, cfg)
            )
        return context.dense(q, k, v) if cfg is None else context.lighthouse(q, k, v, cfg)

    def forward():
        with torch.no_grad():
            layer()

    def agreed_forward():
        agree()
        forward()

    def forward_backward():
        layer().sum().backward()

    alone = per_call_ms(agree, repeats, device)
    plain = per_call_ms(forward, repeats, device)
    agreed = per_call_ms(agreed_forward, repeats, device)
    training = per_call_ms(forward_backward, repeats, device)
    return {
        "agreement_alone_ms": alone,
        "forward_ms": plain,
        "forward_with_agreement_ms": agreed,
        "added_ms": agreed - plain,
        "forward_backward_ms": training,
        "added_share_of_forward_backward": (agreed - plain) / training,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=131072, help="tokens of the whole sequence")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--tile-budget", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="toy sizes on CPU (a test runs this)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.heads, args.kv_heads, args.dim, args.repeats = 256, 2, 1, 16, 3
        args.pool, args.levels, args.topk, args.tile_budget = 2, 2, 16, 2
    cfg = LighthouseConfig(
        pool=args.pool, levels=args.levels, topk=args.topk, tile_budget=args.tile_budget
    )
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    start_group(device)
    world, group = dist.get_world_size(), dist.group.WORLD
    torch.manual_seed(0)
    q_full = torch.randn(1, args.tokens, args.heads, args.dim, dtype=dtype, device=device)
    kv_full = torch.randn(2, args.tokens, args.kv_heads, args.dim, dtype=dtype, device=device)
    q = shard_sequence(q_full, group).requires_grad_()  # [1, N / W, H, D]
    k = shard_sequence(kv_full[:1], group).requires_grad_()  # [1, N / W, Hkv, D]
    v = shard_sequence(kv_full[1:], group).requires_grad_()
    context = ContextParallel(group, "allgather", "ring") if world > 1 else None
    checked_agree = ContextParallel._agree
    ContextParallel._agree = lambda *a, **kw: None  # the layer alone; agree() adds it back

    rows = {
        "lighthouse": time_layer(q, k, v, cfg, context, group, args.repeats, device),
        "dense": time_layer(q, k, v, None, context, group, args.repeats, device),
    }
    ContextParallel._agree = checked_agree
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "backend": dist.get_backend(),
        "world": world,
        "torch": torch.__version__,
        "shape_per_rank": {
            "q": list(q.shape),
            "k": list(k.shape),
            "dtype": str(dtype),
        },
        "lighthouse": {f: getattr(cfg, f) for f in ("pool", "levels", "topk", "tile_budget")},
        "repeats": args.repeats,
        "per_call": rows,
    }
    if dist.get_rank() == 0:
        print(
            f"{result['device']}, {result['backend']}, {world} rank(s), q per rank {list(q.shape)} {dtype}"
        )
        print(
            "| layer | agreement alone | forward | forward + agreement | added | fwd+bwd | added / fwd+bwd |"
        )
        print("|---|---|---|---|---|---|---|")
        for mode, row in rows.items():
            print(
                f"| {mode} | {row['agreement_alone_ms']:.3f} ms | {row['forward_ms']:.3f} ms | "
                f"{row['forward_with_agreement_ms']:.3f} ms | {row['added_ms']:+.3f} ms | "
                f"{row['forward_backward_ms']:.3f} ms | {row['added_share_of_forward_backward']:+.2%} |"
            )
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
