"""Cost of the non-finite input check of a Lighthouse layer on one GPU.

The selection makes one host sync to refuse bad scores. It used to test the sum of the q and k
norms for NaN only (so inf in k and anything in v passed); lh_cp.ops.select.check_finite tests the
maxima of the q and k norms and of |v| for finiteness, in the same single sync. Timed here,
with CUDA events (median of --repeats, each including its host sync): the previous check, the
current one, and one whole Lighthouse layer forward+backward for scale.

    python benchmarks/finite_check.py --out finite_check.json      # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lh_cp import LighthouseConfig, lighthouse_attention  # noqa: E402
from lh_cp.ops.entries import check_finite  # noqa: E402
from lh_cp.ops.kernels.scores import token_norms  # noqa: E402


def previous_check(query_scores: torch.Tensor, key_scores: torch.Tensor, v: torch.Tensor) -> None:
    """The check before this change (NaN in the norm sums; v unchecked), as the baseline."""
    if bool(torch.isnan(query_scores.sum() + key_scores.sum())):
        raise ValueError("NaN")


def timed(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats` runs after 3 warm-ups, CUDA events."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=131072)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    q = torch.randn(
        1, args.n, args.heads, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    k = torch.randn(
        1, args.n, args.kv_heads, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    v = torch.randn_like(k, requires_grad=True)
    qs, ks = token_norms(q.detach()), token_norms(k.detach())
    cfg = LighthouseConfig(pool=4, levels=3, topk=2048, tile_budget=128)
    grad = torch.randn_like(q)

    def layer():
        lighthouse_attention(q, k, v, cfg).backward(grad)

    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": {
            "N": args.n,
            "H": args.heads,
            "Hkv": args.kv_heads,
            "D": args.dim,
            "dtype": "bfloat16",
        },
        "previous_check_ms": timed(lambda: previous_check(qs, ks, v.detach()), args.repeats),
        "check_finite_ms": timed(lambda: check_finite(qs, ks, v.detach()), args.repeats),
        "layer_fwd_bwd_ms": timed(layer, max(args.repeats // 2, 5)),
        "command": "python benchmarks/finite_check.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    result["added_ms"] = result["check_finite_ms"] - result["previous_check_ms"]
    result["added_fraction_of_layer"] = result["added_ms"] / result["layer_fwd_bwd_ms"]
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
