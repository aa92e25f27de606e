"""The "dilated" and "gla" token scorers of the selection (LIGHTHOUSE.md s.13); "norm", the
default, is lh_cp.ops.kernels.scores (Triton) and scores_reference (PyTorch).

Both view q, k, v [B, N, H, D] (k, v repeated to the H query heads) as `dilation` strided
sub-sequences per head: residue r in 0..dilation-1 holds positions r, r + dilation, ... A
causal mixer runs inside each sub-sequence; a token's query score is the L2 norm of the
mixer's output at it with q as queries and k as keys, its key score the same with k as
queries and q as keys; values v in both.
- "dilated": softmax attention, scale 1/sqrt(D) (torch SDPA: FlashAttention on CUDA);
- "gla": gated linear attention with one fixed decay per step of the sub-sequence,
  o_t = (1/sqrt(D)) sum_{s <= t} gamma^(t-s) (q_t . k_s) v_s, gamma = 2^(-1/16)
  (GLA_LOG_DECAY): fla-core's chunk_simple_gla on CUDA (optional, imported only here and
  only then), the chunked PyTorch twin gla_reference elsewhere.
With packed documents the sub-sequence is cut at every document boundary (each piece its own
sequence), so no score reads another document. Scores are computed without gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.dense import dense_sdpa, document_causal

# The released gate gk = logsigmoid(wg(x)) / 16 at wg(x) = 0 (its zero bias, the centre of
# its random weights, which never train: the selection passes no gradient): -ln 2 / 16.
GLA_LOG_DECAY = -math.log(2.0) / 16
GLA_CHUNK = 64  # sub-sequence steps per chunk of the PyTorch twin
FLA_INSTALL = (
    "scorer='gla' on CUDA runs fla-core's chunk_simple_gla, which is not installed: "
    "pip install 'lh-cp[gla]' (or pip install fla-core; offline: pip install --no-deps "
    "<the fla_core wheel> einops)"
)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (the tests' twins); CUDA keeps its dtype (the fused kernels
    accumulate in float32); anything else on CPU computes in float32."""
    if x.dtype == torch.float64 or x.is_cuda:
        return x.dtype
    return torch.float32


