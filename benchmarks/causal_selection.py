"""The strictly causal selection (docs/LIGHTHOUSE.md s.11) against the paper's, one layer on one GPU.

For every N, in the same run and on the same inputs: the Lighthouse layer forward and
forward+backward with selection "tile_topk" (the paper's) and "causal", the selection alone
(Triton norms + selection kernel, and for the causal one the thresholds), and the floor
(causal SDPA forward+backward on the S selected entries: both selections give the same S).
Timing as benchmarks/attention.py (CUDA events, warm-up, median of the repeats, fresh inputs
rotated from a pool). Interleaved: the two selections alternate per repeat block so drift
(clocks, temperature) hits both alike.

    python benchmarks/causal_selection.py --ns 131072,524288,1048576 --levels 131072:3,524288:4,1048576:4 \
        --out benchmarks/results/causal_selection_h200.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
from attention import _random_sets, bench_lengths, levels_by_n, time_ms

from lh_cp import LighthouseConfig, lighthouse_attention

SELECTIONS = ("tile_topk", "causal")


def bench_n(n: int, cfg: LighthouseConfig, args) -> dict:
    from lh_cp.ops.kernels.ops import select_with_plan
    from lh_cp.ops.kernels.sdpa import sdpa_causal_fast

    dtype = getattr(torch, args.dtype)
    s = cfg.selected_length(n)
    token_sets = _random_sets(args.sets, [(1, n, args.heads, args.dim)] * 3, dtype, "cuda")
    entry_sets = _random_sets(args.sets, [(1, args.heads, s, args.dim)] * 3, dtype, "cuda")
    row = {
        "N": n,
        "S": s,
        "config": {k: v for k, v in vars(cfg).items() if k != "selection"},
        "heads": args.heads,
        "dim": args.dim,
        "dtype": args.dtype,
        "batch": 1,
        "sdpa_selected_ms": time_ms(sdpa_causal_fast, entry_sets, True, args.warmup, args.repeats),
    }
    del entry_sets
    times = {name: {"fwd": [], "fwd_bwd": [], "select": []} for name in SELECTIONS}
    for _ in range(args.rounds):
        for name in SELECTIONS:
            c = replace(cfg, selection=name)
            layer = lambda q, k, v, c=c: lighthouse_attention(q, k, v, c)
            choose = lambda q, k, v, c=c: select_with_plan(q, k, c)
            times[name]["fwd"].append(time_ms(layer, token_sets, False, args.warmup, args.repeats))
            times[name]["fwd_bwd"].append(
                time_ms(layer, token_sets, True, args.warmup, args.repeats)
            )
            times[name]["select"].append(
                time_ms(choose, token_sets, False, args.warmup, args.repeats)
            )
    for name in SELECTIONS:
        for kind, values in times[name].items():
            row[f"{name}_{kind}_ms"] = sorted(values)[len(values) // 2]
            row[f"{name}_{kind}_ms_rounds"] = values
    row["causal_over_paper_fwd_bwd"] = row["causal_fwd_bwd_ms"] / row["tile_topk_fwd_bwd_ms"]
    row["causal_over_paper_fwd"] = row["causal_fwd_ms"] / row["tile_topk_fwd_ms"]
    row["device"] = torch.cuda.get_device_name()
    row["torch"] = torch.__version__
    return row


def format_table(rows: list[dict]) -> str:
    lines = [
        f"{'N':>8} {'S':>7} {'floor':>7} | {'paper fwd':>9} {'f+b':>7} {'select':>7} | "
        f"{'causal fwd':>10} {'f+b':>7} {'select':>7} | {'causal/paper f+b':>16}"
    ]
    for r in rows:
        lines.append(
            f"{r['N']:>8} {r['S']:>7} {r['sdpa_selected_ms']:>7.2f} | {r['tile_topk_fwd_ms']:>9.2f} "
            f"{r['tile_topk_fwd_bwd_ms']:>7.2f} {r['tile_topk_select_ms']:>7.2f} | {r['causal_fwd_ms']:>10.2f} "
            f"{r['causal_fwd_bwd_ms']:>7.2f} {r['causal_select_ms']:>7.2f} | {r['causal_over_paper_fwd_bwd']:>16.3f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ns", default="131072,524288,1048576")
    p.add_argument(
        "--levels",
        default="131072:3,524288:4,1048576:4",
        help="N:levels pairs, or one number for all",
    )
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--tile-budget", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternations of the two selections (median over rounds)",
    )
    p.add_argument("--sets", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/causal_selection.py needs a CUDA device", file=sys.stderr)
        return 2
    ns = [int(x) for x in args.ns.split(",")]
    levels_of = levels_by_n(args.levels, ns)
    bench_lengths(
        args,
        ns,
        levels_of,
        lambda n, cfg: bench_n(n, cfg, args),
        format_table,
        "medians in ms (floor: SDPA f+b on S)",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
