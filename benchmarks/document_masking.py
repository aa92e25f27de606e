"""Dense attention with document masking: time on one GPU, CP traffic and CP load balance.

Document mixes: documents of exponentially distributed length, mean 2K, 16K and 64K tokens,
packed end to end into one stream per mix (seeded) and cut into windows of N = 128K tokens, as
the loader packs real data (a document cut by a window edge is a document of each window);
and one document filling the window. One window of a 64K mix holds anything from one to a
handful of documents, so every figure is an average over several windows.

1. Time (GPU; CPU with --smoke): forward+backward of one dense layer, bf16, B = 1, H = 8
   heads of D = 128 (K/V heads as many), the median of CUDA-event times per window, averaged
   over the first --timing-windows windows of each mix:
   - single device, `causal_attention(q, k, v, documents=...)` (torch's varlen kernel);
   - the CP path at W = 1 (a process group of this process alone, nccl on CUDA, as torchrun
     with one process makes it: nothing is sent; the rank's own block is flash's varlen
     kernel, parallel/headtail/fused_blocks.py), both exchanges;
   - full causal attention over the window (documents=None), single device and CP W = 1;
   - the varlen kernel on the one-document mix (documents equal to whole windows take the
     unmasked call, so the 128K row of the first two is full causal attention by design).
2. Bytes each rank sends per dense layer under CP (forward + backward), W = 2, 4, 8, from
   lh_cp.parallel.headtail.traffic.dense_cp_bytes (tested against the byte meter): the ring
   with documents (the busiest rank and the mean over ranks, averaged over --windows
   windows) against the unmasked ring; the all-gather sends the same with or without them.
3. Attention work per rank under head-tail sharding: the causal (query, key) pairs that share
   a document, summed over each rank's queries; max over mean across ranks, averaged over
   the windows and at the worst window, W = 2, 4, 8.

Parts 2 and 3 run on CPU at the full size (--no-timing skips part 1). Prints the tables;
writes everything as JSON to --out:

    python benchmarks/document_masking.py --out benchmarks/results/document_masking_h100.json
    python benchmarks/document_masking.py --no-timing --out benchmarks/results/document_masking_cpu.json
    python benchmarks/document_masking.py --smoke --out /tmp/document_masking.json   # CPU, toy sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from one_rank import one_rank_group

from lh_cp import causal_attention
from lh_cp.ops.documents import longest_document
from lh_cp.parallel.headtail.sharding import head_tail_positions
from lh_cp.parallel.headtail.traffic import dense_cp_bytes

MIB = 2**20
WORLDS = (2, 4, 8)


def mixes(n: int, means: dict[str, int], windows: int, seed: int) -> dict[str, list[list[int]]]:
    """Name -> `windows` windows of n tokens, each its cumulative document boundaries:
    exponential lengths of each mean (at least 1 token) packed into one stream and cut at
    every window edge; and 'one', a document per window."""
    rng = np.random.default_rng(seed)
    found = {}
    for name, mean in means.items():
        ends, total = [], 0
        while total < windows * n:
            total += max(1, int(round(rng.exponential(mean))))
            ends.append(total)
        cuts = sorted(set(ends[:-1]) | set(range(n, windows * n + 1, n)))
        found[name] = [
            [0] + [c - w * n for c in cuts if w * n < c <= (w + 1) * n] for w in range(windows)
        ]
    found["one"] = [[0, n] for _ in range(windows)]
    return found


def attention_pairs(bounds: list[int], n: int, world: int) -> list[int]:
    """Per rank of a head-tail layout of one window: the causal (query, key) pairs inside a
    document, summed over the rank's queries (query p of a document starting at s has p - s + 1)."""
    starts = np.repeat(np.array(bounds[:-1]), np.diff(bounds))  # each token's document start
    pairs = []
    for rank in range(world):
        queries = head_tail_positions(n, rank, world).numpy()
        pairs.append(int((queries - starts[queries] + 1).sum()))
    return pairs


