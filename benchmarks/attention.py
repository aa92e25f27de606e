"""One attention layer on one GPU: Lighthouse versus dense causal SDPA, forward and backward.

For every N it prints a row: S, dense SDPA ms, Lighthouse ms (forward, forward+backward),
the floor (SDPA forward+backward on the selected length S, measured in the same run, plus
the bytes that must cross memory over the measured bandwidth), the ratio to the floor, the
speedup over dense and the peak memory of the Lighthouse step.

Timing: CUDA events around each call, warm-up first, median of the repeats, a fresh set of
random inputs (never zeros) for every repeat, drawn from a small pool of pre-generated sets
so that generating them is not timed.

    python benchmarks/attention.py --ns 32768,131072 --levels 3 --out benchmarks/results/x.json

On CUDA `lighthouse_attention` runs the Triton kernels of lh_cp/kernels; `--reference` adds
a column for the pure-PyTorch path (the same call inside `kernels.disabled()`). SDPA on the
selected entries, in Lighthouse and in the floor alike, goes through
lh_cp.ops.kernels.sdpa.sdpa_causal_fast, and the row records which backend PyTorch picked.
Dense SDPA is the library's `causal_attention` (PyTorch's default backend choice); above
`--dense-max-n` it is measured once, without warm-up, and the row says so
(`sdpa_repeats`). `--profile N,...` prints the CUDA kernels of one Lighthouse
forward+backward at those N, sorted by time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from lh_cp import LighthouseConfig, causal_attention, lighthouse_attention
from lh_cp.ops import kernels

HBM_BYTES_PER_S = 3.0e12  # H100 SXM device-to-device copy, read+write (device/KINDS.md)


def minimal_bytes(n: int, s: int, heads: int, dim: int, itemsize: int) -> int:
    """Bytes a Lighthouse forward+backward must move outside SDPA itself.

    Token level: read q, k, v and write out (forward); read dout and write dq, dk, dv
    (backward): 8 N-length tensors. Entry level, not counted inside SDPA: write the gathered
    q, k, v and read the entry outputs (forward); write the entry output gradients and read
    the entry q, k, v gradients (backward): 8 S-length tensors.
    """
    return 8 * (n + s) * heads * dim * itemsize


def levels_by_n(levels: str, ns: list[int]) -> dict[int, int]:
    """--levels: one number for every N, or N:levels pairs (e.g. 131072:3,524288:4)."""
    if ":" in levels:
        return {int(a): int(b) for a, b in (pair.split(":") for pair in levels.split(","))}
    return {n: int(levels) for n in ns}


def _random_sets(
    count: int, shapes: list[tuple[int, ...]], dtype, device
) -> list[list[torch.Tensor]]:
    return [
        [torch.randn(shape, dtype=dtype, device=device).requires_grad_() for shape in shapes]
        for _ in range(count)
    ]


def time_ms(
    fn, input_sets: list[list[torch.Tensor]], backward: bool, warmup: int, repeats: int
) -> float:
    """Median CUDA-event time of fn(*inputs) (and its backward) over fresh input sets."""
    if backward:
        with torch.no_grad():
            grad_out = torch.randn_like(fn(*input_sets[0]))
    times = []
    for i in range(warmup + repeats):
        inputs = input_sets[i % len(input_sets)]
        for t in inputs:
            t.grad = None
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        if backward:
            fn(*inputs).backward(grad_out)
        else:
            with torch.no_grad():
                fn(*inputs)
        stop.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(stop))
    return statistics.median(times)


def peak_memory_gb(fn, inputs: list[torch.Tensor]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = fn(*inputs)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def bench_one(n: int, cfg: LighthouseConfig, args, impls: dict) -> dict:
    dtype = getattr(torch, args.dtype)
    heads, dim = args.heads, args.dim
    s = cfg.selected_length(n)
    token_shapes = [(1, n, heads, dim)] * 3
    entry_shapes = [(1, heads, s, dim)] * 3
    token_sets = _random_sets(args.sets, token_shapes, dtype, "cuda")
    entry_sets = _random_sets(args.sets, entry_shapes, dtype, "cuda")
    from lh_cp.ops.kernels.sdpa import backend_name, sdpa_causal_fast

    sdpa_on_entries = sdpa_causal_fast

    row = {
        "N": n,
        "S": s,
        "config": vars(cfg) | {"heads": heads, "dim": dim, "dtype": args.dtype, "batch": 1},
    }
    row["sdpa_selected_ms"] = time_ms(sdpa_on_entries, entry_sets, True, args.warmup, args.repeats)
    row["sdpa_selected_backend"] = backend_name(*entry_sets[0])
    del entry_sets
    nbytes = minimal_bytes(n, s, heads, dim, torch.tensor([], dtype=dtype).element_size())
    row["min_bytes"] = nbytes
    row["floor_ms"] = row["sdpa_selected_ms"] + nbytes / HBM_BYTES_PER_S * 1e3
    for name, fn in impls.items():
        layer = lambda q, k, v, fn=fn: fn(q, k, v, cfg)
        row[f"{name}_fwd_ms"] = time_ms(layer, token_sets, False, args.warmup, args.repeats)
        row[f"{name}_ms"] = time_ms(layer, token_sets, True, args.warmup, args.repeats)
        row[f"{name}_peak_mem_gb"] = peak_memory_gb(layer, token_sets[0])
    dense_repeats = max(1, args.repeats if n <= 131072 else args.repeats // 3)
    dense_warmup = 1
    if n > args.dense_max_n:
        dense_repeats, dense_warmup = 1, 0
    row["sdpa_repeats"] = dense_repeats
    row["sdpa_fwd_ms"] = time_ms(causal_attention, token_sets, False, dense_warmup, dense_repeats)
    row["sdpa_ms"] = time_ms(causal_attention, token_sets, True, dense_warmup, dense_repeats)
    first = next(iter(impls))
    row["lighthouse_ms"] = row[f"{first}_ms"]
    row["lighthouse_fwd_ms"] = row[f"{first}_fwd_ms"]
    row["peak_mem_gb"] = row[f"{first}_peak_mem_gb"]
    row["ratio_to_floor"] = row["lighthouse_ms"] / row["floor_ms"]
    row["speedup"] = row["sdpa_ms"] / row["lighthouse_ms"]
    row["device"] = torch.cuda.get_device_name()
    row["torch"] = torch.__version__
    return row


def reference_attention(q, k, v, cfg):
    """The pure-PyTorch path on the same device (kernels disabled)."""
    with kernels.disabled():
        return lighthouse_attention(q, k, v, cfg)


def profile_table(n: int, cfg: LighthouseConfig, args, top: int = 14) -> str:
    """CUDA kernel times of one Lighthouse forward+backward (after a warm-up), largest first."""
    from torch.profiler import ProfilerActivity, profile

    dtype = getattr(torch, args.dtype)
    q, k, v = (
        torch.randn(1, n, args.heads, args.dim, dtype=dtype, device="cuda").requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(1, n, args.heads, args.dim, dtype=dtype, device="cuda")
    for _ in range(2):
        lighthouse_attention(q, k, v, cfg).backward(grad)
    torch.cuda.synchronize()
    for x in (q, k, v):
        x.grad = None
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        lighthouse_attention(q, k, v, cfg).backward(grad)
        torch.cuda.synchronize()
    launches = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) / 1e3
    lines = [
        f"profile N={n} levels={cfg.levels}: {total:.2f} ms of CUDA kernels in one forward+backward"
    ]
    for e in events[:top]:
        lines.append(f"  {e.device_time_total / 1e3:8.3f} ms  x{e.count:<4d} {e.key[:90]}")
    lines.append("  launches in order (ms):")
    for e in launches:
        lines.append(f"    {e.time_range.elapsed_us() / 1e3:8.3f}  {e.name[:80]}")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'N':>8} {'S':>7} {'sdpa ms':>9} {'LH fwd':>8} {'LH f+b':>8} {'floor':>7} "
        f"{'/floor':>7} {'speedup':>8} {'peak GB':>8}"
    )
    if rows and "reference_ms" in rows[0]:
        head += f" {'ref f+b':>8}"
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['N']:>8} {r['S']:>7} {r['sdpa_ms']:>9.2f} {r['lighthouse_fwd_ms']:>8.2f} {r['lighthouse_ms']:>8.2f} "
            f"{r['floor_ms']:>7.2f} {r['ratio_to_floor']:>7.2f} {r['speedup']:>7.1f}x {r['peak_mem_gb']:>8.2f}"
            + (f" {r['reference_ms']:>8.2f}" if "reference_ms" in r else "")
            + ("" if r.get("sdpa_repeats", 2) > 1 else "  (dense: one run)")
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ns", default="32768,131072", help="comma-separated sequence lengths")
    p.add_argument(
        "--levels",
        default="3",
        help="levels for every N, or N:levels pairs, e.g. 131072:3,524288:4",
    )
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--tile-budget", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sets", type=int, default=2, help="random input sets rotated between repeats")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument("--reference", action="store_true", help="also time the pure-PyTorch path")
    p.add_argument(
        "--dense-max-n", type=int, default=524288, help="above this N, dense SDPA runs once"
    )
    p.add_argument("--profile", default="", help="comma-separated N to profile (kernel time table)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/attention.py needs a CUDA device", file=sys.stderr)
        return 2
    ns = [int(x) for x in args.ns.split(",")]
    levels_of = levels_by_n(args.levels, ns)
    impls = {"lighthouse": lighthouse_attention}
    if args.reference:
        impls["reference"] = reference_attention
    for n in [int(x) for x in args.profile.split(",") if x]:
        cfg = LighthouseConfig(
            pool=args.pool, levels=levels_of.get(n, 3), topk=args.topk, tile_budget=args.tile_budget
        )
        print(profile_table(n, cfg, args), flush=True)
    bench_lengths(
        args,
        ns,
        levels_of,
        lambda n, cfg: bench_one(n, cfg, args, impls),
        format_table,
        "times are medians in ms",
    )
    return 0


def bench_lengths(
    args, ns: list[int], levels_of: dict[int, int], bench, table, note: str
) -> list[dict]:
    """bench(n, cfg) -> row for every N (printing each row as it comes), then the whole table
    with the setup line, and the rows as JSON to args.out when given."""
    rows = []
    for n in ns:
        cfg = LighthouseConfig(
            pool=args.pool, levels=levels_of[n], topk=args.topk, tile_budget=args.tile_budget
        )
        rows.append(bench(n, cfg))
        print(table(rows[-1:]), flush=True)
        torch.cuda.empty_cache()
    print(
        f"\n{rows[0]['device']}, torch {torch.__version__}, B=1 H={args.heads} D={args.dim} {args.dtype}, "
        f"pool={args.pool} topk={args.topk} tile_budget={args.tile_budget}; {note}"
    )
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    sys.exit(main())
