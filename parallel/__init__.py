"""lh_cp.parallel: everything that talks to other ranks (context parallelism, FSDP2, DeepSpeed).

Context parallelism (CP) of a causal sequence over the W ranks of a ProcessGroup: a
ContextParallel (context.py) holds the group, the layout and the exchanges, is built once
per run and handed to every attention module (attach_context_parallel; parallelize does it);
its shard / unshard / positions cut sequences into rank shards and its lighthouse / dense
compute that shard of the single-device attention. The public lh_cp.lighthouse_attention(...,
cp=group) and lh_cp.causal_attention(..., cp=group) build one for the call.

- headtail/: the head-tail layout (rank r holds chunks r and 2W-1-r): sharding, the
  attention of a shard, the all-gather and ring exchanges, block attention with its
  log-sum-exp (reference and fused), the halo of the scatter, traffic accounting;
- ulysses/: the contiguous layout of the Ulysses exchanges: plain (DeepSpeed's
  DistributedAttention), compressed (only the compressed entries all-to-all'd), their
  collectives, sharding and traffic accounting;
- transport.py (every send, with a byte meter), mesh.py, fsdp.py (parallelize), deepspeed.py
  (the ZeRO engine), loss.py (the global token mean).
"""

from lh_cp.parallel.context import (
    DENSE_EXCHANGES,
    LIGHTHOUSE_EXCHANGES,
    ULYSSES_EXCHANGES,
    ContextParallel,
    attach_context_parallel,
    exchange_problems,
)
from lh_cp.parallel.fsdp import checkpoint_and_compile, parallelize
from lh_cp.parallel.headtail.sharding import (
    head_tail_positions,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)
from lh_cp.parallel.headtail.traffic import (
    CommBytes,
    dense_cp_bytes,
    lighthouse_cp_bytes,
    lighthouse_documents_cp_bytes,
)
from lh_cp.parallel.loss import global_token_mean, global_token_mean_loss
from lh_cp.parallel.mesh import MESH_AXES, build_mesh, check_mesh_shape
from lh_cp.parallel.transport import SentBytes

__all__ = [
    "DENSE_EXCHANGES",
    "LIGHTHOUSE_EXCHANGES",
    "MESH_AXES",
    "ULYSSES_EXCHANGES",
    "CommBytes",
    "ContextParallel",
    "SentBytes",
    "attach_context_parallel",
    "build_mesh",
    "checkpoint_and_compile",
    "check_mesh_shape",
    "dense_cp_bytes",
    "exchange_problems",
    "global_token_mean",
    "global_token_mean_loss",
    "head_tail_positions",
    "lighthouse_cp_bytes",
    "lighthouse_documents_cp_bytes",
    "parallelize",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
]
