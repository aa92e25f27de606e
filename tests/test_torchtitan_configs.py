"""torchtitan's own ConfigManager loads every lh_cp.torchtitan config; config rules fail clearly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip(
    "torchtitan", reason="torchtitan is not installed (pip install 'lh-cp[torchtitan]')"
)

from torchtitan.config import ConfigManager  # noqa: E402

from lh_cp.torchtitan import config_registry  # noqa: E402
from lh_cp.torchtitan.inner_attention import LighthouseInnerAttention  # noqa: E402
from lh_cp.torchtitan.trainer import LighthouseTrainer  # noqa: E402
from lh_cp.train.recipe import load_recipe  # noqa: E402

QUICKSTART = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.toml"
NAMED = {
    "lighthouse_debugmodel": (6, 10, "lighthouse", 0),
    "lighthouse_debugmodel_recovery": (6, 15, "dense", 10),
    "lighthouse_270m": (30, 10000, "lighthouse", 0),
    "lighthouse_270m_recovery": (30, 16000, "dense", 10000),
    "lighthouse_530m": (30, 10000, "lighthouse", 0),
    "lighthouse_530m_recovery": (30, 16000, "dense", 10000),
}


def parse(*args: str) -> LighthouseTrainer.Config:
    return ConfigManager().parse_args(["--module", "lh_cp.torchtitan", *args])


def modes(config) -> list[str]:
    return [layer.attention.inner_attention.mode for layer in config.model_spec.model.layers]


@pytest.mark.parametrize("name", sorted(NAMED))
def test_config_manager_loads_named_config(name):
    n_layers, steps, attention, resume = NAMED[name]
    config = parse("--config", name)
    assert isinstance(config, LighthouseTrainer.Config)
    assert config.training.steps == steps and config.stage.resume_step == resume
    assert config.lr_scheduler.total_steps == NAMED[name.removesuffix("_recovery") + "_recovery"][1]
    expected = (
        ["dense"] * n_layers
        if attention == "dense"
        else ["dense"] * 2 + ["lighthouse"] * (n_layers - 4) + ["dense"] * 2
    )
    assert modes(config) == expected
    assert all(
        isinstance(layer.attention.inner_attention, LighthouseInnerAttention.Config)
        for layer in config.model_spec.model.layers
    )
    assert config.checkpoint.enable and not config.checkpoint.last_save_model_only


def test_named_sizes():
    c270, c530 = (
        parse("--config", "lighthouse_270m").model,
        parse("--config", "lighthouse_530m").model,
    )
    assert (c270.dim, c270.n_layers, c270.ffn_dim, c270.n_heads) == (1024, 30, 1536, 8)
    assert parse("--config", "lighthouse_270m").lighthouse.dense_layers == [0, 1, 28, 29]
    # The 530M model is the one of the lh-cp long recipes (the paper's shape, RoPE base 1e6),
    # so one recipe drives both trainers.
    long_recipe = load_recipe(
        Path(__file__).resolve().parent.parent / "recipes" / "128k.toml"
    ).model
    assert (
        c530.dim,
        c530.n_layers,
        c530.ffn_dim,
        c530.n_heads,
        c530.n_kv_heads,
        c530.rope_theta,
    ) == (
        long_recipe.dim,
        long_recipe.n_layers,
        long_recipe.ffn_dim,
        long_recipe.n_heads,
        long_recipe.n_kv_heads,
        long_recipe.rope_theta,
    )
    assert (c270.rope_theta, c530.rope_theta) == (1e4, 1e6)
    for cfg in (c270, c530):
        per_layer = (
            2 * cfg.dim * cfg.dim
            + 2 * cfg.dim * cfg.n_kv_heads * cfg.head_dim
            + 3 * cfg.dim * cfg.ffn_dim
        )
        assert round(cfg.n_layers * per_layer / 1e6, 1) == 267.4
        assert round((cfg.n_layers * per_layer + 2 * cfg.vocab_size * cfg.dim) / 1e6, 1) == 530.1


def test_config_manager_loads_recipe_stages(monkeypatch):
    recipe = load_recipe(QUICKSTART)
    ends = recipe.stage_ends()
    monkeypatch.setenv("LH_CP_RECIPE", str(QUICKSTART))
    for stage, index in [(s.name, i) for i, s in enumerate(recipe.stages)] + [("1", 1)]:
        monkeypatch.setenv("LH_CP_STAGE", stage)
        config = parse("--config", "from_recipe")
        assert config.stage.attention == recipe.stages[index].attention
        assert config.training.steps == ends[index]
        assert config.stage.resume_step == (ends[index - 1] if index else 0)
        assert config.parallelism.context_parallel_degree == recipe.parallel.cp
    monkeypatch.setenv(
        "LH_CP_SET", "model.dim=64 \"run.name='two words'\""
    )  # TOML quoting inside the shell's
    config = parse("--config", "from_recipe")
    assert config.model.dim == 64 and config.flavor.startswith("two words:")


def test_command_line_overrides_reach_the_model():
    config = parse(
        "--config",
        "lighthouse_debugmodel",
        "--stage.attention",
        "dense",
        "--model.dim",
        "64",
        "--lighthouse.dense_layers",
        "0",
        "-1",
    )
    assert config.model_spec.model.dim == 64 and modes(config) == ["dense"] * 6
    config = parse("--config", "lighthouse_debugmodel", "--lighthouse.dense_layers", "0", "-1")
    assert modes(config) == ["dense"] + ["lighthouse"] * 4 + ["dense"]


def test_config_errors_name_the_bad_values(monkeypatch, capsys):
    base = config_registry.lighthouse_debugmodel()
    with pytest.raises(SystemExit):  # tyro prints the ValueError and exits with status 2
        parse("--config", "lighthouse_debugmodel", "--stage.attention", "sparse")
    words = " ".join(w for w in capsys.readouterr().err.split() if w not in "│╭╮╰╯")
    assert "stage.attention must be one of ('lighthouse', 'dense'), got 'sparse'" in words
    with pytest.raises(ValueError, match="tile size T=250 \\(N=1000\\)"):
        dataclasses.replace(base, training=dataclasses.replace(base.training, seq_len=1000))
    with pytest.raises(
        ValueError, match="each head-tail chunk of .* tokens must be a multiple of the tile size"
    ):
        dataclasses.replace(
            base, parallelism=dataclasses.replace(base.parallelism, context_parallel_degree=4)
        )
    with pytest.raises(ValueError, match="spmd_backend='partial_dtensor'"):
        dataclasses.replace(
            base, parallelism=dataclasses.replace(base.parallelism, spmd_backend="spmd_types")
        )
    with pytest.raises(ValueError, match="last_save_model_only=False"):
        dataclasses.replace(
            base, checkpoint=dataclasses.replace(base.checkpoint, last_save_model_only=True)
        )
    with pytest.raises(ValueError, match="dataloader must be LhCpDataLoader.Config"):
        from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader

        dataclasses.replace(base, dataloader=HuggingFaceTextDataLoader.Config())
    monkeypatch.delenv("LH_CP_RECIPE", raising=False)
    with pytest.raises(ValueError, match="LH_CP_RECIPE"):
        parse("--config", "from_recipe")


def test_recovery_refuses_to_start_without_the_lighthouse_checkpoint():
    """The Trainer needs an accelerator to construct, so the check runs on a bare instance."""
    trainer = LighthouseTrainer.__new__(LighthouseTrainer)
    trainer.config = config_registry.lighthouse_debugmodel_recovery()
    trainer.step = 0  # what Trainer.train() holds when checkpoint.load() found nothing
    with pytest.raises(RuntimeError, match="stage.resume_step=10: .* would start at step 1"):
        trainer.should_continue_training()
    trainer.step = 10  # resumed from the Lighthouse stage's last checkpoint
    assert trainer.should_continue_training()
    trainer.step = 15
    assert not trainer.should_continue_training()


def test_the_causal_selection_reaches_every_lighthouse_attention():
    """--lighthouse.selection causal (docs/LIGHTHOUSE.md s.11) reaches the inner attentions'
    LighthouseConfig; the default is the paper's."""

    def selections(config) -> set[str]:
        layers = config.model_spec.model.layers
        return {
            layer.attention.inner_attention.lighthouse.selection
            for layer in layers
            if layer.attention.inner_attention.mode == "lighthouse"
        }

    assert selections(parse("--config", "lighthouse_debugmodel")) == {"tile_topk"}
    assert selections(
        parse("--config", "lighthouse_debugmodel", "--lighthouse.selection", "causal")
    ) == {"causal"}
