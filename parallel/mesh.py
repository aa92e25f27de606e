"""The DeviceMesh of a run: named axes dp_replicate x dp_shard x cp, plus flattened views.

Flattened axes (as torchtitan names them):
- "dp_shard_cp": FSDP shards weights over dp_shard x cp, because CP ranks hold the same
  weights and their gradients must be summed anyway;
- "dp": ranks that read different batch rows (dp_replicate x dp_shard);
- "dp_cp": every rank holding different tokens of the global batch (the loss normaliser).
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_AXES = ("dp_replicate", "dp_shard", "cp")
GROUP_AXES = (*MESH_AXES, "dp_shard_cp", "dp", "dp_cp")  # every axis build_mesh makes a group for


def check_mesh_shape(
    world_size: int, dp_replicate: int = 1, dp_shard: int = 1, cp: int = 1
) -> None:
    """Raise ValueError unless every degree is a positive int and their product is world_size.

    Needs no process group, so recipes can be checked before any process starts.
    """
    for name, value in (("dp_replicate", dp_replicate), ("dp_shard", dp_shard), ("cp", cp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"parallel degree {name} must be an int >= 1, got {name}={value!r}")
    product = dp_replicate * dp_shard * cp
    if product != world_size:
        raise ValueError(
            f"dp_replicate * dp_shard * cp = {dp_replicate} * {dp_shard} * {cp} = {product} must equal "
            f"the world size {world_size} (number of processes)"
        )


def build_mesh(
    device_type: str, dp_replicate: int = 1, dp_shard: int = 1, cp: int = 1
) -> DeviceMesh:
    """3-D mesh (dp_replicate, dp_shard, cp) over the initialised default process group.

    Ranks are laid out cp-fastest, so a CP group is made of neighbouring ranks (one node, the
    fastest links, when cp <= GPUs per node).
    """
    if not dist.is_initialized():
        raise ValueError(
            "build_mesh needs an initialised default process group (torch.distributed.init_process_group)"
        )
    check_mesh_shape(dist.get_world_size(), dp_replicate, dp_shard, cp)
    mesh = init_device_mesh(device_type, (dp_replicate, dp_shard, cp), mesh_dim_names=MESH_AXES)
    mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    mesh["dp_replicate", "dp_shard"]._flatten("dp")
    mesh["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    return mesh
