"""Eight ranks on CPU: the layouts the project is built for (8+ GPUs), on gloo.

One spawned job of 8 ranks (process start-up dominates, so everything shares it):
- CP at W = 8 (16 head-tail chunks, 8 ring hops): Lighthouse with both selections and dense
  attention, through both exchanges, float64, q, k, v gradients included, against the
  single-process result (tolerance 1e-9: only the summation order differs, as in
  tests/test_cp_attention.py);
- two training steps of the quickstart model (recipes/quickstart.toml, at topk 64 so that every
  one of the 8 head-tail chunks of a 1,024-token window holds a whole tile, as CP = 4 needs) on
  the meshes dp_shard 2 x cp 4 and dp_replicate 2 x cp 4, FSDP2 and AdamW as the trainer runs
  them, against the same two steps in one process over the same global batch. Tolerances as
  tests/test_quickstart.py argues: the first loss is the same batch through the same weights
  (float32 summation order: 1e-5 relative), the second follows one AdamW update of gradients
  that differ at that level (1e-3 relative); the gradient norms likewise.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from lh_cp import LighthouseConfig, causal_attention, lighthouse_attention
from lh_cp.parallel import shard_sequence

ROOT = Path(__file__).resolve().parents[1]
WORLD = 8
MESHES = {"dp_shard 2 x cp 4": (1, 2, 4), "dp_replicate 2 x cp 4": (2, 1, 4)}
QUICKSTART = ["lighthouse.topk=64", "data.batch_size=1", "optim.lr=3e-3", "run.device='cpu'"]
STEPS = 2


def _max_errors(fn, n: int, exchange: str, group) -> float:
    """Worst absolute difference of out, dq, dk, dv between the CP call and one process."""
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, n, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    dout = torch.randn(1, n, 4, 8, generator=gen, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*ref, None, exchange)
    (out * dout).sum().backward()
    mine = [shard_sequence(t, group).requires_grad_() for t in (q, k, v)]
    out_cp = fn(*mine, group, exchange)
    (out_cp * shard_sequence(dout, group)).sum().backward()
    pairs = [(out_cp, out)] + [(a.grad, b.grad) for a, b in zip(mine, ref)]
    return max((a - shard_sequence(b, group)).abs().max().item() for a, b in pairs)


def attention_at_8(group) -> dict[str, float]:
    # Chunks of 16 tokens (N = 2 * 8 * 16): tile 8, two tiles per chunk, c_L = 4; the causal
    # selection gets chunks of 32 (tile 16: the thresholds carried across chunks decide).
    tile_topk = LighthouseConfig(pool=2, levels=3, topk=64, tile_budget=2)
    causal = LighthouseConfig(pool=2, levels=3, topk=64, tile_budget=2, selection="causal")
    cases = {
        "lighthouse tile_topk": (
            lambda q, k, v, cp, ex: lighthouse_attention(q, k, v, tile_topk, cp, ex),
            256,
        ),
        "lighthouse causal": (
            lambda q, k, v, cp, ex: lighthouse_attention(q, k, v, causal, cp, ex),
            512,
        ),
        "dense": (lambda q, k, v, cp, ex: causal_attention(q, k, v, cp, ex), 256),
    }
    return {
        f"{name}, {exchange}": _max_errors(fn, n, exchange, group)
        for name, (fn, n) in cases.items()
        for exchange in ("allgather", "ring")
    }


def quickstart_recipe(overrides: list[str]):
    from lh_cp.train.recipe import load_recipe

    return load_recipe(ROOT / "recipes" / "quickstart.toml", QUICKSTART + overrides)


def token_stream(vocab: int) -> np.ndarray:
    """A fixed random token stream (the steps compare ranks with one process, not learning)."""
    return np.random.default_rng(0).integers(0, vocab - 2, size=40_000).astype(np.uint16)


def training_steps(recipe) -> list[tuple[float, float]]:
    """(global mean loss, gradient norm) of the first STEPS steps of `recipe` on the current
    process group, through the trainer's own pieces (mesh, runtime, engine, loss)."""
    from lh_cp.data.loader import BatchLoader
    from lh_cp.model.transformer import Transformer
    from lh_cp.parallel import build_mesh
    from lh_cp.train.engines import build_engine
    from lh_cp.train.runtime import runtime_on_mesh
    from lh_cp.train.schedule import lr_at
    from lh_cp.train.steps import training_loss

    par = recipe.parallel
    mesh = build_mesh("cpu", dp_replicate=par.dp_replicate, dp_shard=par.dp_shard, cp=par.cp)
    rt = runtime_on_mesh(mesh, par, torch.device("cpu"))
    torch.manual_seed(recipe.run.seed)
    model = Transformer(
        recipe.model, recipe.lighthouse.config(), tuple(recipe.lighthouse.dense_layers)
    )
    engine = build_engine(model, recipe, rt)
    data = recipe.data
    loader = BatchLoader(
        token_stream(recipe.model.vocab_size),
        data.seq_len,
        data.batch_size,
        rt.dp_rank,
        rt.dp_size,
        data.seed,
        shuffle=True,
    )
    results = []
    for step in range(1, STEPS + 1):
        loss, mean = training_loss(engine.model, rt, loader.next_batch(), data.positions)
        lr = lr_at(step, recipe.total_steps, recipe.optim, recipe.schedule)
        results.append((float(mean), engine.step(loss, lr)))
    return results


def scale_job(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    results = {"attention": attention_at_8(dist.group.WORLD)}
    for name, (replicate, shard, cp) in MESHES.items():
        recipe = quickstart_recipe(
            [
                f"parallel.dp_replicate={replicate}",
                f"parallel.dp_shard={shard}",
                f"parallel.cp={cp}",
            ]
        )
        results[name] = training_steps(recipe)
    return results


@pytest.mark.timeout(600)
def test_cp_at_8_and_8_rank_meshes_equal_one_process(one_thread):
    results = run_distributed(scale_job, WORLD, timeout=540)
    for rank, result in enumerate(results):
        for case, error in result["attention"].items():
            assert error < 1e-9, (rank, case, error)
    # One process, the same two global batches (2 sequences: data.batch_size 2, no DP).
    dist.init_process_group(
        "gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=datetime.timedelta(seconds=60)
    )
    try:
        reference = training_steps(quickstart_recipe(["parallel.cp=1", "data.batch_size=2"]))
    finally:
        dist.destroy_process_group()
    for name in MESHES:
        for rank, result in enumerate(results):
            (loss1, norm1), (loss2, norm2) = result[name]
            assert loss1 == pytest.approx(reference[0][0], rel=1e-5), (name, rank)
            assert norm1 == pytest.approx(reference[0][1], rel=1e-5), (name, rank)
            assert loss2 == pytest.approx(reference[1][0], rel=1e-3), (name, rank)
            assert norm2 == pytest.approx(reference[1][1], rel=1e-3), (name, rank)
