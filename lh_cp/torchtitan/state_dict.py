"""Weights between lh-cp's model (lh_cp.model.transformer.Transformer) and the torchtitan llama3 model.

Both models hold the same tensors in the same layout (rotate-half RoPE, q/k/v/o and SwiGLU
w1/w2/w3 as [out, in] matrices); only names differ:
    lh-cp                                 torchtitan
    layers.{i}.attention.w{q,k,v}.weight  layers.{i}.attention.qkv_linear.w{q,k,v}.weight
    output.weight                         lm_head.weight
Every other key is the same. torchtitan's fused wqkv saves and loads as wq/wk/wv (its own
state-dict hooks), so these mappings work on `state_dict()` / `load_state_dict()` directly.
With tied embeddings lh-cp has no output.weight while torchtitan lists lm_head.weight too.
"""

from __future__ import annotations

import re

import torch

_QKV_LH = re.compile(r"^layers\.(\d+)\.attention\.(wq|wk|wv)\.weight$")
_QKV_TT = re.compile(r"^layers\.(\d+)\.attention\.qkv_linear\.(wq|wk|wv)\.weight$")
_SHARED = re.compile(
    r"^(tok_embeddings\.weight|norm\.weight|layers\.\d+\.(attention\.wo|feed_forward\.w[123]|attention_norm|ffn_norm)\.weight)$"
)


def lh_cp_to_torchtitan(
    state: dict[str, torch.Tensor], tie_embeddings: bool = False
) -> dict[str, torch.Tensor]:
    """lh-cp Transformer state dict -> torchtitan Llama3Model state dict (same tensors)."""
    out = {}
    for key, value in state.items():
        if match := _QKV_LH.match(key):
            out[f"layers.{match[1]}.attention.qkv_linear.{match[2]}.weight"] = value
        elif key == "output.weight":
            out["lm_head.weight"] = value
        elif _SHARED.match(key):
            out[key] = value
        else:
            raise ValueError(f"lh-cp state dict key {key!r} has no torchtitan counterpart")
    if tie_embeddings:
        if "lm_head.weight" in out:
            raise ValueError("tie_embeddings=True but the lh-cp state dict has output.weight")
        out["lm_head.weight"] = out["tok_embeddings.weight"]
    return out


def torchtitan_to_lh_cp(
    state: dict[str, torch.Tensor], tie_embeddings: bool = False
) -> dict[str, torch.Tensor]:
    """torchtitan Llama3Model state dict -> lh-cp Transformer state dict (same tensors)."""
    out = {}
    for key, value in state.items():
        if match := _QKV_TT.match(key):
            out[f"layers.{match[1]}.attention.{match[2]}.weight"] = value
        elif key == "lm_head.weight":
            if not tie_embeddings:
                out["output.weight"] = value
        elif _SHARED.match(key):
            out[key] = value
        else:
            raise ValueError(f"torchtitan state dict key {key!r} has no lh-cp counterpart")
    return out
