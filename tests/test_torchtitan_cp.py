"""Context parallelism under torchtitan runs lh-cp's exchange and equals one process (gloo, CPU).

Two spawned ranks build torchtitan's ParallelDims (cp=2) and apply the Lighthouse ModelSpec's
parallelize_fn (lh-cp CP group on every inner attention, torchtitan's full activation
checkpointing and FSDP2 over dp_shard x cp); inputs, labels and positions are cut by
torchtitan's own prepare_context_parallel_input (head-tail), as its Trainer does. Each rank
also runs the unsharded model on the whole batch. Asserted here: torchtitan's head-tail shard
is lh-cp's shard_sequence layout; the summed loss, the logits and every (FSDP-reduced)
gradient equal the single-process values within 1e-5 absolute in float32 (LIGHTHOUSE.md s.8:
only the summation order of merged partial softmaxes and of the gradient reduction differ).
torchtitan builds meshes for an accelerator; the workers point its device type at the CPU.
torchtitan turns off FSDP's gradient division (the loss is already a global-token mean),
which FSDP implements as a PREMUL_SUM reduce-scatter that gloo lacks; the workers ask FSDP
for a plain SUM instead (set_force_sum_reduction_for_comms), the same arithmetic.
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip(
    "torchtitan", reason="torchtitan is not installed (pip install 'lh-cp[torchtitan]')"
)

import torch  # noqa: E402
from dist_utils import run_distributed  # noqa: E402

TOLERANCE = 1e-5


def _cp_worker(rank: int, world: int, dump_folder: str) -> dict:
    import torch.nn.functional as F
    import torchtitan.distributed.parallel_dims as parallel_dims_module
    from torch.distributed.fsdp import FSDPModule
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.activation_checkpoint import FullAC
    from torchtitan.distributed.context_parallel import prepare_context_parallel_input
    from torchtitan_utils import batch, build_torchtitan_model, grads_by_state_dict_key

    from lh_cp.parallel import shard_sequence
    from lh_cp.torchtitan.config_registry import lighthouse_debugmodel
    from lh_cp.torchtitan.inner_attention import LighthouseInnerAttention

    parallel_dims_module.device_type = "cpu"
    config = lighthouse_debugmodel()
    config = dataclasses.replace(
        config,
        parallelism=dataclasses.replace(config.parallelism, context_parallel_degree=world),
        training=dataclasses.replace(config.training, mixed_precision_param="float32"),
    )
    model = build_torchtitan_model(config)
    tokens, labels, positions = batch(config)
    n_targets = labels.numel()

    reference = build_torchtitan_model(config)
    ref_logits = reference(tokens, positions=positions)
    ref_loss = (
        F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), reduction="sum") / n_targets
    )
    ref_loss.backward()
    ref_grads = grads_by_state_dict_key(reference)

    dims = ParallelDims(
        dp_replicate=1,
        dp_shard=1,
        cp=world,
        tp=1,
        pp=1,
        ep=1,
        world_size=world,
        spmd_backend=config.parallelism.spmd_backend,
    )
    dims.build_mesh()
    config.model_spec.parallelize_fn(
        model,
        parallel_dims=dims,
        training=config.training,
        parallelism=config.parallelism,
        compile_config=config.compile,
        ac_config=FullAC.Config(),
        dump_folder=dump_folder,
    )
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)
    group = dims.get_mesh("cp").get_group()
    tokens_loc, labels_loc, extra = prepare_context_parallel_input(
        tokens,
        labels,
        {"positions": positions},
        dims.get_mesh("cp"),
        torch.device("cpu"),
        "headtail",
    )
    layout_ok = torch.equal(tokens_loc, shard_sequence(tokens, group)) and torch.equal(
        extra["positions"], shard_sequence(positions, group)
    )
    groups_ok = all(
        m.context.group is group for m in model.modules() if isinstance(m, LighthouseInnerAttention)
    )
    logits = model(tokens_loc, positions=extra["positions"])
    loss = F.cross_entropy(logits.flatten(0, 1), labels_loc.flatten(), reduction="sum") / n_targets
    loss.backward()
    total_loss = loss.detach().clone()
    torch.distributed.all_reduce(total_loss, group=group)
    grads = {
        name.replace("_checkpoint_wrapped_module.", ""): p.grad.full_tensor()
        for name, p in model.named_parameters()
    }
    shadow = build_torchtitan_model(config)
    for param_name, param in shadow.named_parameters():
        param.grad = grads[param_name]
    cp_grads = grads_by_state_dict_key(shadow)
    return {
        "layout_ok": layout_ok,
        "groups_ok": groups_ok,
        "loss_error": abs(total_loss.item() - ref_loss.item()),
        "logits_error": (logits.detach() - shard_sequence(ref_logits.detach(), group))
        .abs()
        .max()
        .item(),
        "grad_error": max((cp_grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads),
        "grad_keys_match": cp_grads.keys() == ref_grads.keys(),
    }


def test_cp2_with_torchtitan_parallelize_equals_single_process(tmp_path):
    for result in run_distributed(_cp_worker, 2, str(tmp_path), timeout=300):
        assert result["layout_ok"], (
            "torchtitan's head-tail shard differs from lh-cp's shard_sequence"
        )
        assert result["groups_ok"], "an inner attention did not receive the CP group"
        assert result["grad_keys_match"]
        assert result["loss_error"] <= TOLERANCE, result
        assert result["logits_error"] <= TOLERANCE, result
        assert result["grad_error"] <= TOLERANCE, result


def test_parallelize_rejects_what_it_does_not_run():
    from torchtitan.distributed import ParallelDims

    from lh_cp.torchtitan.config_registry import lighthouse_debugmodel
    from lh_cp.torchtitan.parallelize import check_parallelism

    parallelism = lighthouse_debugmodel().parallelism
    tp = ParallelDims(
        dp_replicate=1,
        dp_shard=1,
        cp=1,
        tp=2,
        pp=1,
        ep=1,
        world_size=2,
        spmd_backend="partial_dtensor",
    )
    with pytest.raises(ValueError, match="tensor_parallel_degree=2 is not supported"):
        check_parallelism(tp, parallelism)
    cp = ParallelDims(
        dp_replicate=1,
        dp_shard=1,
        cp=2,
        tp=1,
        pp=1,
        ep=1,
        world_size=2,
        spmd_backend="partial_dtensor",
    )
    with pytest.raises(ValueError, match="must be 'headtail', got 'ptrr'"):
        check_parallelism(
            cp, dataclasses.replace(parallelism, context_parallel_load_balancer="ptrr")
        )
