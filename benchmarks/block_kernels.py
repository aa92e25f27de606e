"""What the CP block attention may ask of PyTorch's fused kernels, and what dense SDPA costs.

1. Diagonal: for a causal block with Sq < Sk (a query chunk over its earlier chunks and itself
   in one call), does each backend (cuDNN, flash) align the diagonal bottom-right, as
   parallel/headtail/blocks.py's reference does? Forward and backward, relative L2 error
   against the float32 reference with each alignment.
2. Strides: the same block with K/V a prefix slice of a longer sequence (not contiguous).
3. Dense causal SDPA at --dense-tokens (B=1, H=8, D=128, bf16), forward+backward per backend
   and with PyTorch's default choice, median of --repeats.

    python benchmarks/block_kernels.py --out benchmarks/results/block_kernels_h200.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def reference(q, k, v, dout, bottom_right: bool):
    """float32 out, lse and gradients of causal attention with the given diagonal alignment."""
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    sq, sk = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(
        1 + (sk - sq if bottom_right else 0)
    )
    scores = scores.masked_fill(mask, float("-inf"))
    lse = scores.logsumexp(-1)
    out = scores.softmax(-1) @ v
    out.backward(dout.float())
    return out.detach(), lse.detach(), [t.grad for t in (q, k, v)]


def diagonal_rows() -> list[dict]:
    from lh_cp.parallel.headtail.fused_blocks import (
        fused_backend,
        fused_block_backward,
        fused_block_forward,
    )

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    make = lambda s, n=None: torch.randn(1, 8, s, 128, device="cuda", generator=gen).bfloat16()
    was = torch.backends.cuda.cudnn_sdp_enabled()
    for backend in ("cudnn", "flash"):
        torch.backends.cuda.enable_cudnn_sdp(backend == "cudnn")
        for sq, sk, strided in [(512, 1536, False), (512, 1536, True), (1024, 1024, True)]:
            q, dout = make(sq), make(sq)
            if strided:  # K/V: the first sk rows of a 2 sk sequence, a non-contiguous view
                k_full, v_full = make(2 * sk), make(2 * sk)
                k, v = k_full[:, :, :sk], v_full[:, :, :sk]
            else:
                k, v = make(sk), make(sk)
            row = {"backend": fused_backend(q), "sq": sq, "sk": sk, "kv_strided": strided}
            try:
                out, lse = fused_block_forward(q, k, v, True)
                grads = fused_block_backward(dout, q, k, v, out, lse, True)
            except RuntimeError as err:
                row["error"] = str(err)[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            for name, bottom_right in (("bottom_right", True), ("top_left", False)):
                ref_out, ref_lse, ref_grads = reference(q, k, v, dout, bottom_right)
                row[name] = {
                    "out": rel(out, ref_out),
                    "lse": rel(lse, ref_lse),
                    **{f"d{n}": rel(g, r) for n, g, r in zip("qkv", grads, ref_grads)},
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    torch.backends.cuda.enable_cudnn_sdp(was)
    return rows


def dense_rows(n: int, repeats: int) -> list[dict]:
    rows = []
    choices = {
        "default": None,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
    }
    for name, backend in choices.items():
        times = []
        for i in range(repeats + 2):
            q, k, v, dout = (torch.randn(1, 8, n, 128, device="cuda").bfloat16() for _ in range(4))
            q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if backend is None:
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)
            else:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dout)
            stop.record()
            torch.cuda.synchronize()
            if i >= 2:
                times.append(start.elapsed_time(stop))
        picked = (
            SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=True)).name
            if backend is None
            else backend.name
        )
        row = {"sdpa": name, "picks": picked, "N": n, "fwd_bwd_ms": statistics.median(times)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dense-tokens", type=int, default=131072)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "diagonal": diagonal_rows(),
        "dense": dense_rows(args.dense_tokens, args.repeats),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
