"""Block attention with its log-sum-exp through PyTorch's flash-attention kernels (CUDA only).

The fast twin of `block_forward` / `block_backward` in partial_attention.py, for bf16/fp16
CUDA tensors: same layouts, same meaning, float32 results. Forward returns the block's
output and LSE; backward receives the *final* output and LSE of the merged attention, so the
kernel's exp(scores - lse) is this block's share of the full softmax and block gradients add
up, exactly as in the reference.

GQA: the flash kernels want equal head counts, so K/V heads are repeated for the kernel and
their gradients summed back over each group.
"""

from __future__ import annotations

import functools

import torch

_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_backward.default


def flash_supported(q: torch.Tensor) -> bool:
    """Whether the flash path applies: CUDA, half precision, head dim the kernel handles."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0


@functools.lru_cache(maxsize=None)
def _non_varlen_extras(device: torch.device, dtype: torch.dtype) -> tuple:
    """cum_seq_q, cum_seq_k, rng_state, unused as the forward returns them for a padded
    (non-varlen) call without dropout; the backward wants them back unchanged."""
    probe = torch.ones(1, 1, 1, 64, device=device, dtype=dtype)
    result = _flash_forward(probe, probe, probe, 0.0, False, False)
    return result[2], result[3], result[6], result[7]


def _repeat_heads(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def flash_block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """q [B, H, Sq, D], k and v [B, Hk, Sk, D] -> out [B, H, Sq, D] (float32), lse [B, H, Sq]."""
    group = q.shape[1] // k.shape[1]
    result = _flash_forward(q, _repeat_heads(k, group), _repeat_heads(v, group), 0.0, causal, False)
    return result[0].float(), result[1].float()


def flash_block_backward(dout, q, k, v, out, lse, causal: bool):
    """Block gradients given the final out [B, H, Sq, D] and lse [B, H, Sq]: float32
    dq [B, H, Sq, D], dk and dv [B, Hk, Sk, D]."""
    batch, kv_heads, sk, dim = k.shape
    group = q.shape[1] // kv_heads
    cum_q, cum_k, rng_state, unused = _non_varlen_extras(q.device, q.dtype)
    dq, dk, dv = _flash_backward(
        dout.to(q.dtype).contiguous(), q, _repeat_heads(k, group), _repeat_heads(v, group),
        out.to(q.dtype).contiguous(), lse.float().contiguous(), cum_q, cum_k, q.shape[2], sk,
        0.0, causal, rng_state, unused,
    )
    if group > 1:
        dk = dk.view(batch, kv_heads, group, sk, dim).sum(dim=2)
        dv = dv.view(batch, kv_heads, group, sk, dim).sum(dim=2)
    return dq.float(), dk.float(), dv.float()
