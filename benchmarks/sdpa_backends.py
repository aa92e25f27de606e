"""Which fused SDPA backend to run on the gathered entries: time and determinism per backend.

For each selected length S (B=1, H=8, D=128, bf16, causal) and each backend that accepts the
inputs: median forward+backward ms (CUDA events, fresh random inputs), and whether two
forward+backward runs on the same inputs give the same bits, with PyTorch's deterministic
mode off and on.

    python benchmarks/sdpa_backends.py --ss 18432,24576,32768,40960
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def fwd_bwd(backend, q, k, v, grad):
    with sdpa_kernel([backend]):
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


def time_backend(backend, s, heads, dim, repeats=10, warmup=3):
    times = []
    for i in range(warmup + repeats):
        q, k, v, grad = (
            torch.randn(1, heads, s, dim, device="cuda", dtype=torch.bfloat16) for _ in range(4)
        )
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fwd_bwd(backend, q, k, v, grad)
        stop.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(stop))
    return statistics.median(times)


def same_bits(backend, s, heads, dim, deterministic):
    q, k, v, grad = (
        torch.randn(1, heads, s, dim, device="cuda", dtype=torch.bfloat16) for _ in range(4)
    )
    torch.use_deterministic_algorithms(deterministic)
    try:
        first, second = fwd_bwd(backend, q, k, v, grad), fwd_bwd(backend, q, k, v, grad)
    finally:
        torch.use_deterministic_algorithms(False)
    return all(torch.equal(a, b) for a, b in zip(first, second))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ss", default="18432,24576,32768,40960")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=128)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}"
    )
    print(f"{'S':>7} {'backend':>20} {'f+b ms':>8} {'same bits':>10} {'same bits (det.)':>17}")
    for s in [int(x) for x in args.ss.split(",")]:
        for backend in BACKENDS:
            try:
                ms = time_backend(backend, s, args.heads, args.dim)
                det = same_bits(backend, s, args.heads, args.dim, False)
                det_on = same_bits(backend, s, args.heads, args.dim, True)
            except RuntimeError as err:
                print(f"{s:>7} {backend.name:>20} unavailable: {str(err).splitlines()[0][:80]}")
                continue
            print(
                f"{s:>7} {backend.name:>20} {ms:>8.2f} {str(det):>10} {str(det_on):>17}", flush=True
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
