"""Trainer: exact resume, recovery from the stage-1 checkpoint, a killed run that loses
nothing, checkpoint retention, metrics and the plot. One process each (gloo world of 1), a
tiny model on a small local corpus, so each run takes seconds.

Losses are compared for exact equality: on one CPU process with the same thread count the
same inputs give bit-identical results, and a resumed run must reproduce the uninterrupted
one bit for bit (weights, AdamW moments and step, learning-rate step, data position).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_utils import logged_losses, tiny_recipe, tiny_recipe_dict, write_corpus, write_toml

from lh_cp.train.checkpoint import complete_checkpoints
from lh_cp.train.recipe import RecipeError
from lh_cp.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus):
    """The uninterrupted 6-step run (4 Lighthouse + 2 dense) every resume is compared with."""
    out = tmp_path_factory.mktemp("straight")
    summary = train(tiny_recipe(out, corpus))
    return out, summary


def test_straight_run_trains_both_stages_and_writes_everything(straight):
    out, summary = straight
    assert sorted(summary.train_loss) == [1, 2, 3, 4, 5, 6]
    assert summary.train_loss[6] < summary.train_loss[1]
    assert sorted(summary.val_loss) == [4, 6]  # each stage end is validated
    # Both modes at the Lighthouse stage's validation (different numbers); one in the dense stage.
    assert (
        sorted(summary.val_loss_dense) == [4, 6]
        and summary.val_loss_dense[6] == summary.val_loss[6]
    )
    assert summary.val_loss_dense[4] != summary.val_loss[4]
    assert sorted(summary.leak) == [4]  # the leak metric runs in Lighthouse stages only
    assert logged_losses(out, "val", "val/loss_dense") == summary.val_loss_dense
    assert logged_losses(out, "val", "val/leak_next_token_nats") == {
        4: summary.leak[4]["val/leak_next_token_nats"]
    }
    assert sorted(complete_checkpoints(out / "checkpoints")) == [4, 6]  # stage ends
    assert any((out / "tensorboard").glob("events.out.tfevents.*"))
    assert logged_losses(out) == summary.train_loss


def test_exact_resume_mid_stage(tmp_path, corpus, straight):
    """6 steps straight == 3 steps, stop, resume, 3 more steps: the same six losses."""
    _, reference = straight
    first = train(tiny_recipe(tmp_path, corpus, ["run.stop_after_step=3"]))
    assert sorted(first.train_loss) == [1, 2, 3] and 3 in complete_checkpoints(
        tmp_path / "checkpoints"
    )
    second = train(tiny_recipe(tmp_path, corpus))
    assert second.resumed_from == 3 and sorted(second.train_loss) == [4, 5, 6]
    assert {**first.train_loss, **second.train_loss} == reference.train_loss
    assert logged_losses(tmp_path) == reference.train_loss
    assert second.val_loss == {k: v for k, v in reference.val_loss.items() if k > 3}


@pytest.mark.parametrize("decay", ["constant", "wsd"])
def test_resume_continues_the_learning_rate_curve(tmp_path, corpus, decay):
    """Stopped at the stage boundary and resumed, the logged learning rates are lr_at's at every
    step (warmup, then the stable part through stage 1, the decay inside recovery for 'wsd')
    and the losses equal the uninterrupted run's."""
    from lh_cp.train.schedule import lr_at

    sets = [f"schedule.decay='{decay}'"] + (["schedule.decay_steps=2"] if decay == "wsd" else [])
    reference = train(tiny_recipe(tmp_path / "straight", corpus, sets))
    train(tiny_recipe(tmp_path / "resumed", corpus, sets + ["run.stop_after_step=4"]))
    recipe = tiny_recipe(tmp_path / "resumed", corpus, sets)
    resumed = train(recipe)
    assert resumed.resumed_from == 4 and logged_losses(tmp_path / "resumed") == reference.train_loss
    logged_lr = logged_losses(tmp_path / "resumed", "train", "train/lr")
    assert logged_lr == {s: lr_at(s, 6, recipe.optim, recipe.schedule) for s in range(1, 7)}
    assert logged_lr[4] == logged_lr[3] == recipe.optim.lr  # stable up to the boundary
    assert (logged_lr[6] < logged_lr[5] < logged_lr[4]) == (decay == "wsd")