def traffic(
    windows: list[list[int]], n: int, world: int, heads: int, dim: int, dtype_bytes: int
) -> dict[str, float]:
    """MiB one rank sends per dense layer (forward + backward) under CP at W = world: the ring
    with documents (busiest rank and mean over ranks, averaged over the windows), the
    unmasked ring and the all-gather."""
    shape = dict(batch=1, kv_heads=heads, head_dim=dim, dtype_bytes=dtype_bytes)
    busiest, mean = [], []
    for bounds in windows:
        sent = [
            dense_cp_bytes(n, world, exchange="ring", documents=bounds, rank=r, **shape).total
            for r in range(world)
        ]
        busiest.append(max(sent))
        mean.append(statistics.mean(sent))
    return {
        "ring_masked_max_mib": statistics.mean(busiest) / MIB,
        "ring_masked_mean_mib": statistics.mean(mean) / MIB,
        "ring_unmasked_mib": dense_cp_bytes(n, world, exchange="ring", **shape).total / MIB,
        "allgather_mib": dense_cp_bytes(n, world, exchange="allgather", **shape).total / MIB,
    }


def work(windows: list[list[int]], n: int, world: int) -> dict[str, float]:
    """Max over mean across ranks of the attended pairs, averaged over the windows and at the
    worst window."""
    ratios = []
    for bounds in windows:
        pairs = attention_pairs(bounds, n, world)
        ratios.append(max(pairs) / statistics.mean(pairs))
    return {"max_over_mean": statistics.mean(ratios), "worst_window": max(ratios)}


def _timer(device: torch.device):
    """A function timing one call of fn() in ms: CUDA events on GPU, perf_counter on CPU."""
    if device.type == "cuda":

        def timed(fn) -> float:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop)

        return timed

    def timed_cpu(fn) -> float:
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3

    return timed_cpu


def forward_backward_ms(attend, n, heads, dim, dtype, device, warmup: int, repeats: int) -> float:
    """Median ms of attend(q, k, v) forward + backward on random [1, n, heads, dim] inputs."""
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, grad = (
        torch.randn(1, n, heads, dim, device=device, dtype=dtype, generator=gen) for _ in range(4)
    )
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    timed = _timer(device)

    def step():
        attend(q, k, v).backward(grad)

    times = [timed(step) for _ in range(warmup + repeats)]
    return statistics.median(times[warmup:])


def timings(mixes_, n, heads, dim, dtype, device, warmup, repeats, windows: int) -> dict:
    """ms of each attention variant per mix (the mean over its first `windows` windows of the
    median per window), and of full causal attention."""
    from lh_cp.ops.dense import _document_causal_varlen, varlen_supported

    group = one_rank_group(device)
    try:
        found = {}

        def measure(attend):
            return forward_backward_ms(attend, n, heads, dim, dtype, device, warmup, repeats)

        cases = {name: bounds[:windows] for name, bounds in mixes_.items() if name != "one"}
        cases["one"] = mixes_["one"][:1]
        cases["full_causal"] = [None]
        for name, bounds_list in cases.items():
            rows = []
            for bounds in bounds_list:
                docs = (
                    None
                    if bounds is None
                    else torch.tensor(bounds, dtype=torch.int32, device=device)
                )
                row = {
                    "single_device": measure(
                        lambda q, k, v, docs=docs: causal_attention(q, k, v, documents=docs)
                    )
                }
                for exchange in ("allgather", "ring"):
                    row[f"cp_w1_{exchange}"] = measure(
                        lambda q, k, v, ex=exchange, docs=docs: causal_attention(
                            q, k, v, cp=group, exchange=ex, documents=docs
                        )
                    )
                rows.append(row)
            found[name] = {key: statistics.mean(r[key] for r in rows) for key in rows[0]}
            found[name]["windows"] = len(rows)
        probe = torch.empty(1, 1, heads, dim, device=device, dtype=dtype)
        if varlen_supported(probe):
            whole = torch.tensor([0, n], dtype=torch.int32, device=device)
            found["one"]["varlen_kernel"] = measure(
                lambda q, k, v: _document_causal_varlen(q, k, v, whole, n)
            )
        return found
    finally:
        dist.destroy_process_group()


