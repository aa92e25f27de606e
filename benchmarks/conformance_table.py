"""The table of tests/test_cp_conformance.py: the largest error of lh-cp's CP attention per
peer case (shapes and inputs of ring-flash-attention, TransformerEngine, PyTorch's
RingAttentionTest, yunchang; see the test's docstring), over both kinds (dense, Lighthouse),
both exchanges, outputs and q/k/v gradients, CPU gloo.

    python benchmarks/conformance_table.py [--worlds 2,4]      # a 2-core CPU is enough

float32: max absolute error against the single-process float32 result. bf16: max absolute
error against the float32 computation on the same bf16-rounded inputs, for CP and for the
single-device bf16 path (the test requires CP <= 2 x one device + 1e-3).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_cp_conformance as conformance  # noqa: E402
from dist_utils import run_distributed  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--worlds", default="2,4")
    args = p.parse_args(argv)
    references = conformance._references()
    worst: dict[tuple[str, int], list[float]] = {}
    worlds = [int(w) for w in args.worlds.split(",")]
    for world in worlds:
        for rank, results in enumerate(run_distributed(conformance._job, world, timeout=540)):
            for (name, kind, dtype, _exchange), got in results.items():
                want = [
                    conformance._head_tail(t, rank, world) for t in references[(name, kind, dtype)]
                ]
                row = worst.setdefault((name, world), [0.0, 0.0, 0.0])
                errors = [conformance._max_error(a, b) for a, b in zip(got, want)]
                if dtype == "float32":
                    row[0] = max(row[0], *errors)
                else:
                    one = [
                        conformance._head_tail(t, rank, world)
                        for t in references[(name, kind, "bfloat16_one_device")]
                    ]
                    row[1] = max(row[1], *errors)
                    row[2] = max(row[2], *(conformance._max_error(c, b) for c, b in zip(one, want)))
    print(
        "| case (B, H, Hkv, D) | W | float32 max abs error | bf16 CP error vs truth | bf16 one-device error vs truth |"
    )
    print("|---|---|---|---|---|")
    for (name, world), (f32, cp, one) in worst.items():
        batch, heads, kv_heads, dim = conformance.CASES[name][:4]
        print(
            f"| {name} ({batch}, {heads}, {kv_heads}, {dim}) | {world} | {f32:.1e} | {cp:.3f} | {one:.3f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
