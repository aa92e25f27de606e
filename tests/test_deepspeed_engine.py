"""A DeepSpeed ZeRO training step on CPU (gloo) equals the plain single-process step.

Two ranks, each holding one batch row of the same global batch of a small Lighthouse model
(one Lighthouse layer, one dense). For ZeRO stages 1, 2 and 3 the job takes two steps
(learning rate set per step, gradient clipping active) and returns the loss and every
updated weight; for stage 3 it also saves a checkpoint after step 1 and resumes it in a fresh
engine whose second step must repeat the uninterrupted one. The reference is torch AdamW with
clip_grad_norm_ on the whole batch in this process.

Tolerance: float32, max abs error <= 1e-5 on loss and weights: the runs differ only in the
order of summation (per-rank gradients averaged by a collective, ZeRO's flat buffers,
DeepSpeed's float64 gradient norm); observed errors are about 3e-7. Adam's eps is 1e-6 so
that gradients near zero, whose Adam update is sensitive to those last bits, cannot blow the
difference up; a wrong reduction, decay group (weight decay 1.0) or clip shows up at the
scale of the learning rate (1e-2).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip(
    "deepspeed", reason="needs DeepSpeed: pip install --no-build-isolation deepspeed (after torch)"
)

from dist_utils import run_distributed  # noqa: E402

from lh_cp import LighthouseConfig  # noqa: E402
from lh_cp.model.transformer import ModelConfig, Transformer  # noqa: E402

TOLERANCE = 1e-5
SEQ, ROWS = 64, 2
LRS = (1e-2, 5e-3)
GRAD_CLIP = 0.05


def optimizer(model: Transformer) -> torch.optim.Optimizer:
    """The trainer's AdamW (decay groups included) at LRS[0]."""
    from lh_cp.train.engines import build_optimizer
    from lh_cp.train.recipe import OptimConfig, Recipe

    optim = OptimConfig(
        lr=LRS[0], betas=[0.9, 0.95], eps=1e-6, weight_decay=1.0, grad_clip=GRAD_CLIP
    )
    return build_optimizer(model, Recipe(optim=optim))


