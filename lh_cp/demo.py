"""`lh-cp demo`: one Lighthouse layer versus dense causal attention, timed and checked.

Forward+backward wall time of both on the same random inputs, the selected length S, and
the error of the run's dtype against a float64 evaluation with the same selection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lh_cp.ops.attention import attend_selected, single_device_causal, single_device_lighthouse
from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.entries import Selection
from lh_cp.ops.select import select


@dataclass
class DemoResult:
    n: int
    selected: int
    lighthouse_s: float
    dense_s: float
    max_abs_error: float
    ref_max_abs: float


def _forward_backward_seconds(fn, inputs: list[torch.Tensor], repeats: int) -> float:
    """Median wall time of fn(*inputs).sum().backward() over `repeats` runs after a warm-up."""
    times = []
    for i in range(repeats + 1):
        for t in inputs:
            t.grad = None
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
        begin = time.perf_counter()
        fn(*inputs).float().square().sum().backward()
        if inputs[0].is_cuda:
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def run_demo(
    n: int,
    heads: int,
    kv_heads: int,
    dim: int,
    cfg: LighthouseConfig,
    dtype: torch.dtype,
    device: str,
    repeats: int,
    seed: int,
) -> DemoResult:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, n, heads, dim, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    k = (
        torch.randn(1, n, kv_heads, dim, generator=gen)
        .to(device=device, dtype=dtype)
        .requires_grad_()
    )
    v = (
        torch.randn(1, n, kv_heads, dim, generator=gen)
        .to(device=device, dtype=dtype)
        .requires_grad_()
    )
    lighthouse_s = _forward_backward_seconds(
        lambda a, b, c: single_device_lighthouse(a, b, c, cfg), [q, k, v], repeats
    )
    dense_s = _forward_backward_seconds(single_device_causal, [q, k, v], repeats)
    with torch.no_grad():
        sel = select(q, k, cfg)
        out = attend_selected(q, k, v, sel, cfg)
        error, ref_max = _error_versus_float64(q, k, v, sel, cfg, out)
    return DemoResult(
        n=n,
        selected=sel.start.shape[-1],
        lighthouse_s=lighthouse_s,
        dense_s=dense_s,
        max_abs_error=error,
        ref_max_abs=ref_max,
    )


def _error_versus_float64(
    q, k, v, sel: Selection, cfg: LighthouseConfig, out: torch.Tensor
) -> tuple[float, float]:
    """Max |out - float64 evaluation with the same selection|, one head at a time.

    One head at a time because float64 SDPA runs the math backend, whose S x S score matrix
    for all heads at once would not fit on most devices at long N.
    """
    group = q.shape[2] // k.shape[2]
    error = ref_max = 0.0
    for head in range(q.shape[2]):
        one = Selection(
            *(t[:, head : head + 1] for t in (sel.start, sel.end, sel.level, sel.internal)),
            sel.levels,
        )
        kv = slice(head // group, head // group + 1)
        ref = attend_selected(
            q[:, :, head : head + 1].double(), k[:, :, kv].double(), v[:, :, kv].double(), one, cfg
        )
        error = max(error, (out[:, :, head : head + 1].double() - ref).abs().max().item())
        ref_max = max(ref_max, ref.abs().max().item())
    return error, ref_max


def format_demo(result: DemoResult, cfg: LighthouseConfig, dtype: torch.dtype, device: str) -> str:
    tile = cfg.tile_size(result.n)
    lines = [
        f"Lighthouse {cfg} on {device}, {dtype}",
        f"  N = {result.n} tokens, tile size T = {tile}, selected length S = {result.selected} "
        f"({result.selected / result.n:.1%} of N)",
        f"  forward+backward (median): lighthouse {result.lighthouse_s * 1e3:.1f} ms, "
        f"dense causal SDPA {result.dense_s * 1e3:.1f} ms, speedup {result.dense_s / result.lighthouse_s:.2f}x",
        f"  max |out - float64 reference| = {result.max_abs_error:.3e} "
        f"(max |reference| = {result.ref_max_abs:.3f})",
    ]
    return "\n".join(lines)
