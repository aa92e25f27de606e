"""parallel.offload_activations on CPU: the checkpointed blocks' inputs go through the offload
hooks (lh_cp/parallel/offload.py) and every number stays the same.

On CPU the hooks copy each block input to a separate host tensor and back, synchronously (no
stream): the same bookkeeping as on a GPU (which input is packed, the chain that prefetches
the next block's input in backward, release of the host copies), without pinned memory. The
copies are exact and the recomputation runs the same kernels on the same values in the same
order, so losses and gradients are compared bit for bit (torch.equal), one process and CP = 2
on gloo alike. The stream and overlap path needs CUDA: tests/test_offload_gpu.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from train_utils import logged_losses, tiny_recipe, write_corpus

from lh_cp.model.transformer import Transformer
from lh_cp.parallel import ContextParallel, build_mesh, global_token_mean, parallelize
from lh_cp.parallel.fsdp import checkpoint_and_compile
from lh_cp.parallel.offload import PIECE_FLOOR_BYTES, piece_sizes, pinned_bytes
from lh_cp.train.plan import (
    check_recipe,
    host_memory_problems,
    machine_memory_bytes,
    memory_estimate_gib,
    pinned_host_bytes_per_rank,
)
from lh_cp.train.recipe import ParallelConfig, load_recipe
from lh_cp.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.toml"
STEPS = ("lighthouse", "lighthouse", "dense")  # both stages' attention
# Half the quickstart's 1024 tokens, for time: Lighthouse tiles of 128 tokens, one per
# head-tail chunk under CP = 2.
SEQ_LEN = 512


def quickstart_model() -> tuple[Transformer, int]:
    """The quickstart recipe's model (seed 0) and the sequence length the tests use."""
    recipe = load_recipe(QUICKSTART)
    torch.manual_seed(0)
    model = Transformer(
        recipe.model, recipe.lighthouse.config(), tuple(recipe.lighthouse.dense_layers)
    )
    return model, SEQ_LEN


def batch(seq_len: int, step: int) -> torch.Tensor:
    return torch.randint(0, 256, (2, seq_len + 1), generator=torch.Generator().manual_seed(step))


