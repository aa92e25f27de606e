"""Per-kernel timing of the Lighthouse kernels against a copy of the same bytes (H100 notes).

For one N and configuration: a device-to-device copy of q (bandwidth reference), the token
norms, the block pooling kernel (gather forward of q) with all levels and with level 1 only
(load and store, no pooling), its tensor-core variant (pool_blocks with USE_DOT), the expand
kernel (scatter forward) and the whole gather of q, k, v. Median of triton.testing.do_bench.

    python benchmarks/kernel_micro.py --n 524288 --levels 4
"""

from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=524288)
    p.add_argument("--levels", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    args = p.parse_args(argv)
    import triton

    from lh_cp import LighthouseConfig
    from lh_cp.ops.kernels.launch import check_grid
    from lh_cp.ops.kernels.ops import select_with_plan
    from lh_cp.ops.kernels.pool_blocks import block_levels, launch_pool_blocks
    from lh_cp.ops.kernels.rows import expand_rows, pool_rows
    from lh_cp.ops.kernels.scores import token_norms

    cfg = LighthouseConfig(pool=4, levels=args.levels, topk=2048, tile_budget=128)
    n, heads, dim = args.n, args.heads, args.dim
    q, k, v = (torch.randn(1, n, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    plan, *_ = select_with_plan(q, k, cfg)
    s = cfg.selected_length(n)
    y = torch.empty(1, heads, s, dim, device="cuda", dtype=torch.bfloat16)
    entries = torch.randn(1, heads, s, dim, device="cuda", dtype=torch.bfloat16)
    x_bytes = q.numel() * q.element_size()
    levels_here, tb = block_levels(cfg.pool, cfg.levels)

    def blocks(lb, rows):
        return lambda: launch_pool_blocks(
            q, None, y, plan.slot_map, n, 1, cfg.pool, lb, rows, 0, True, check_grid
        )

    cases = {
        "copy q (read+write)": (lambda: q.clone(), 2 * x_bytes),
        "token norms q": (lambda: token_norms(q), x_bytes),
        f"pool blocks LB={levels_here} TB={tb}": (blocks(levels_here, tb), x_bytes),
        f"pool blocks LB=1 TB={tb} (no pooling)": (blocks(1, tb), x_bytes),
        f"pool blocks LB={levels_here} TB=128": (blocks(levels_here, 128), x_bytes),
        "gather q,k,v (pool_rows)": (lambda: pool_rows([q, k, v], plan, cfg, 0, True), 3 * x_bytes),
        "scatter fwd (expand_rows)": (lambda: expand_rows([entries], plan, cfg, 1, False), x_bytes),
        "scatter bwd (pool_rows shift 1)": (lambda: pool_rows([q], plan, cfg, 1, False), x_bytes),
    }
    print(
        f"{torch.cuda.get_device_name()} N={n} levels={cfg.levels} H={heads} D={dim} bf16; one "
        f"tensor = {x_bytes / 1e9:.2f} GB"
    )
    for name, (fn, nbytes) in cases.items():
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        print(f"{name:45s} {ms:8.3f} ms  {nbytes / ms / 1e9:7.2f} TB/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
