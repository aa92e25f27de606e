"""The `lh-cp` command line: a thin layer over the library (subcommands grow with it)."""

from __future__ import annotations

import argparse
import sys

import torch

from lh_cp.config import LighthouseConfig

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="time one Lighthouse layer against dense attention and check it")
    p.add_argument("--n", type=int, default=16384, help="sequence length in tokens")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default = heads")
    p.add_argument("--dim", type=int, default=64, help="head dimension")
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--topk", type=int, default=256)
    p.add_argument("--tile-budget", type=int, default=32)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)


def _run_demo(args) -> int:
    from lh_cp.demo import format_demo, run_demo

    cfg = LighthouseConfig(pool=args.pool, levels=args.levels, topk=args.topk, tile_budget=args.tile_budget)
    cfg.tile_size(args.n)
    dtype = DTYPES[args.dtype]
    result = run_demo(
        args.n, args.heads, args.kv_heads or args.heads, args.dim, cfg, dtype, args.device, args.repeats, args.seed
    )
    print(format_demo(result, cfg, dtype, args.device))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lh-cp", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo(subparsers)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _run_demo(args)
    except ValueError as err:
        print(f"lh-cp {args.command}: error: {err}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
