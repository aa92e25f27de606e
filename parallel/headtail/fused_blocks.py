"""Block attention with its log-sum-exp through PyTorch's fused kernels (CUDA only).

The fast twin of `block_forward` / `block_backward` in blocks.py, for bf16/fp16
CUDA tensors: same layouts, same meaning. Forward returns the block's output (in the inputs'
dtype, as the kernel wrote it) and its float32 LSE; backward receives the *final* output and
LSE of the merged attention, so the kernel's exp(scores - lse) is this block's share of the
full softmax and block gradients add up, exactly as in the reference. The callers merge the
outputs in float32 registers (lh_cp/ops/kernels/merge.py) and sum gradients in float32 only where
a tensor receives several parts (no separate conversion pass).

Backend: cuDNN first, as for the single-device layer (lh_cp/ops/kernels/sdpa.py): on the H100 it
ran causal forward+backward at S = 24576 in 7.29 ms against flash's 13.93 ms
(benchmarks/NOTES.md). Flash runs where cuDNN does not: deterministic mode (cuDNN has no
deterministic backward), cuDNN SDPA switched off by torch.backends.cuda.enable_cudnn_sdp, a
cuDNN older than 9, a GPU older than sm80, or a head dimension above 128. Both follow PyTorch's global SDPA switches.

GQA: the kernels want equal head counts, so K/V heads are repeated for the kernel and their
gradients summed back over each group.
"""

from __future__ import annotations

import functools

import torch

_cudnn_forward = torch.ops.aten._scaled_dot_product_cudnn_attention.default
_cudnn_backward = torch.ops.aten._scaled_dot_product_cudnn_attention_backward.default
_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_backward.default


def fused_backend(q: torch.Tensor) -> str | None:
    """'cudnn', 'flash', or None (the reference runs) for block queries like `q`."""
    if not (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0):
        return None
    dim = q.shape[-1]
    cudnn_ok = (
        torch.backends.cudnn.is_available() and (torch.backends.cudnn.version() or 0) >= 90000
    )
    if (
        cudnn_ok
        and dim <= 128
        and torch.backends.cuda.cudnn_sdp_enabled()
        and not torch.are_deterministic_algorithms_enabled()
        and torch.cuda.get_device_capability(q.device) >= (8, 0)
    ):
        return "cudnn"
    if dim <= 256 and torch.backends.cuda.flash_sdp_enabled():
        return "flash"
    return None


def fused_supported(q: torch.Tensor) -> bool:
    return fused_backend(q) is not None


@functools.cache
def _backward_extras(backend: str, device: torch.device, dtype: torch.dtype) -> tuple:
    """The tensors a padded (non-varlen) forward without dropout returns for its backward:
    flash's cum_seq_q, cum_seq_k, rng_state, unused; cuDNN's philox seed and offset."""
    probe = torch.ones(1, 1, 64, 64, device=device, dtype=dtype)
    if backend == "cudnn":
        result = _cudnn_forward(probe, probe, probe, None, True, 0.0, False, False)
        return result[6], result[7]
    result = _flash_forward(probe, probe, probe, 0.0, False, False)
    return result[2], result[3], result[6], result[7]


def _repeat_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def fused_block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """q [B, H, Sq, D], k and v [B, Hk, Sk, D] -> out [B, H, Sq, D] (q's dtype), lse [B, H, Sq] (float32)."""
    group = q.shape[1] // k.shape[1]
    k, v = _repeat_heads(k, group), _repeat_heads(v, group)
    if fused_backend(q) == "cudnn":
        result = _cudnn_forward(q, k, v, None, True, 0.0, causal, False)
    else:
        result = _flash_forward(q, k, v, 0.0, causal, False)
    return result[0], result[1].float().reshape(q.shape[:-1])  # cuDNN's LSE is [B, H, Sq, 1]


def fused_block_backward(dout, q, k, v, out, lse, causal: bool):
    """Block gradients given the final out [B, H, Sq, D] and lse [B, H, Sq]: dq [B, H, Sq, D]
    in q's dtype, dk and dv [B, Hk, Sk, D] (float32 where GQA sums a group's heads)."""
    batch, kv_heads, sk, dim = k.shape
    sq, group = q.shape[2], q.shape[1] // kv_heads
    k_rep, v_rep = _repeat_heads(k, group), _repeat_heads(v, group)
    dout, out = dout.to(q.dtype).contiguous(), out.to(q.dtype).contiguous()
    backend = fused_backend(q)
    extras = _backward_extras(backend, q.device, q.dtype)
    if backend == "cudnn":
        seed, offset = extras
        dq, dk, dv = _cudnn_backward(
            dout,
            q,
            k_rep,
            v_rep,
            out,
            lse.float().reshape(*lse.shape, 1).contiguous(),
            seed,
            offset,
            None,
            None,
            None,
            sq,
            sk,
            0.0,
            causal,
        )
    else:
        cum_q, cum_k, rng_state, unused = extras
        dq, dk, dv = _flash_backward(
            dout,
            q,
            k_rep,
            v_rep,
            out,
            lse.float().contiguous(),
            cum_q,
            cum_k,
            sq,
            sk,
            0.0,
            causal,
            rng_state,
            unused,
        )
    if group > 1:
        dk = dk.reshape(batch, kv_heads, group, sk, dim).sum(dim=2, dtype=torch.float32)
        dv = dv.reshape(batch, kv_heads, group, sk, dim).sum(dim=2, dtype=torch.float32)
    return dq, dk, dv