def test_recovery_resumes_from_the_stage_1_checkpoint(tmp_path, corpus, straight):
    """Stage 1 alone, then a new invocation: it loads the stage-1 checkpoint (weights,
    optimizer, schedule, data position) and its dense steps equal the uninterrupted run's."""
    _, reference = straight
    stage1 = train(tiny_recipe(tmp_path, corpus, ["run.stop_after_step=4"]))
    assert sorted(complete_checkpoints(tmp_path / "checkpoints")) == [4]
    recovery = train(tiny_recipe(tmp_path, corpus))
    assert recovery.resumed_from == 4
    assert {s: recovery.train_loss[s] for s in (5, 6)} == {
        s: reference.train_loss[s] for s in (5, 6)
    }
    assert stage1.val_loss[4] == reference.val_loss[4]


def test_interval_checkpoints_keep_the_last_k_and_every_stage_end(tmp_path, corpus):
    train(
        tiny_recipe(
            tmp_path,
            corpus,
            ["checkpoint.interval=1", "checkpoint.keep_last=2"],
            lighthouse_steps=5,
            dense_steps=3,
        )
    )
    # steps 1..8; stage ends 5 and 8 are protected; the newest two others are 6 and 7.
    assert sorted(complete_checkpoints(tmp_path / "checkpoints")) == [5, 6, 7, 8]


def test_killed_run_resumes_and_loses_nothing(tmp_path, corpus):
    """SIGKILL a training process right after its first checkpoint; the rerun resumes there
    and its losses equal an uninterrupted run's, step for step."""
    steps = (9, 3)
    reference = train(
        tiny_recipe(tmp_path / "reference", corpus, lighthouse_steps=steps[0], dense_steps=steps[1])
    )
    out = tmp_path / "killed"
    recipe_file = tmp_path / "killed.toml"
    write_toml(
        recipe_file, tiny_recipe_dict(out, corpus, lighthouse_steps=steps[0], dense_steps=steps[1])
    )
    command = [
        sys.executable,
        "-m",
        "lh_cp.cli",
        "train",
        str(recipe_file),
        "--set",
        "checkpoint.interval=3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while (
        not complete_checkpoints(out / "checkpoints")
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = max(complete_checkpoints(out / "checkpoints"), default=0)
    assert 0 < killed_at < sum(steps), (
        f"the run was not killed mid-way (checkpoint at {killed_at}): {process.stdout.read()!r}"
    )
    resumed = train(
        tiny_recipe(
            out, corpus, ["checkpoint.interval=3"], lighthouse_steps=steps[0], dense_steps=steps[1]
        )
    )
    assert resumed.resumed_from == killed_at
    assert logged_losses(out) == reference.train_loss


def test_plot_marks_the_stage_boundary(straight, tmp_path):
    from lh_cp.train.plot import plot_losses, read_scalars, read_stage_names, stage_starts

    out, _ = straight
    assert stage_starts(read_scalars(out / "tensorboard")["train/stage"]) == [(5, 1)]
    assert read_stage_names(out / "tensorboard") == ["lighthouse (lighthouse)", "recovery (dense)"]
    png = plot_losses(out / "tensorboard", tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_data_path_fails_before_any_process_group(tmp_path):
    import torch.distributed as dist

    from lh_cp.train.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"data.path='/nonexistent/data' does not exist"):
        train(tiny_recipe(tmp_path, Path("/nonexistent/data")))
    assert not dist.is_initialized()


def test_activation_checkpointing_changes_no_loss(tmp_path, corpus, straight):
    """Recomputing each block in backward reproduces the stored activations exactly."""
    _, reference = straight
    checkpointed = train(tiny_recipe(tmp_path, corpus, ["parallel.activation_checkpoint=true"]))
    assert checkpointed.train_loss == reference.train_loss


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, corpus):
    """A learning rate of 1e30 makes the weights overflow after step 1: step 2's loss is not
    finite. The run stops there naming step, stage and rank, and step 2 is never saved."""
    from lh_cp.train.engines import NonFiniteStep

    recipe = tiny_recipe(
        tmp_path,
        corpus,
        [
            "optim.lr=1e30",
            "schedule.warmup_steps=0",
            "schedule.decay='constant'",
            "optim.grad_clip=0.0",
            "checkpoint.interval=1",
        ],
    )
    with pytest.raises(
        NonFiniteStep,
        match=r"non-finite (loss|gradient norm|attention input) \(.+\) at step 2, stage 1 'lighthouse', "
        r"rank 0: training stopped; the last good checkpoint is .*step_00000001 \(step 1\)",
    ):
        train(recipe)
    assert sorted(complete_checkpoints(tmp_path / "checkpoints")) == [1]
    assert sorted(logged_losses(tmp_path)) == [1]