def to_strided(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """[B, N, H, D] -> [B * dilation, N / dilation, H, D]: row b * dilation + r is residue r's
    sub-sequence (positions r, r + dilation, ...) of window b."""
    batch, n, heads, dim = x.shape
    return (
        x.reshape(batch, n // dilation, dilation, heads, dim)
        .transpose(1, 2)
        .reshape(batch * dilation, n // dilation, heads, dim)
    )


def from_strided(x: torch.Tensor, batch: int, dilation: int) -> torch.Tensor:
    """Inverse of to_strided for per-token scores: [B * dilation, N / dilation, H] -> [B, H, N]."""
    rows, m, heads = x.shape
    return (
        x.reshape(batch, dilation, m, heads).permute(0, 3, 2, 1).reshape(batch, heads, m * dilation)
    )


def strided_bounds(bounds: list[int], batch: int, n: int, dilation: int) -> list[int]:
    """Cumulative lengths, over the to_strided rows flattened, of the pieces that the documents
    `bounds` (check_documents' list over the B * N flat tokens) cut the sub-sequences into: a
    document [a, z) of window b holds positions m * dilation + r of residue r for
    ceil((a - r) / dilation) <= m < ceil((z - r) / dilation). Empty pieces are dropped."""
    m = n // dilation
    cuts = [0]
    for b in range(batch):
        docs = [
            (lo - b * n, hi - b * n)
            for lo, hi in zip(bounds[:-1], bounds[1:])
            if b * n <= lo < (b + 1) * n
        ]
        for r in range(dilation):
            base = (b * dilation + r) * m
            for _, z in docs:
                end = base + -(-(z - r) // dilation)
                if end > cuts[-1]:
                    cuts.append(end)
    return cuts


def _output_norms(out: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norms in float32 (float64 kept): [..., D] -> [...]."""
    dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    return torch.linalg.vector_norm(out.to(dtype), dim=-1)


def dilated_mix(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cuts: list[int] | None
) -> torch.Tensor:
    """Causal softmax attention inside each sub-sequence (or, with `cuts`, each piece):
    [R, M, H, D] each -> [R, M, H, D]."""
    if cuts is None:
        out = dense_sdpa(*(x.transpose(1, 2) for x in (queries, keys, values)))
        return out.transpose(1, 2)
    rows, m, heads, dim = queries.shape
    flat = [x.reshape(1, rows * m, heads, dim) for x in (queries, keys, values)]
    cu = torch.tensor(cuts, dtype=torch.int32, device=queries.device)
    return document_causal(*flat, cu, cuts).view(rows, m, heads, dim)


def gla_reference(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cuts: list[int] | None
) -> torch.Tensor:
    """The "gla" mixer in PyTorch, chunked: [R, M, H, D] each -> [R, M, H, D] in the inputs'
    dtype. Within a chunk of C steps the decayed, piece-masked score matrix; across chunks the
    state S [R, H, D, D] = sum_s gamma^(end - s) k_s v_s^T of the chunk end's piece (a piece
    boundary inside a chunk drops what came before it)."""
    rows, m, heads, dim = queries.shape
    scale = 1.0 / math.sqrt(dim)
    chunk = min(GLA_CHUNK, m)
    chunks = -(-m // chunk)
    pad = chunks * chunk - m
    # piece id of every step [R, M]: the pieces run in flat order over the rows
    flat = torch.arange(rows * m, device=queries.device)
    bounds = torch.tensor(
        cuts if cuts is not None else [i * m for i in range(rows + 1)], device=queries.device
    )
    piece = torch.searchsorted(bounds, flat, right=True).view(rows, m)
    # pad the end with steps of a piece of their own (-1): nothing before them reads them
    q, k, v = (
        F.pad(x, (0, 0, 0, 0, 0, pad)).view(rows, chunks, chunk, heads, dim)
        for x in (queries, keys, values)
    )
    piece = F.pad(piece, (0, pad), value=-1).view(rows, chunks, chunk)
    steps = torch.arange(chunk, device=queries.device, dtype=queries.dtype)
    lag = steps[:, None] - steps[None, :]  # [C, C] i - j
    decay = torch.where(lag >= 0, torch.exp(GLA_LOG_DECAY * lag.clamp(min=0)), 0.0)
    same = piece[..., :, None] == piece[..., None, :]  # [R, n, C, C]
    mask = decay * same  # [R, n, C, C]
    scores = torch.einsum("rnihd,rnjhd->rnhij", q, k) * scale * mask[:, :, None]
    out = torch.einsum("rnhij,rnjhd->rnihd", scores, v)
    # inter-chunk: query i of a chunk reads the state carried in with gamma^(i+1)
    into = torch.exp(GLA_LOG_DECAY * (steps + 1))  # [C]
    out_of = torch.exp(GLA_LOG_DECAY * (chunk - 1 - steps))  # [C]: gamma^(C-1-j) to the chunk end
    state = q.new_zeros((rows, heads, dim, dim))
    last = torch.full((rows,), -2, dtype=piece.dtype, device=piece.device)  # piece of the state
    for c in range(chunks):
        ids = piece[:, c]  # [R, C]
        reads = (ids == last[:, None]).to(q.dtype) * into  # [R, C]
        out[:, c] += (
            torch.einsum("rihd,rhde->rihe", q[:, c], state) * scale * reads[:, :, None, None]
        )
        end = ids[:, -1]
        keeps = (end == last).to(q.dtype) * math.exp(GLA_LOG_DECAY * chunk)  # [R]
        adds = (ids == end[:, None]).to(q.dtype) * out_of  # [R, C]
        state = state * keeps[:, None, None, None] + torch.einsum(
            "rjhd,rjhe,rj->rhde", k[:, c], v[:, c], adds
        )
        last = end
    return out.reshape(rows, chunks * chunk, heads, dim)[:, :m]


def _gla_fla(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cuts: list[int] | None
) -> torch.Tensor:
    """The "gla" mixer by fla-core's chunk_simple_gla, every piece one varlen sequence."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as err:
        raise ImportError(FLA_INSTALL) from err
    rows, m, heads, dim = queries.shape
    cuts = cuts if cuts is not None else [i * m for i in range(rows + 1)]
    cu = torch.tensor(cuts, dtype=torch.long, device=queries.device)
    flat = [x.reshape(1, rows * m, heads, dim) for x in (queries, keys, values)]
    gamma = torch.full((heads,), GLA_LOG_DECAY, dtype=torch.float32, device=queries.device)
    out, _ = chunk_simple_gla(
        *flat,
        g_gamma=gamma,
        scale=1.0 / math.sqrt(dim),
        cu_seqlens=cu,
        cu_seqlens_cpu=torch.tensor(cuts, dtype=torch.long),
    )
    return out.view(rows, m, heads, dim)


def gla_mix(
    queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cuts: list[int] | None
) -> torch.Tensor:
    """fla-core on CUDA (ImportError saying how to install it when missing), the PyTorch twin
    elsewhere."""
    if queries.is_cuda:
        return _gla_fla(queries, keys, values, cuts)
    return gla_reference(queries, keys, values, cuts)


@torch.no_grad()
def strided_norms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    bounds: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The norms of the mixer's outputs with q as queries and with k as queries, [B, H, N]
    each, in float32 (float64 for float64 inputs): q [B, N, H, D], k/v [B, N, Hkv, D].
    `bounds`: the documents' checked boundaries (check_documents), None for one document per
    window."""
    batch, n, heads, _ = q.shape
    cfg.tile_size(n)  # N % dilation is among the rules of N
    group = heads // k.shape[2]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    dtype = compute_dtype(q)
    qs, ks, vs = (to_strided(x.detach().to(dtype), cfg.dilation) for x in (q, k, v))  # [R, M, H, D]
    cuts = None if bounds is None else strided_bounds(bounds, batch, n, cfg.dilation)
    mix = dilated_mix if cfg.scorer == "dilated" else gla_mix
    query_norms = from_strided(_output_norms(mix(qs, ks, vs, cuts)), batch, cfg.dilation)
    key_norms = from_strided(_output_norms(mix(ks, qs, vs, cuts)), batch, cfg.dilation)
    return query_norms, key_norms


def strided_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cfg: LighthouseConfig,
    bounds: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key token scores [B, H, N] float32 of the "dilated" or "gla" scorer (the
    selection's scores, as token_scores is for "norm"); arguments as strided_norms."""
    return tuple(x.float().contiguous() for x in strided_norms(q, k, v, cfg, bounds))