def train_steps(model, forward) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
    """AdamW steps in STEPS' attention modes: each step's loss and gradients (local shards)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, grads = [], []
    for step, mode in enumerate(STEPS):
        model.set_attention(mode)
        loss = forward(step)
        loss.backward()
        # FSDP2's gradients are DTensors: compare each rank's own shard.
        grads.append(
            {
                name: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).clone()
                for name, p in model.named_parameters()
            }
        )
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, grads


def assert_identical(off, on, where: str = "") -> None:
    (losses_off, grads_off), (losses_on, grads_on) = off, on
    assert losses_on == losses_off, where
    for step, (a, b) in enumerate(zip(grads_off, grads_on)):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{where} step {step}: gradient of {name}"


def test_pieces_are_powers_of_two_that_sum_to_the_input():
    """A copy is cut into the binary digits of its byte count (>= the floor) and one rest
    below the floor, so the pinned allocator's power-of-two rounding wastes < the floor."""
    for nbytes in (1, 4096, PIECE_FLOOR_BYTES, 3 * 2**30 // 2, 2**31, 655360 * 2048 + 2, 12345678):
        pieces = piece_sizes(nbytes)
        assert sum(pieces) == nbytes
        assert pieces == sorted(pieces, reverse=True)
        whole = [p for p in pieces if p >= PIECE_FLOOR_BYTES]
        assert all(p & (p - 1) == 0 for p in whole) and len(set(whole)) == len(whole)
        assert len(pieces) - len(whole) <= 1
        assert 0 <= pinned_bytes(nbytes) - nbytes < PIECE_FLOOR_BYTES
    assert piece_sizes(3 * 2**30 // 2) == [2**30, 2**29]  # 1.5 GiB pins 1.5 GiB, not 2


def test_the_block_input_is_freed_once_packed():
    """What offload is for: after the forward, nothing but the host copy holds a checkpointed
    block's input. (The pack hook outlives the forward, kept by autograd with each tensor it
    saved, so a hook that held the input kept it alive: on CUDA the input stayed on the GPU
    beside its host copy.)"""
    import gc
    import weakref

    from lh_cp.parallel.offload import BlockInputOffload

    offload = BlockInputOffload()
    weight = torch.randn(16, 16, requires_grad=True)
    block_input = torch.randn(4, 16).requires_grad_()
    hidden = block_input * 2  # a non-leaf, as a block's input is in a model
    input_alive = weakref.ref(hidden)
    out = offload.checkpoint(lambda x: torch.tanh(x @ weight), hidden)
    del hidden
    gc.collect()
    assert offload.stats.packed == 1
    assert input_alive() is None, "the block input outlived its packing"
    out.sum().backward()
    assert offload.stats.host_bytes == 0 and block_input.grad is not None


@pytest.mark.parametrize("kept", [[], [0]])
def test_offload_changes_no_loss_or_gradient(kept):
    """The quickstart model on one process, 3 AdamW steps (2 Lighthouse, 1 dense): offload on
    equals off bit for bit. Every checkpointed block's input is packed once per step; in
    backward the first input is fetched on demand, each later one ahead (while the block
    after it recomputes), and every host copy is released with the graph. A block kept out
    of checkpointing stores its activations and is not offloaded."""
    model, seq_len = quickstart_model()

    def run(offload: bool):
        net = copy.deepcopy(model)
        cfg = ParallelConfig(
            activation_checkpoint=True, no_checkpoint_layers=kept, offload_activations=offload
        )
        checkpoint_and_compile(net, cfg)

        def forward(step):
            tokens = batch(seq_len, step)
            total, count = net(tokens[:, :-1], torch.arange(seq_len), tokens[:, 1:])
            return total / count

        return net, train_steps(net, forward)

    _, off = run(False)
    net, on = run(True)
    assert_identical(off, on)
    stats, offloaded = net.block_input_offload.stats, len(model.layers) - len(kept)
    assert stats.packed == offloaded * len(STEPS)
    assert stats.fetched_on_demand == len(STEPS)
    assert stats.fetched_ahead == (offloaded - 1) * len(STEPS)
    assert stats.host_bytes == 0
    assert stats.peak_host_bytes == offloaded * 2 * seq_len * model.cfg.dim * 4  # float32


def cp_offload_job(rank: int, world: int) -> dict:
    """The quickstart model under FSDP2 + CP = 2 (all-gather / ring), offload off then on."""
    mesh = build_mesh("cpu", cp=2)
    context = ContextParallel(mesh["cp"].get_group(), "allgather", "ring")
    model, seq_len = quickstart_model()
    results = {}
    for offload in (False, True):
        net = parallelize(
            copy.deepcopy(model),
            mesh,
            ParallelConfig(activation_checkpoint=True, offload_activations=offload),
            context=context,
        )

        def forward(step, net=net):
            tokens = batch(seq_len, step)
            local_inputs = context.shard(tokens[:, :-1], dim=1)
            local_targets = context.shard(tokens[:, 1:], dim=1)
            total, count = net(local_inputs, context.positions(seq_len), local_targets)
            return global_token_mean(total, count, mesh["dp_cp"].get_group())[0]

        results[offload] = train_steps(net, forward)
        if offload:
            results["packed"] = net.block_input_offload.stats.packed
    return results


@pytest.mark.timeout(120)
def test_offload_changes_nothing_under_cp2_fsdp():
    """Both CP ranks: losses and local gradient shards with offload equal those without, bit
    for bit, over both attention modes (the CP exchange runs again in the recomputation, fed
    by the input that came back from the host)."""
    for rank, result in enumerate(run_distributed(cp_offload_job, 2, timeout=100)):
        assert_identical(result[False], result[True], f"rank {rank}")
        assert result["packed"] == 4 * len(STEPS)


def test_trainer_with_offload_resumes_without_it(tmp_path):
    """lh-cp train with offload: the losses and gradient norms of the checkpointed run; a run
    stopped at step 3 with offload resumes without it (the checkpoint does not depend on the
    option) and ends where the straight run ends."""
    corpus = write_corpus(tmp_path / "corpus")
    checkpointed = ["parallel.activation_checkpoint=true"]
    offloaded = checkpointed + ["parallel.offload_activations=true"]
    straight = train(tiny_recipe(tmp_path / "straight", corpus, checkpointed))
    run = tmp_path / "offload"
    train(tiny_recipe(run, corpus, offloaded + ["run.stop_after_step=3"]))
    resumed = train(tiny_recipe(run, corpus, checkpointed))
    assert resumed.resumed_from == 3
    assert logged_losses(run) == straight.train_loss
    norms = logged_losses(run, key="train/grad_norm")
    assert norms == logged_losses(tmp_path / "straight", key="train/grad_norm")
    host = logged_losses(run, key="perf/offload_host_gib")
    assert sorted(host) == [1, 2, 3] and all(v > 0 for v in host.values())


def test_offloaded_compiled_blocks_match_eager():
    """compile + checkpointing + offload: each block is compiled inside the offloading
    checkpoint, and its gradients equal the eager run without offload to float32 rounding
    (1e-5 relative: inductor may fuse the norms and SwiGLU and reorder their sums). One small
    dense block keeps compilation short (one graph)."""
    from torch._dynamo.utils import counters

    from lh_cp.model.transformer import ModelConfig
    from lh_cp.train.checkpoint import unwrapped_name

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=258, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=128)
    model, seq_len = Transformer(cfg, dense_layers=()), 128
    tokens = batch(seq_len, 0)
    grads = {}
    for compiled in (False, True):
        net = copy.deepcopy(model)
        cfg = ParallelConfig(
            activation_checkpoint=True, compile=compiled, offload_activations=compiled
        )
        checkpoint_and_compile(net, cfg)
        torch._dynamo.reset()
        counters.clear()
        total, count = net(tokens[:, :-1], torch.arange(seq_len), tokens[:, 1:])
        (total / count).backward()
        grads[compiled] = {unwrapped_name(name): p.grad for name, p in net.named_parameters()}
    assert counters["stats"]["unique_graphs"] >= 1
    assert net.block_input_offload.stats.packed == len(model.layers)
    torch._dynamo.reset()
    assert grads[True].keys() == grads[False].keys()
    for name, eager in grads[False].items():
        torch.testing.assert_close(grads[True][name], eager, rtol=1e-5, atol=1e-7, msg=name)


def test_recipe_rules_of_offload(tmp_path):
    corpus = tmp_path
    problems = check_recipe(tiny_recipe(tmp_path, corpus, ["parallel.offload_activations=true"]))
    assert any(
        "parallel.offload_activations=true offloads the inputs of checkpointed blocks, but "
        "parallel.activation_checkpoint is false" in p
        for p in problems
    ), problems
    problems = check_recipe(
        tiny_recipe(
            tmp_path,
            corpus,
            [
                "parallel.activation_checkpoint=true",
                "parallel.offload_activations=true",
                "parallel.engine='deepspeed'",
            ],
        )
    )
    assert any("works with parallel.engine='fsdp' only" in p for p in problems), problems
    with pytest.raises(ValueError, match="cfg.activation_checkpoint is False"):
        checkpoint_and_compile(quickstart_model()[0], ParallelConfig(offload_activations=True))


def h100_recipe(n: int, offload: bool):
    return load_recipe(
        REPO / "recipes" / "h100_270m.toml",
        [f"data.seq_len={n}", f"parallel.offload_activations={str(offload).lower()}"],
    )


def test_plan_counts_gpu_and_host_memory_apart():
    """On a GPU the 30 block inputs (N x 1024 bf16 each) move from the GPU estimate to pinned
    host memory, less the two kept on the GPU in backward; on CPU nothing is pinned."""
    n = 1048576
    input_bytes = n * 1024 * 2
    on, off = h100_recipe(n, True), h100_recipe(n, False)
    assert pinned_host_bytes_per_rank(on) == 30 * input_bytes
    assert pinned_host_bytes_per_rank(off) == 0
    saved = (memory_estimate_gib(off) - memory_estimate_gib(on)) * 2**30
    assert saved == pytest.approx(28 * input_bytes)
    on.run.device = "cpu"
    assert pinned_host_bytes_per_rank(on) == 0
    # CP halves every rank's inputs.
    on_cp = load_recipe(
        REPO / "recipes" / "h100_270m.toml",
        [f"data.seq_len={n}", "parallel.offload_activations=true", "parallel.cp=2"],
    )
    assert pinned_host_bytes_per_rank(on_cp) == 30 * input_bytes // 2


def test_plan_refuses_more_pinned_memory_than_the_machine_has(capsys):
    from lh_cp.cli import main

    recipe = h100_recipe(1048576, True)  # 60 GiB pinned per rank
    assert host_memory_problems(recipe, 128 * 2**30, 1) == []
    problems = host_memory_problems(recipe, 64 * 2**30, 1)
    assert len(problems) == 1
    assert "pins 60.0 GiB of host memory" in problems[0]
    assert "the machine has 64.0 GiB and at most 57.6 GiB may be pinned" in problems[0]
    assert "pins 120.0 GiB" in host_memory_problems(recipe, 128 * 2**30, 2)[0]
    assert host_memory_problems(h100_recipe(1048576, False), 2**30, 8) == []
    assert 0 < machine_memory_bytes()
    common = [
        "plan",
        str(REPO / "recipes" / "h100_270m.toml"),
        "--set",
        "data.seq_len=1048576",
        "--set",
        "parallel.offload_activations=true",
    ]
    assert main(common + ["--host-memory-gib", "64"]) == 2
    assert "the machine has 64.0 GiB" in capsys.readouterr().err
    assert main(common + ["--host-memory-gib", "128"]) == 0
    out = capsys.readouterr().out
    # docs/offload.md quotes these two lines.
    assert "pinned host memory per rank: 60.0 GiB (30 block inputs of 2.00 GiB)" in out
    assert (
        "memory estimate per rank: 52.0 GiB (with activation checkpointing, block inputs "
        "offloaded to host memory)" in out
    )