def test_profile_step_writes_a_trace_and_table_and_changes_no_loss(tmp_path, corpus, straight):
    """metrics.profile_step=3: that step's Chrome trace and operator table land in out_dir, and
    profiling changes no loss."""
    _, reference = straight
    profiled = train(tiny_recipe(tmp_path, corpus, ["metrics.profile_step=3"]))
    assert profiled.train_loss == reference.train_loss
    trace = json.loads((tmp_path / "profile_step3_rank0.json").read_text())
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
    table = (tmp_path / "profile_step3_rank0.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
    assert sorted(p.name for p in tmp_path.glob("profile_*")) == [
        "profile_step3_rank0.json",
        "profile_step3_rank0.txt",
    ]


@pytest.mark.parametrize("step", [-1, 7])
def test_profile_step_outside_the_run_is_refused(tmp_path, corpus, step):
    with pytest.raises(
        RecipeError,
        match=rf"metrics.profile_step={step} must be 0 \(off\) or a step of the run, 1..6",
    ):
        train(tiny_recipe(tmp_path, corpus, [f"metrics.profile_step={step}"]))


def test_blocks_kept_out_of_checkpointing_change_no_loss(tmp_path, corpus, straight):
    """parallel.no_checkpoint_layers=[0, -1]: those two blocks store their activations, the
    others are recomputed; the losses are the uncheckpointed run's."""
    _, reference = straight
    kept = train(
        tiny_recipe(
            tmp_path,
            corpus,
            ["parallel.activation_checkpoint=true", "parallel.no_checkpoint_layers=[0, -1]"],
        )
    )
    assert kept.train_loss == reference.train_loss


def test_only_the_blocks_not_kept_are_checkpointed():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from lh_cp.model.transformer import ModelConfig, Transformer
    from lh_cp.parallel import checkpoint_and_compile
    from lh_cp.train.recipe import ParallelConfig

    model = Transformer(ModelConfig(n_layers=4, dim=32, n_heads=2, n_kv_heads=2, ffn_dim=64))
    checkpoint_and_compile(
        model, ParallelConfig(activation_checkpoint=True, no_checkpoint_layers=[1, -1])
    )
    assert [isinstance(block, CheckpointWrapper) for block in model.layers] == [
        True,
        False,
        True,
        False,
    ]


def test_no_checkpoint_layers_rules_name_the_key(tmp_path, corpus):
    from lh_cp.train.plan import check_recipe, memory_estimate_gib

    problems = check_recipe(
        tiny_recipe(
            tmp_path,
            corpus,
            ["parallel.no_checkpoint_layers=[7]", "parallel.activation_checkpoint=true"],
        )
    )
    assert any("parallel.no_checkpoint_layers index 7 is out of range" in p for p in problems), (
        problems
    )
    problems = check_recipe(tiny_recipe(tmp_path, corpus, ["parallel.no_checkpoint_layers=[0]"]))
    assert any("which is off: set parallel.activation_checkpoint=true" in p for p in problems), (
        problems
    )
    # Keeping blocks' activations costs memory, and the estimate says so.
    base = ["parallel.activation_checkpoint=true"]
    all_checkpointed = memory_estimate_gib(tiny_recipe(tmp_path, corpus, base))
    two_kept = memory_estimate_gib(
        tiny_recipe(tmp_path, corpus, base + ["parallel.no_checkpoint_layers=[0, 1]"])
    )
    none = memory_estimate_gib(tiny_recipe(tmp_path, corpus))
    assert all_checkpointed < two_kept < none + 1e-9
