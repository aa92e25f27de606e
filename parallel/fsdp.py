"""parallelize(model, mesh, cfg, context): the run's attention context, then activation
checkpointing, compile and FSDP2, in that order. checkpoint_and_compile(model, cfg, context):
all but FSDP2, for engines that shard by themselves.

Contract on the model (any nn.Module):
- its repeated blocks live in `model.layers`, an nn.ModuleList or nn.ModuleDict; each block is
  one checkpointing, compile and FSDP unit; every other parameter (embeddings, final norm,
  output head) belongs to the root unit;
- it holds no distributed state of its own: `context` (a ContextParallel, or None for one
  device) is handed to every module with a `use_context` method (attach_context_parallel), so
  nothing here needs to know which layers are Lighthouse and which dense; a model that takes
  its CP group as a forward argument instead (the public cp= functions) works as well;
- its parameters are float32 and already on the mesh's device.

cfg is any object with bool attributes `activation_checkpoint` and `compile` (the recipe's
parallel section), and optionally `no_checkpoint_layers` (block positions exempt from
checkpointing; negatives count from the end) and `offload_activations` (bool: the
checkpointed blocks' inputs wait for backward in host memory, parallel/offload.py; the
BlockInputOffload doing it is then the model's attribute `block_input_offload`).

Weights are sharded over the flattened dp_shard x cp axis (CP ranks hold the same weights
and their gradients must be summed, so they shard them too), replicated over dp_replicate
(HSDP) when it is > 1. On CUDA parameters are cast to bfloat16 for compute
and gradients reduced in float32; elsewhere (CPU, gloo) everything stays in the parameters'
dtype. Gradients are averaged over all mesh ranks, which global_token_mean_loss accounts for.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from lh_cp.model.transformer import normalize_layer_indices
from lh_cp.parallel.context import ContextParallel, attach_context_parallel
from lh_cp.parallel.offload import BlockInputOffload


def _blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return [(str(i), block) for i, block in enumerate(layers)]
    if isinstance(layers, nn.ModuleDict):
        return list(layers.items())
    raise ValueError(
        f"parallelize needs the model's blocks in model.layers (nn.ModuleList or nn.ModuleDict), "
        f"got {type(layers).__name__} on {type(model).__name__}"
    )


def _flag(cfg, name: str, default: bool | None = None) -> bool:
    value = getattr(cfg, name, default)
    if not isinstance(value, bool):
        raise ValueError(
            f"parallelize reads cfg.{name} as a bool, got {value!r} on {type(cfg).__name__}"
        )
    return value


def _replace_block(model: nn.Module, name: str, block: nn.Module) -> None:
    model.layers.register_module(name, block)


def mixed_precision_policy(device_type: str) -> MixedPrecisionPolicy:
    """bfloat16 compute with float32 gradient reduction on CUDA; no casting elsewhere."""
    if device_type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def checkpoint_and_compile(
    model: nn.Module, cfg, *, compile_in_place: bool = False, context: ContextParallel | None = None
) -> nn.Module:
    """The context handed to the attention modules (when given), then activation checkpointing
    and/or torch.compile of each block of `model.layers`, as cfg's flags say, in place; no
    sharding. parallelize's first step, and the whole of it for an engine that shards the
    weights itself (DeepSpeed ZeRO). Returns the model.

    compile_in_place: compile each block with nn.Module.compile (the block stays the module
    holding its parameters) instead of wrapping it in torch.compile's OptimizedModule, whose
    own empty parameter dict breaks DeepSpeed ZeRO-3's parameter hooks.
    """
    checkpoint, compile_blocks = _flag(cfg, "activation_checkpoint"), _flag(cfg, "compile")
    offload = _flag(cfg, "offload_activations", default=False)
    if offload and not checkpoint:
        raise ValueError(
            "cfg.offload_activations offloads the inputs of checkpointed blocks, but "
            "cfg.activation_checkpoint is False: turn checkpointing on or offload off"
        )
    if context is not None:
        attach_context_parallel(model, context)
    blocks = _blocks(model)
    kept = normalize_layer_indices(
        getattr(cfg, "no_checkpoint_layers", ()), len(blocks), "parallel.no_checkpoint_layers"
    )
    offloader = BlockInputOffload() if offload else None
    for index, (name, block) in enumerate(blocks):
        # Compile first, then checkpoint: a block's graph breaks at attention, and dynamo does
        # not trace a checkpointed region with a break inside; compiled outside the checkpoint
        # it ran wholly eager (no fused kernel in the profile of a compiled 270M step on the
        # H200). Inside an eager checkpoint the compiled pieces are recomputed like any code.
        if compile_blocks and compile_in_place:
            block.compile()
        elif compile_blocks:
            block = torch.compile(block)
        # Non-reentrant checkpointing recomputes the block (its CP exchange included) in
        # backward; every CP rank recomputes in the same order, so collectives still match.
        # The model has no randomness (no dropout): no RNG state to preserve for recomputation.
        # With offload the checkpoint function is BlockInputOffload.checkpoint, the same
        # non-reentrant checkpoint under the hooks that move the block's input to the host;
        # the module tree, and so the checkpoint format, is the same either way.
        if checkpoint and index not in kept and offloader is not None:
            block = checkpoint_wrapper(block, checkpoint_fn=offloader.checkpoint)
        elif checkpoint and index not in kept:
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        _replace_block(model, name, block)
    if offloader is not None:
        model.block_input_offload = offloader
    return model


def parallelize(
    model: nn.Module, mesh: DeviceMesh, cfg, context: ContextParallel | None = None
) -> nn.Module:
    """Hand `context` to the attention modules, then apply activation checkpointing, optional
    torch.compile and FSDP2 to `model` in place.

    mesh: from lh_cp.parallel.build_mesh (axes dp_replicate, dp_shard, cp and the flattened
    dp_shard_cp). Returns the model (now an FSDPModule).
    """
    checkpoint_and_compile(model, cfg, context=context)
    shard_mesh = (
        mesh["dp_replicate", "dp_shard_cp"]
        if mesh["dp_replicate"].size() > 1
        else mesh["dp_shard_cp"]
    )
    policy = mixed_precision_policy(mesh.device_type)
    blocks = _blocks(model)
    for index, (_, block) in enumerate(blocks):
        # The last block's weights are needed again right away by backward: keep them gathered.
        fully_shard(
            block, mesh=shard_mesh, mp_policy=policy, reshard_after_forward=index < len(blocks) - 1
        )
    fully_shard(model, mesh=shard_mesh, mp_policy=policy)
    return model
