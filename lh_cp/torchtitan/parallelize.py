"""parallelize_fn of the Lighthouse llama3 ModelSpec: lh-cp's CP exchange, torchtitan's AC/compile/FSDP2.

torchtitan's own parallelize_llama wraps the inner attention for context parallelism with
SDPA- or FlexAttention-specific code (or all-gathers uncompressed K/V under its SPMD backends).
Here the inner attention is LighthouseInnerAttention, which runs lh-cp's exchange when given a
ContextParallel over the CP group; everything else is torchtitan's public building blocks,
applied in torchtitan's order: activation checkpointing, compile, then FSDP2 over dp_shard x cp.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torchtitan.config import TORCH_DTYPE_MAP, CompileConfig, ParallelismConfig, TrainingConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.compile import apply_compile
from torchtitan.distributed.fsdp import apply_fsdp_to_decoder

from lh_cp.parallel.context import ContextParallel
from lh_cp.torchtitan.inner_attention import LighthouseInnerAttention


def check_parallelism(parallel_dims: ParallelDims, parallelism: ParallelismConfig) -> None:
    """Raise ValueError for parallelisms this integration does not run, naming the option."""
    for name, degree in (
        ("tensor_parallel_degree", parallel_dims.tp),
        ("pipeline_parallel_degree", parallel_dims.pp),
        ("expert_parallel_degree", parallel_dims.ep),
    ):
        if degree > 1:
            raise ValueError(
                f"lh_cp.torchtitan runs FSDP2 and context parallelism only: parallelism.{name}={degree} "
                f"is not supported (set it to 1)"
            )
    if parallelism.spmd_backend != "partial_dtensor":
        raise ValueError(
            f"lh_cp.torchtitan needs parallelism.spmd_backend='partial_dtensor', got "
            f"{parallelism.spmd_backend!r}: the other backends all-gather uncompressed K/V for CP, "
            f"which Lighthouse exists to avoid"
        )
    if parallel_dims.cp_enabled and parallelism.context_parallel_load_balancer != "headtail":
        raise ValueError(
            f"lh-cp's exchange expects the head-tail shard layout: "
            f"parallelism.context_parallel_load_balancer must be 'headtail', got "
            f"{parallelism.context_parallel_load_balancer!r}"
        )


def set_context_parallel(model: nn.Module, group: dist.ProcessGroup) -> int:
    """Hand every LighthouseInnerAttention of `model` a ContextParallel over `group` with its
    configured exchanges (one object per distinct pair); returns how many modules there are."""
    modules = [m for m in model.modules() if isinstance(m, LighthouseInnerAttention)]
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no LighthouseInnerAttention module to run context parallelism"
        )
    contexts: dict[tuple[str, str], ContextParallel] = {}
    for module in modules:
        pair = (module.exchange, module.dense_exchange)
        module.use_context(contexts.setdefault(pair, ContextParallel(group, *pair)))
    return len(modules)


def parallelize_lighthouse_llama(
    model: nn.Module,
    *,
    parallel_dims: ParallelDims,
    training: TrainingConfig,
    parallelism: ParallelismConfig,
    compile_config: CompileConfig,
    ac_config,
    dump_folder: str,
) -> nn.Module:
    """Context parallelism (lh-cp exchange), activation checkpointing, compile, FSDP2; in place."""
    check_parallelism(parallel_dims, parallelism)
    if parallel_dims.cp_enabled:
        set_context_parallel(model, parallel_dims.get_mesh("cp").get_group())
    if ac_config is not None:
        ac_config.build(dump_folder=dump_folder).apply(model)
    if compile_config.enable and "model" in compile_config.components:
        apply_compile(model, compile_config=compile_config, parallel_dims=parallel_dims)
    dp_axes = ["dp_replicate", "fsdp"] if parallel_dims.dp_replicate_enabled else ["fsdp"]
    apply_fsdp_to_decoder(
        model,
        parallel_dims.get_mesh(dp_axes),
        param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
        reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
        pp_enabled=False,
        cpu_offload=training.enable_cpu_offload,
        reshard_after_forward_policy=parallelism.fsdp_reshard_after_forward,
        enable_symm_mem=parallelism.enable_fsdp_symm_mem,
    )
    return model
