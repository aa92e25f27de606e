"""Llama-3 style decoder whose layers use Lighthouse or dense causal attention.

RMSNorm, SwiGLU, RoPE at explicit global positions, grouped-query attention, optional tied
embeddings. No distributed code: each attention module calls the two methods of its
`context` (lighthouse, dense): one device's attention (lh_cp.ops.attention.SINGLE_DEVICE, the
default) or the lh_cp.parallel.ContextParallel that parallelize hands it, which owns the
exchange. Under context parallelism a rank holds a shard whose positions need not be
contiguous (head-tail), which is why positions are passed in instead of derived from the
shard length.

Packed documents: `documents` (lh_cp/ops/documents.py, the batch's global boundaries) is
handed to every layer's attention unchanged; positions may then be per row ([B, n]: RoPE
restarting at each document, data.positions = "document"). The model never reads the
boundaries itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lh_cp.data.loader import IGNORE_INDEX
from lh_cp.model.loss import chunked_argmax, cross_entropy_sum
from lh_cp.ops.attention import SINGLE_DEVICE
from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.rope import rotate
from lh_cp.section import Section

AttentionMode = Literal["lighthouse", "dense"]


@dataclass
class ModelConfig(Section):
    """Shape of the decoder (recipe section [model]).

    vocab_size: rows of the embedding and output matrices; at least the tokenizer's
        vocabulary (the byte tokenizer has 258 tokens: 256 bytes, end-of-document, pad).
    dim: width of the residual stream.
    n_layers: number of decoder blocks.
    n_heads: query heads; dim must be a multiple of n_heads and the head size dim / n_heads
        must be even (RoPE rotates pairs of channels).
    n_kv_heads: key/value heads (grouped-query attention); n_heads must be a multiple of it.
    ffn_dim: hidden width of the SwiGLU feed-forward block.
    rope_theta: RoPE base; Llama-3 uses 500000, long-context runs often raise it.
    norm_eps: epsilon of every RMSNorm.
    tie_embeddings: share one matrix between the token embedding and the output projection.
    init_std: standard deviation of the normal initialisation of every linear and embedding
        weight; output projections of each block are further divided by sqrt(2 * n_layers).
    loss_chunk_tokens: the output projection and cross-entropy run over this many tokens at
        a time with recomputation in backward, so [tokens, vocab] logits never exist at once.
    """

    vocab_size: int = 258
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 768
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    loss_chunk_tokens: int = 4096

    def problems(self) -> list[str]:
        errors = [
            f"model.{name} must be >= 1, got {getattr(self, name)}"
            for name in (
                "vocab_size",
                "dim",
                "n_layers",
                "n_heads",
                "n_kv_heads",
                "ffn_dim",
                "loss_chunk_tokens",
            )
            if getattr(self, name) < 1
        ]
        if errors:
            return errors
        if self.dim % self.n_heads != 0:
            errors.append(
                f"model.dim must be a multiple of model.n_heads: dim={self.dim}, n_heads={self.n_heads}"
            )
        elif self.head_dim % 2 != 0:
            errors.append(
                f"head size dim / n_heads must be even for RoPE: {self.dim} / {self.n_heads} = {self.head_dim}"
            )
        if self.n_heads % self.n_kv_heads != 0:
            errors.append(
                f"model.n_heads must be a multiple of model.n_kv_heads (GQA): "
                f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}"
            )
        if self.rope_theta <= 1.0:
            errors.append(f"model.rope_theta must be > 1, got {self.rope_theta}")
        return errors

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


def normalize_layer_indices(
    indices: list[int] | tuple[int, ...], n_layers: int, key: str = "lighthouse.dense_layers"
) -> frozenset[int]:
    """Layer indices with Python-style negatives resolved; out-of-range indices raise, naming
    the recipe `key` they came from."""
    resolved = set()
    for index in indices:
        if not -n_layers <= index < n_layers:
            raise ValueError(
                f"{key} index {index} is out of range for n_layers={n_layers} "
                f"(valid: {-n_layers}..{n_layers - 1})"
            )
        resolved.add(index % n_layers)
    return frozenset(resolved)


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, head_dim / 2] for int64 positions [n] shared by every row, or
    [B, n, head_dim / 2] for positions [B, n] of each row.

    Angles are formed in float64: at a million positions float32 products lose ~0.1 rad.
    """
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim
    )
    angles = positions.to(torch.float64)[..., None] * inv_freq  # [.., n, head_dim / 2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head (HF Llama layout): x [B, n, H, D], cos/sin [n, D/2]
    or [B, n, D/2]."""
    return rotate(x, cos.unsqueeze(-2), sin.unsqueeze(-2))  # cos, sin [.., n, 1, D/2]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 so bf16 activations do not lose the mean square.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return normed.to(x.dtype) * self.weight


class Attention(nn.Module):
    """Projections, RoPE and one of the context's two attention functions, chosen by `mode`."""

    def __init__(
        self, cfg: ModelConfig, lighthouse: LighthouseConfig | None, mode: AttentionMode
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.lighthouse = lighthouse
        self.mode: AttentionMode = mode
        self.context = SINGLE_DEVICE
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def use_context(self, context) -> None:
        """Run attention through `context` (lh_cp.parallel.attach_context_parallel calls this)."""
        self.context = context

    def forward(self, x, cos, sin, documents: torch.Tensor | None = None) -> torch.Tensor:
        batch, n, _ = x.shape  # [B, n, dim]; n is the local length under CP
        q = self.wq(x).view(batch, n, self.n_heads, self.head_dim)  # [B, n, H, D]
        k = self.wk(x).view(batch, n, self.n_kv_heads, self.head_dim)  # [B, n, Hkv, D]
        v = self.wv(x).view(batch, n, self.n_kv_heads, self.head_dim)
        if self.mode == "lighthouse" and self.lighthouse.rope == "entries":
            # The layer rotates its pooled entries itself (LIGHTHOUSE.md s.14).
            out = self.context.lighthouse(q, k, v, self.lighthouse, documents, rope=(cos, sin))
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if self.mode == "lighthouse":
                out = self.context.lighthouse(q, k, v, self.lighthouse, documents)
            else:
                out = self.context.dense(q, k, v, documents)
        return self.wo(out.reshape(batch, n, self.n_heads * self.head_dim))  # [B, n, dim]


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, lighthouse: LighthouseConfig | None, mode: AttentionMode
    ) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, lighthouse, mode)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, cos, sin, documents: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, documents)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Decoder-only language model; blocks live in `self.layers` (an nn.ModuleList).

    lighthouse: the Lighthouse configuration of non-dense layers; None builds an all-dense model.
    dense_layers: indices (negatives count from the end) that use dense attention even in the
        Lighthouse stage.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        lighthouse: LighthouseConfig | None = None,
        dense_layers: tuple[int, ...] = (0, 1, -2, -1),
    ) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        dense = normalize_layer_indices(dense_layers, cfg.n_layers)
        self.lighthouse_layers = (
            frozenset() if lighthouse is None else frozenset(range(cfg.n_layers)) - dense
        )
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, lighthouse, "lighthouse" if i in self.lighthouse_layers else "dense")
            for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std, out_std = self.cfg.init_std, self.cfg.init_std / (2 * self.cfg.n_layers) ** 0.5
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        for layer in self.layers:
            for linear in (
                layer.attention.wq,
                layer.attention.wk,
                layer.attention.wv,
                layer.feed_forward.w1,
                layer.feed_forward.w3,
            ):
                nn.init.normal_(linear.weight, std=std)
            # Residual-branch outputs are scaled down so the stream's variance does not grow with depth.
            nn.init.normal_(layer.attention.wo.weight, std=out_std)
            nn.init.normal_(layer.feed_forward.w2.weight, std=out_std)
        if self.output is not None:
            nn.init.normal_(self.output.weight, std=std)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def set_attention(self, mode: AttentionMode) -> None:
        """'dense' switches every layer to dense attention (recovery stage); 'lighthouse'
        restores the Lighthouse layers. Only the attention function changes, never a weight."""
        if mode not in ("lighthouse", "dense"):
            raise ValueError(f"attention mode must be 'lighthouse' or 'dense', got {mode!r}")
        for i, layer in enumerate(self.layers):
            layer.attention.mode = (
                "lighthouse" if mode == "lighthouse" and i in self.lighthouse_layers else "dense"
            )

    def attention_modes(self) -> list[AttentionMode]:
        return [layer.attention.mode for layer in self.layers]

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        targets: torch.Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        predict: bool = False,
        documents: torch.Tensor | None = None,
    ):
        """tokens [B, n] int64 at positions [n] or [B, n] int64 (the rank's shard under CP).

        documents: None (each window one causal sequence) or the batch's int32 cumulative
        document lengths (lh_cp/ops/documents.py; global under CP), handed to every layer.

        With targets [B, n]: (sum of the token cross-entropies, number of targets !=
        ignore_index), both scalars, so the caller can form the mean over every real token of
        the global batch. With predict=True: the argmax next token, int64 [B, n], formed chunk
        by chunk. Otherwise: logits [B, n, vocab].
        """
        h = self.tok_embeddings(tokens)  # [B, n, dim]
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, documents)
        h = self.norm(h)
        if predict:
            return chunked_argmax(h, self.output_weight, self.cfg.loss_chunk_tokens)
        if targets is None:
            return F.linear(h, self.output_weight)
        return cross_entropy_sum(
            h, self.output_weight, targets, self.cfg.loss_chunk_tokens, ignore_index
        )


def count_parameters(cfg: ModelConfig) -> int:
    """Parameter count of the model `cfg` describes, computed on the meta device (no memory)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return sum(p.numel() for p in model.parameters())