def _label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="path of the JSON result file")
    parser.add_argument(
        "--smoke", action="store_true", help="toy sizes on CPU (a test of the script)"
    )
    parser.add_argument("--no-timing", action="store_true", help="parts 2 and 3 only, on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per window")
    parser.add_argument("--windows", type=int, default=32, help="windows per mix (parts 2, 3)")
    parser.add_argument("--timing-windows", type=int, default=4, help="windows per mix timed")
    args = parser.parse_args(argv)
    if args.smoke:
        n, heads, dim, dtype, device = 256, 2, 16, torch.float32, torch.device("cpu")
        means = {"mean_4": 4, "mean_32": 32, "mean_128": 128}  # the 2K/16K/64K ratios to N
        warmup, repeats, args.windows, args.timing_windows = 0, 1, 4, 1
    else:
        if not torch.cuda.is_available() and not args.no_timing:
            print(
                "the timing part needs a CUDA GPU (--no-timing or --smoke on CPU)", file=sys.stderr
            )
            return 2
        n, heads, dim, dtype = 131072, 8, 128, torch.bfloat16
        device = torch.device("cpu" if args.no_timing else "cuda")
        means = {"mean_2K": 2048, "mean_16K": 16384, "mean_64K": 65536}
        warmup, repeats = 3, args.repeats
    found = mixes(n, means, args.windows, args.seed)
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "smoke": args.smoke,
        "shape": {"N": n, "B": 1, "H": heads, "Hkv": heads, "D": dim, "dtype": str(dtype)},
        "seed": args.seed,
        "windows": args.windows,
        "mixes": {
            name: {
                "documents_per_window": statistics.mean(len(b) - 1 for b in windows),
                "longest": max(longest_document(b) for b in windows),
                "documents_per_timed_window": [len(b) - 1 for b in windows[: args.timing_windows]],
            }
            for name, windows in found.items()
        },
        "timing_ms": {}
        if args.no_timing
        else timings(found, n, heads, dim, dtype, device, warmup, repeats, args.timing_windows),
        "traffic_mib": {
            str(w): {name: traffic(b, n, w, heads, dim, dtype_bytes) for name, b in found.items()}
            for w in WORLDS
        },
        "work": {
            str(w): {name: work(b, n, w) for name, b in {**found, "unmasked": [[0, n]]}.items()}
            for w in WORLDS
        },
    }
    _print_tables(result, n)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


def _print_timing(result: dict) -> None:
    print("\nforward+backward ms (mean over the timed windows of the median per window):")
    columns = ["single_device", "cp_w1_allgather", "cp_w1_ring", "varlen_kernel"]
    print(f"{'mix':>12} {'windows':>7} " + " ".join(f"{c:>16}" for c in columns))
    for name, row in result["timing_ms"].items():
        cells = " ".join(f"{row[c]:>16.2f}" if c in row else f"{'':>16}" for c in columns)
        print(f"{name:>12} {row['windows']:>7} {cells}")


def _print_tables(result: dict, n: int) -> None:
    shape = result["shape"]
    print(
        f"{result['device']}, torch {result['torch']}; N={_label(n)}, B=1, H={shape['H']}, "
        f"D={shape['D']}, {shape['dtype']}; {result['windows']} windows per mix, seed {result['seed']}"
    )
    print(f"\n{'mix':>12} {'documents per window':>21} {'longest':>8}")
    for name, row in result["mixes"].items():
        print(f"{name:>12} {row['documents_per_window']:>21.1f} {row['longest']:>8}")
    if result["timing_ms"]:
        _print_timing(result)
    print("\nMiB sent per rank per dense layer (forward + backward), mean over windows:")
    header = ("ring masked max", "ring masked mean", "ring unmasked", "all-gather")
    print(f"{'W':>3} {'mix':>12} " + " ".join(f"{h:>17}" for h in header))
    for world, by_mix in result["traffic_mib"].items():
        for name, row in by_mix.items():
            cells = (
                row["ring_masked_max_mib"],
                row["ring_masked_mean_mib"],
                row["ring_unmasked_mib"],
                row["allgather_mib"],
            )
            print(f"{world:>3} {name:>12} " + " ".join(f"{c:>17.2f}" for c in cells))
    print(
        "\nattention work per rank under head-tail sharding, max over mean (mean / worst window):"
    )
    names = list(next(iter(result["work"].values())))
    print(f"{'W':>3} " + " ".join(f"{name:>15}" for name in names))
    for world, by_mix in result["work"].items():
        cells = (
            f"{by_mix[m]['max_over_mean']:.3f} / {by_mix[m]['worst_window']:.3f}" for m in names
        )
        print(f"{world:>3} " + " ".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    sys.exit(main())
