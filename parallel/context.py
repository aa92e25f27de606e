"""ContextParallel: how a model's sequences are split over a CP group and how its attention
layers exchange across it; built once per run and handed to every attention module.

Two layouts (LIGHTHOUSE.md s.8):
- head-tail (exchanges "allgather" and "ring"): the sequence is cut into 2W chunks, rank r
  holds chunks r and 2W-1-r (load balance of causal work); Lighthouse layers exchange the
  compressed K/V, dense layers the K/V blocks (lh_cp.parallel.headtail);
- contiguous (the Ulysses exchanges): rank r holds tokens [r*C, (r+1)*C); "ulysses" runs
  DeepSpeed's DistributedAttention around the attention, "ulysses_compressed" all-to-alls
  only the compressed entries (lh_cp.parallel.ulysses).
A run's Lighthouse and dense layers must share the layout (the tokens a rank holds do not
change between layers). `exchange_problems` is the one place these rules live; the recipe's
[parallel] section and the constructor both use it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lh_cp.ops.attention import opaque_to_compile
from lh_cp.ops.config import LighthouseConfig
from lh_cp.ops.documents import check_documents
from lh_cp.ops.rope import RopeTables, check_rope
from lh_cp.parallel.agreement import agree_on_call, attention_call
from lh_cp.parallel.headtail.attention import causal_attention_cp, lighthouse_attention_cp
from lh_cp.parallel.headtail.lighthouse_documents import lighthouse_documents_cp
from lh_cp.parallel.headtail.sharding import shard_positions, shard_sequence, unshard_sequence
from lh_cp.parallel.ulysses.compressed import compressed_ulysses_attention
from lh_cp.parallel.ulysses.compressed_documents import compressed_ulysses_documents
from lh_cp.parallel.ulysses.plain import ulysses_attention
from lh_cp.parallel.ulysses.sharding import ulysses_positions, ulysses_shard, ulysses_unshard

HEADTAIL_EXCHANGES = ("allgather", "ring")
ULYSSES_EXCHANGES = ("ulysses", "ulysses_compressed")
LIGHTHOUSE_EXCHANGES = (*HEADTAIL_EXCHANGES, *ULYSSES_EXCHANGES)
DENSE_EXCHANGES = (*HEADTAIL_EXCHANGES, "ulysses")
# Lighthouse exchanges that keep packed documents apart (LIGHTHOUSE.md s.12): all of them today,
# listed by name so that a new exchange is refused documents until it is added here on purpose.
# Dense exchanges all keep them apart.
DOCUMENT_LIGHTHOUSE_EXCHANGES = ("allgather", "ring", "ulysses", "ulysses_compressed")


def document_exchange_problems(exchange: str, prefix: str = "") -> list[str]:
    """The rule of Lighthouse layers with packed documents under CP: the exchanges of
    DOCUMENT_LIGHTHOUSE_EXCHANGES keep documents apart; the others are refused, never run
    across documents. The one place this rule lives (ContextParallel and the recipe check)."""
    if exchange in DOCUMENT_LIGHTHOUSE_EXCHANGES:
        return []
    return [
        f"{prefix}exchange={exchange!r} does not take packed documents in Lighthouse layers yet: "
        f"use one of {DOCUMENT_LIGHTHOUSE_EXCHANGES} (docs/document_masking.md)"
    ]


# Lighthouse exchanges whose ranks each hold whole sequences (for a group of heads) and run the
# one-device layer: the only ones that can score with the "dilated" and "gla" scorers.
WHOLE_SEQUENCE_EXCHANGES = ("ulysses",)


def scorer_exchange_problems(
    scorer: str, exchange: str, scorer_prefix: str = "", exchange_prefix: str = ""
) -> list[str]:
    """The rule of the selection scorers under CP (LIGHTHOUSE.md s.13): "dilated" and "gla"
    score a token from every earlier token of its strided sub-sequence, while the head-tail
    exchanges and compressed Ulysses select inside each rank's own shard; so they run under
    WHOLE_SEQUENCE_EXCHANGES only. The one place this rule lives (ContextParallel and the
    recipe check)."""
    if scorer == "norm" or exchange in WHOLE_SEQUENCE_EXCHANGES:
        return []
    return [
        f"{scorer_prefix}scorer={scorer!r} cannot run with {exchange_prefix}exchange={exchange!r}: it scores a "
        f"token from the whole prefix of its strided sub-sequence, but {exchange!r} selects inside each rank's "
        f"own shard of the sequence; use scorer='norm', or exchange 'ulysses' (each rank the whole sequence "
        f"for a group of heads)"
    ]


def exchange_problems(exchange: str, dense_exchange: str, prefix: str = "") -> list[str]:
    """Every rule the pair (exchange of Lighthouse layers, exchange of dense layers) breaks;
    `prefix` ('parallel.' in recipes) is put before the option names in the messages."""
    problems = []
    if exchange not in LIGHTHOUSE_EXCHANGES:
        problems.append(f"{prefix}exchange must be one of {LIGHTHOUSE_EXCHANGES}, got {exchange!r}")
    if dense_exchange not in DENSE_EXCHANGES:
        problems.append(
            f"{prefix}dense_exchange must be one of {DENSE_EXCHANGES}, got {dense_exchange!r}"
        )
    if not problems and (exchange in ULYSSES_EXCHANGES) != (dense_exchange == "ulysses"):
        problems.append(
            f"{prefix}exchange={exchange!r} and {prefix}dense_exchange={dense_exchange!r} split the sequence "
            f"differently (Ulysses exchanges: contiguous shards; allgather and ring: head-tail chunks); "
            f"with exchange 'ulysses' or 'ulysses_compressed' use dense_exchange='ulysses', with 'allgather' "
            f"or 'ring' use dense_exchange 'ring' or 'allgather'"
        )
    return problems


class ContextParallel:
    """A CP group, its layout and the exchanges of the two kinds of attention layer.

    group: the ProcessGroup of the CP ranks (the mesh's "cp" axis); exchange: of Lighthouse
    layers, one of LIGHTHOUSE_EXCHANGES; dense_exchange: of dense layers and the recovery
    stage, one of DENSE_EXCHANGES, in the same layout. Checked once, here.

    shard / unshard / positions cut a full [.., N, ..] tensor into this rank's shard, gather it
    back, and give the global positions of the shard's tokens (for RoPE); lighthouse / dense
    take the rank's shard of q [B, n, H, D], k/v [B, n, Hkv, D] and return that shard of the
    single-device result (the methods lh_cp.ops.attention.SingleDevice has for one device).
    Their `documents` are the global boundaries of the whole batch (lh_cp/ops/documents.py),
    the same tensor on every rank: checked, and compared across ranks, at every call.
    """

    def __init__(
        self, group: dist.ProcessGroup, exchange: str = "allgather", dense_exchange: str = "ring"
    ) -> None:
        problems = exchange_problems(exchange, dense_exchange)
        if problems:
            raise ValueError("; ".join(problems))
        self.group, self.exchange, self.dense_exchange = group, exchange, dense_exchange
        self.contiguous = exchange in ULYSSES_EXCHANGES

    @classmethod
    def for_lighthouse(cls, group: dist.ProcessGroup, exchange: str) -> ContextParallel:
        """The object of a call that names only the Lighthouse exchange (the public cp= function)."""
        return cls(group, exchange, "ulysses" if exchange in ULYSSES_EXCHANGES else "ring")

    @classmethod
    def for_dense(cls, group: dist.ProcessGroup, exchange: str) -> ContextParallel:
        """The object of a call that names only the dense exchange."""
        return cls(group, "ulysses" if exchange == "ulysses" else "allgather", exchange)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of the full tensor x along `dim` (no communication)."""
        if self.contiguous:
            return ulysses_shard(x, self.group, dim)
        return shard_sequence(x, self.group, dim)

    def unshard(self, x_loc: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The full tensor from every rank's shard along `dim` (all-gather; differentiable in
        the head-tail layout)."""
        if self.contiguous:
            return ulysses_unshard(x_loc, self.group, dim)
        return unshard_sequence(x_loc, self.group, dim)

    def positions(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Global positions (int64 [n / W]) of this rank's tokens of an n-token sequence."""
        if self.contiguous:
            return ulysses_positions(n, self.group, device)
        return shard_positions(n, self.group, device)

    def _agree(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cfg: LighthouseConfig | None,
        documents: torch.Tensor | None = None,
    ) -> None:
        """Before the first collective of every call: every rank compares the call (every
        field of cfg, shapes, dtype, exchange, the documents' contents, checked first against
        the whole batch) and, for Lighthouse, that q, k and v are finite; a difference, invalid
        documents or a NaN on any rank makes every rank raise (lh_cp.parallel.agreement), not a
        hang. One all-gather of four words per call."""
        if self.world == 1:
            if documents is not None:
                check_documents(documents, q.shape[0], q.shape[1], q.device)
            return
        exchange = self.exchange if cfg is not None else self.dense_exchange
        agree_on_call(attention_call(q, k, v, cfg, exchange, documents, self.world), self.group)

    # Both are opaque to torch.compile: collectives, autograd Functions around them and the
    # data-dependent selection; a compiled block breaks once, here (lh_cp.ops.attention.SingleDevice).
    @opaque_to_compile
    def lighthouse(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cfg: LighthouseConfig,
        documents: torch.Tensor | None = None,
        rope: RopeTables | None = None,
    ) -> torch.Tensor:
        """`rope` (cfg.rope = "entries"): the (cos, sin) tables of this rank's shard, [n, D/2]
        or [B, n, D/2] in its token order (LIGHTHOUSE.md s.14)."""
        problems = scorer_exchange_problems(cfg.scorer, self.exchange)
        if problems:  # every rank holds the same cfg: every rank raises, before any collective
            raise ValueError(problems[0])
        self._agree(q, k, v, cfg, documents)
        rope = check_rope(rope, cfg, q)  # after the agreement: every rank has the same cfg
        if documents is not None:
            problems = document_exchange_problems(self.exchange)
            if problems:
                raise ValueError(problems[0])
            if self.exchange != "ulysses":  # plain Ulysses hands them to each head group's layer
                bounds = check_documents(documents, q.shape[0], q.shape[1] * self.world, q.device)
                if self.exchange == "ulysses_compressed":
                    return compressed_ulysses_documents(q, k, v, cfg, bounds, self.group, rope)
                return lighthouse_documents_cp(
                    q, k, v, cfg, bounds, self.group, self.exchange, rope
                )
        if self.exchange == "ulysses":
            return ulysses_attention(q, k, v, cfg, self.group, documents, rope)
        if self.exchange == "ulysses_compressed":
            return compressed_ulysses_attention(q, k, v, cfg, self.group, rope)
        return lighthouse_attention_cp(q, k, v, cfg, self.group, self.exchange, rope)

    @opaque_to_compile
    def dense(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self._agree(q, k, v, None, documents)
        if self.dense_exchange == "ulysses":
            return ulysses_attention(q, k, v, None, self.group, documents)
        return causal_attention_cp(q, k, v, self.group, self.dense_exchange, documents)

    def __repr__(self) -> str:
        return (
            f"ContextParallel(world={self.world}, exchange={self.exchange!r}, "
            f"dense_exchange={self.dense_exchange!r})"
        )


def attach_context_parallel(model: torch.nn.Module, context) -> int:
    """Hand `context` (a ContextParallel, or lh_cp.ops.attention.SINGLE_DEVICE) to every module of
    `model` that takes one (a `use_context` method: lh_cp's Attention, the torchtitan inner
    attention); returns how many took it. A CP context reaching no module is an error."""
    takers = [m for m in model.modules() if callable(getattr(m, "use_context", None))]
    if isinstance(context, ContextParallel) and not takers:
        raise ValueError(
            f"{type(model).__name__} has no attention module with a use_context method to run "
            f"context parallelism"
        )
    for module in takers:
        module.use_context(context)
    return len(takers)