def small_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=258, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    return Transformer(
        cfg, LighthouseConfig(pool=2, levels=3, topk=8, tile_budget=2), dense_layers=(0,)
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 258, (ROWS, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def reference() -> dict:
    """Two plain steps on the whole batch: losses and weights after each."""
    model = small_model()
    adamw = optimizer(model)
    tokens, targets = batch()
    positions = torch.arange(SEQ)
    out = {"loss": [], "norm": [], "weights": []}
    for lr in LRS:
        for group in adamw.param_groups:
            group["lr"] = lr
        loss_sum, count = model(tokens, positions, targets)
        loss = loss_sum / count
        adamw.zero_grad()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        adamw.step()
        out["loss"].append(loss.item())
        out["norm"].append(norm.item())
        out["weights"].append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


def _step(engine, lr: float, rank: int, world: int) -> tuple[float, float]:
    """One step on this rank's batch row; returns (global mean loss, gradient norm before clipping)."""
    from lh_cp.parallel.deepspeed import set_learning_rate

    tokens, targets = batch()
    set_learning_rate(engine, lr)
    loss_sum, count = engine(tokens[rank : rank + 1], torch.arange(SEQ), targets[rank : rank + 1])
    global_count = count.detach().to(torch.float64)
    dist.all_reduce(global_count)
    # DeepSpeed averages gradients over the ranks, so W * local sum / global count gives the
    # gradient of the global token mean.
    loss = loss_sum * (world / global_count).to(loss_sum.dtype)
    engine.backward(loss)
    engine.step()
    logged = loss.detach().clone()
    dist.all_reduce(logged)
    return logged.item() / world, float(engine.get_global_grad_norm())


def _weights(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    # Under ZeRO-3 each rank holds a shard; gathering is a no-op for stages 1 and 2.
    with deepspeed.zero.GatheredParameters(params):
        return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def zero_job(rank: int, world: int, checkpoint_root: str) -> dict:
    import deepspeed

    from lh_cp.parallel.deepspeed import build_deepspeed_engine
    from lh_cp.train.checkpoint import (
        latest_checkpoint,
        load_deepspeed_checkpoint,
        save_deepspeed_checkpoint,
    )

    # DeepSpeed's ZeRO-3 helpers read the launcher's environment even with a group in place.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.init_distributed(dist_backend="gloo")
    results = {}
    world_group = dist.group.WORLD
    for stage in (1, 2, 3):
        model = small_model()
        engine = build_deepspeed_engine(
            model, optimizer(model), zero_stage=stage, grad_clip=GRAD_CLIP
        )
        losses, norms, weights = [], [], []
        for i, lr in enumerate(LRS):
            loss, norm = _step(engine, lr, rank, world)
            losses.append(loss)
            norms.append(norm)
            weights.append(_weights(engine))
            if stage == 3 and i == 0:
                saved = save_deepspeed_checkpoint(
                    engine, checkpoint_root, 1, {"position": torch.tensor(7)}, world_group
                )
        results[stage] = {"loss": losses, "norm": norms, "weights": weights}
    # Resume: a fresh engine (fresh model) loads step 1 and repeats step 2.
    model = small_model()
    fresh = build_deepspeed_engine(model, optimizer(model), zero_stage=3, grad_clip=GRAD_CLIP)
    step, data = load_deepspeed_checkpoint(fresh, latest_checkpoint(Path(checkpoint_root))[1])
    resumed_loss, _ = _step(fresh, LRS[1], rank, world)
    results["resume"] = {
        "step": step,
        "data": data,
        "path": str(saved),
        "loss": resumed_loss,
        "weights": _weights(fresh),
    }
    return results


def _max_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.timeout(240)
def test_deepspeed_zero_step_equals_plain_step(tmp_path):
    ref = reference()
    results = run_distributed(zero_job, 2, str(tmp_path), timeout=200)
    for rank, result in enumerate(results):
        for stage in (1, 2, 3):
            got = result[stage]
            for i in range(len(LRS)):
                assert abs(got["loss"][i] - ref["loss"][i]) <= TOLERANCE, (
                    rank,
                    stage,
                    i,
                    got["loss"][i],
                    ref["loss"][i],
                )
                # The norm the trainer logs: before clipping, over the whole model.
                assert abs(got["norm"][i] - ref["norm"][i]) <= TOLERANCE, (
                    rank,
                    stage,
                    i,
                    got["norm"][i],
                    ref["norm"][i],
                )
                error = _max_error(got["weights"][i], ref["weights"][i])
                assert error <= TOLERANCE, (
                    f"rank {rank} ZeRO-{stage} step {i + 1}: weights differ by {error}"
                )
        resume = result["resume"]
        assert resume["step"] == 1 and int(resume["data"]["position"]) == 7
        assert resume["path"] == str(tmp_path / "step_00000001")
        assert abs(resume["loss"] - ref["loss"][1]) <= TOLERANCE
        assert _max_error(resume["weights"], ref["weights"][1]) <= TOLERANCE
    # No .partial folder left, no DeepSpeed `latest` file (DeepSpeed adds its zero_to_fp32 scripts).
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["step_00000001"]
    assert not (tmp_path / "latest").exists()
    # The weights moved: the comparison is not between two unchanged models.
    initial = dict(small_model().named_parameters())
    assert _max_error({n: p.detach() for n, p in initial.items()}, ref["weights"][0]) > 1e-3
    assert min(ref["norm"]) > 10 * GRAD_CLIP  # clipping is active in both steps


def test_deepspeed_config_rejects_bad_values():
    from lh_cp.parallel.deepspeed import deepspeed_config

    config = deepspeed_config(
        zero_stage=3, grad_clip=1.0, micro_batch_size=2, grad_accum_steps=4, bf16=True
    )
    assert config["zero_optimization"] == {"stage": 3} and config["bf16"] == {"enabled": True}
    assert (
        config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 4
    )
    from lh_cp.parallel.deepspeed import build_deepspeed_engine

    model = torch.nn.Linear(2, 2)
    with pytest.raises(
        ValueError,
        match="needs an optimizer DeepSpeed supports under ZeRO: torch.optim.AdamW or "
        "torch.optim.Adam, got torch.optim.sgd.SGD",
    ):
        build_deepspeed_engine(
            model, torch.optim.SGD(model.parameters(), lr=0.1), zero_stage=1, grad_clip=1.0
        )
    with pytest.raises(ValueError, match="zero_stage must be one of"):
        deepspeed_config(zero_stage=4, grad_clip=1.0)
    with pytest.raises(ValueError, match="grad_clip must be >= 0"):
        deepspeed_config(zero_stage=1, grad_clip=-1.0)
    with pytest.raises(ValueError, match="grad_accum_steps must be an int >= 1"):
        deepspeed_config(zero_stage=1, grad_clip=1.0, grad_accum_steps=0)
