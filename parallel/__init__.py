"""lh_cp.parallel: everything that talks to other ranks (context parallelism, FSDP2, launch).

Context parallelism (CP) of a causal sequence over the W ranks of a ProcessGroup:
shard_sequence / unshard_sequence / shard_positions give each rank its head-tail shard and
the global positions of its tokens; lh_cp.lighthouse_attention(..., cp=group) and
lh_cp.causal_attention(..., cp=group) then compute that shard of the single-device result.
The Ulysses exchanges (exchange="ulysses" or "ulysses_compressed") use contiguous shards
instead: lh_cp.parallel.ulysses_sharding (ulysses_shard, ulysses_positions, ulysses_unshard).
Engines: parallelize (FSDP2) or, wrap-free, checkpoint_and_compile plus lh_cp.parallel.deepspeed.
"""

from lh_cp.parallel.comm import CommBytes, dense_cp_bytes, lighthouse_cp_bytes
from lh_cp.parallel.cp_attention import causal_attention_cp, chunk_config, lighthouse_attention_cp
from lh_cp.parallel.exchange import EXCHANGES
from lh_cp.parallel.fsdp import checkpoint_and_compile, parallelize
from lh_cp.parallel.loss import global_token_mean_loss
from lh_cp.parallel.mesh import MESH_AXES, build_mesh, check_mesh_shape
from lh_cp.parallel.sharding import head_tail_positions, shard_positions, shard_sequence, unshard_sequence
from lh_cp.parallel.transport import SentBytes

__all__ = [
    "EXCHANGES",
    "MESH_AXES",
    "CommBytes",
    "SentBytes",
    "build_mesh",
    "causal_attention_cp",
    "checkpoint_and_compile",
    "check_mesh_shape",
    "chunk_config",
    "dense_cp_bytes",
    "global_token_mean_loss",
    "head_tail_positions",
    "lighthouse_attention_cp",
    "lighthouse_cp_bytes",
    "parallelize",
    "shard_positions",
    "shard_sequence",
    "unshard_sequence",
]
