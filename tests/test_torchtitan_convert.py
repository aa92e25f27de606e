"""`python -m lh_cp.torchtitan.convert`: one lh-cp recipe drives torchtitan's trainer, stage by stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip(
    "torchtitan", reason="torchtitan is not installed (pip install 'lh-cp[torchtitan]')"
)

from lh_cp.torchtitan.convert import main  # noqa: E402
from lh_cp.torchtitan.recipe_config import stage_index, trainer_config_from_recipe  # noqa: E402
from lh_cp.train.recipe import load_recipe  # noqa: E402

QUICKSTART = str(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml")


def test_recipe_sections_reach_the_torchtitan_config():
    recipe = load_recipe(QUICKSTART)
    last = len(recipe.stages) - 1
    config = trainer_config_from_recipe(recipe, last)
    assert config.model == recipe.model and config.lighthouse == recipe.lighthouse
    assert (
        config.training.seq_len == recipe.data.seq_len
        and config.training.local_batch_size == recipe.data.batch_size
    )
    assert (
        config.training.steps == recipe.total_steps
        and config.lr_scheduler.total_steps == recipe.total_steps
    )
    assert config.stage.resume_step == recipe.stage_ends()[last - 1]
    assert (
        config.stage.exchange == recipe.parallel.exchange
        and config.stage.dense_exchange == recipe.parallel.dense_exchange
    )
    assert config.parallelism.context_parallel_degree == recipe.parallel.cp
    assert (
        config.dataloader.dataset == recipe.data.source
        and config.tokenizer.name == recipe.data.tokenizer
    )
    groups = config.optimizer.param_groups
    assert [g.optimizer_kwargs["weight_decay"] for g in groups] == [0.0, recipe.optim.weight_decay]
    assert groups[1].optimizer_kwargs["lr"] == recipe.optim.lr
    assert config.lr_scheduler.warmup_steps == recipe.schedule.warmup_steps
    assert (
        config.metrics.log_freq == recipe.metrics.log_interval
        and config.debug.seed == recipe.run.seed
    )


@pytest.mark.parametrize(
    "sets, ratio, decay_type, floor",
    [
        (
            ["schedule.decay='constant'"],
            0.0,
            "linear",
            0.1,
        ),  # the paper's torchtitan setting: decay_ratio = 0
        (
            ["schedule.decay='wsd'", "schedule.decay_steps=40", "schedule.min_lr_ratio=0.2"],
            40 / 160,
            "linear",
            0.2,
        ),
        (["schedule.decay='cosine'"], None, "cosine", 0.1),
    ],
)
def test_every_schedule_reaches_torchtitan(sets, ratio, decay_type, floor):
    config = trainer_config_from_recipe(load_recipe(QUICKSTART, sets), 0).lr_scheduler
    assert (config.decay_ratio, config.decay_type, config.min_lr_factor) == (
        ratio,
        decay_type,
        floor,
    )
    assert round(config.total_steps * (config.decay_ratio or 0)) == (40 if ratio else 0)


def test_cli_prints_one_torchtitan_command_per_stage(capsys):
    assert main([QUICKSTART]) == 0
    out = capsys.readouterr().out
    for stage in load_recipe(QUICKSTART).stages:
        assert f"LH_CP_STAGE={stage.name} torchrun" in out
    assert "-m torchtitan.train --module lh_cp.torchtitan --config from_recipe" in out
    assert "not carried over: run.device" in out


def test_cli_carries_overrides_into_the_commands(capsys):
    assert main([QUICKSTART, "--set", "model.dim=64", "--nproc", "4"]) == 0
    out = capsys.readouterr().out
    assert "LH_CP_SET=model.dim=64 torchrun --standalone --nproc-per-node 4" in out


def test_cli_json_and_overrides(capsys):
    assert main([QUICKSTART, "--json", "--set", "model.dim=64"]) == 0
    stages = json.loads(capsys.readouterr().out)
    assert set(stages) == {s.name for s in load_recipe(QUICKSTART).stages}
    assert all(stage["model"]["dim"] == 64 for stage in stages.values())


def test_unknown_stage_names_the_choices():
    recipe = load_recipe(QUICKSTART)
    with pytest.raises(ValueError, match="no stage named 'warmup'; its stages are"):
        stage_index(recipe, "warmup")
    with pytest.raises(ValueError, match="stage index 9 is out of range"):
        stage_index(recipe, 9)
