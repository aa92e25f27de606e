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

With documents the rank's own block is causal attention inside each run of one document
(documents.py): fused_varlen_forward / fused_varlen_backward run it as one call of flash
attention's varlen kernel (aten's _flash_attention_forward / _backward with cumulative run
lengths; the same ops torch.nn.attention.varlen wraps, here called directly because the
backward must take the final merged output and LSE, as the block backward above does). Flash
only: cuDNN's varlen entry differs between torch 2.11 and 2.14. Its LSE comes as [H, total
tokens] and is handed out as a [B, H, 2S] view.
"""

from __future__ import annotations

import functools

import torch

_cudnn_forward = torch.ops.aten._scaled_dot_product_cudnn_attention.default
_cudnn_backward = torch.ops.aten._scaled_dot_product_cudnn_attention_backward.default
_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention.default
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_backward.default
_varlen_forward = torch.ops.aten._flash_attention_forward.default
_varlen_backward = torch.ops.aten._flash_attention_backward.default


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


def _check_varlen(q: torch.Tensor) -> None:
    """The varlen kernel is flash attention's: refuse, naming why, where flash cannot run."""
    dim = q.shape[-1]
    if not torch.backends.cuda.flash_sdp_enabled() or dim > 256:
        raise ValueError(
            f"document-masked CP attention runs the rank's own block in flash attention's varlen "
            f"kernel, which needs head size <= 256 (got {dim}) and flash SDPA enabled "
            f"(torch.backends.cuda.enable_flash_sdp(True); now "
            f"{torch.backends.cuda.flash_sdp_enabled()})"
        )


def _tokens_major(x: torch.Tensor, group: int = 1) -> torch.Tensor:
    """[B, Hx, L, D] -> [B * L, Hx * group, D] (heads repeated for GQA), as varlen kernels take it."""
    x = _repeat_heads(x, group)
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[-1])


def _blocks_major(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B * L, H, D] -> [B, H, L, D] (a view)."""
    return x.view(batch, -1, *x.shape[1:]).transpose(1, 2)


def fused_varlen_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int
):
    """Causal attention inside each run of q [B, H, L, D], k and v [B, Hk, L, D] flattened to
    B * L tokens, the runs given by cu (int32 cumulative lengths): out [B, H, L, D] (q's dtype)
    and lse [B, H, L] (float32; views of the kernel's token-major results)."""
    _check_varlen(q)
    batch, heads = q.shape[:2]
    group = heads // k.shape[1]
    out, lse = _varlen_forward(
        _tokens_major(q),
        _tokens_major(k, group),
        _tokens_major(v, group),
        cu,
        cu,
        longest,
        longest,
        0.0,
        True,
        False,
    )[:2]
    if lse.shape != (heads, out.shape[0]):
        raise ValueError(
            f"flash varlen returned an LSE of shape {tuple(lse.shape)}, expected [H, tokens] = "
            f"{[heads, out.shape[0]]}: this torch's varlen layout is not the one lh-cp reads"
        )
    return _blocks_major(out, batch), lse.view(heads, batch, -1).transpose(0, 1)


def fused_varlen_backward(dout, q, k, v, out, lse, cu: torch.Tensor, longest: int):
    """Gradients of fused_varlen_forward's call given the final out [B, H, L, D] and lse
    [B, H, L]: dq [B, H, L, D] in q's dtype, dk and dv [B, Hk, L, D] (float32 where GQA sums
    a group's heads)."""
    _check_varlen(q)
    batch, kv_heads, length, dim = k.shape
    heads = q.shape[1]
    group = heads // kv_heads
    _, _, rng_state, unused = _backward_extras("flash", q.device, q.dtype)
    dq, dk, dv = _varlen_backward(
        _tokens_major(dout.to(q.dtype)),
        _tokens_major(q),
        _tokens_major(k, group),
        _tokens_major(v, group),
        _tokens_major(out.to(q.dtype)),
        lse.float().transpose(0, 1).reshape(heads, -1).contiguous(),
        cu,
        cu,
        longest,
        longest,
        0.0,
        True,
        rng_state,
        unused,
    )
    dq, dk, dv = (_blocks_major(x, batch) for x in (dq, dk, dv))
    if group > 1:
        dk = dk.reshape(batch, kv_heads, group, length, dim).sum(dim=2, dtype=torch.float32)
        dv = dv.reshape(batch, kv_heads, group, length, dim).sum(dim=2, dtype=torch.float32)
    return dq, dk, dv
