"""Recipes: strict loading (errors name the key and the rule), overrides, the plan's rules and
numbers, and the shipped recipes (all must pass `lh-cp plan`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lh_cp.cli import main
from lh_cp.model.transformer import count_parameters
from lh_cp.train.plan import check_recipe, plan_numbers
from lh_cp.train.recipe import RecipeError, load_recipe, recipe_from_dict
from lh_cp.train.schedule import lr_at

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
LONG_RECIPES = {
    "128k.toml": (131072, 8),
    "256k.toml": (262144, 16),
    "512k.toml": (524288, 16),
    "1m.toml": (1048576, 32),
}


def _valid() -> dict:
    return {
        "model": {
            "vocab_size": 258,
            "dim": 64,
            "n_layers": 6,
            "n_heads": 4,
            "n_kv_heads": 2,
            "ffn_dim": 128,
        },
        "lighthouse": {"pool": 4, "levels": 3, "topk": 64, "tile_budget": 8},
        "parallel": {"cp": 2},
        "data": {"seq_len": 2048},
        "schedule": {"warmup_steps": 1},
        "stages": [
            {"name": "a", "attention": "lighthouse", "steps": 2},
            {"name": "b", "attention": "dense", "steps": 2},
        ],
    }


def test_unknown_key_names_the_key_and_the_valid_ones():
    data = _valid()
    data["model"]["hidden"] = 3
    with pytest.raises(
        RecipeError,
        match=r"unknown recipe key 'model.hidden'.*valid keys in \[model\]: vocab_size, dim",
    ):
        recipe_from_dict(data)
    with pytest.raises(RecipeError, match=r"unknown recipe key 'optimizer'"):
        recipe_from_dict({**_valid(), "optimizer": {}})
    with pytest.raises(RecipeError, match=r"unknown recipe key 'stages.1.step'"):
        recipe_from_dict(_valid(), ["stages.1.step=3"])


def test_wrong_type_names_the_key_and_the_expected_type():
    data = _valid()
    data["model"]["dim"] = "wide"
    with pytest.raises(RecipeError, match=r"recipe key model.dim: expected int, got str 'wide'"):
        recipe_from_dict(data)
    with pytest.raises(RecipeError, match=r"recipe key parallel.compile: expected bool, got int 1"):
        recipe_from_dict(_valid(), ["parallel.compile=1"])


def test_overrides_reach_nested_tables_and_list_entries():
    recipe = recipe_from_dict(
        _valid(),
        ["stages.1.steps=7", "optim.lr=1e-3", "eval.passkey.depths=[0.5]", "data.source=files"],
    )
    assert recipe.stages[1].steps == 7 and recipe.optim.lr == 1e-3
    assert recipe.eval.passkey.depths == [0.5] and recipe.data.source == "files"
    with pytest.raises(RecipeError, match=r"stages.5 is not an existing list index"):
        recipe_from_dict(_valid(), ["stages.5.steps=1"])


@pytest.mark.parametrize(
    "override, rule",
    [
        ("data.seq_len=2052", r"data.seq_len=2052 with \[lighthouse\]: N % T == 0 fails"),
        (
            "parallel.cp=8",
            r"chunk of 2048 / 16 = 128 tokens must be a multiple of the tile size T=256",
        ),
        ("parallel.cp=3", r"2 \* parallel.cp = 6 equal head-tail chunks: 2048 % 6 != 0"),
        (
            "model.n_kv_heads=3",
            r"n_heads must be a multiple of model.n_kv_heads \(GQA\): n_heads=4, n_kv_heads=3",
        ),
        ("model.n_heads=6", r"model.dim must be a multiple of model.n_heads: dim=64, n_heads=6"),
        ("lighthouse.tile_budget=6", r"topk must be a positive multiple of tile_budget"),
        ("lighthouse.dense_layers=[0, 9]", r"dense_layers index 9 is out of range for n_layers=6"),
        (
            "model.vocab_size=100",
            r"model.vocab_size=100 is smaller than the tokenizer's 258 tokens",
        ),
        (
            "stages.1.attention='sparse'",
            r"stages.1.attention must be one of \('lighthouse', 'dense'\), got 'sparse'",
        ),
        (
            "schedule.warmup_steps=4",
            r"schedule.warmup_steps=4 must be >= 0 and below the total steps of all stages, 4",
        ),
        (
            "parallel.exchange='tree'",
            r"parallel.exchange must be one of \('allgather', 'ring', 'ulysses', 'ulysses_compressed'\), got 'tree'",
        ),
    ],
)
def test_plan_rules_name_the_key_and_the_numbers(override, rule):
    errors = check_recipe(recipe_from_dict(_valid(), [override]))
    assert any(__import__("re").search(rule, e) for e in errors), errors


def test_world_size_must_match_the_degrees():
    errors = check_recipe(recipe_from_dict(_valid()), world_size=4)
    assert errors == [
        "parallel.cp * dp_shard * dp_replicate = 2 * 1 * 1 = 2 must equal the number of processes, 4"
    ]
    assert check_recipe(recipe_from_dict(_valid()), world_size=2) == []


def test_plan_collects_every_problem_at_once(capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        '[model]\nn_kv_heads = 3\n[data]\nseq_len = 1000\n[[stages]]\nattention = "lighthouse"\nsteps = 0\n'
    )
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        "n_kv_heads" in err and "stages.0.steps must be >= 1" in err and "N % T == 0 fails" in err
    )


def test_schedule_warmup_then_cosine_to_the_floor():
    recipe = recipe_from_dict(
        _valid(), ["schedule.warmup_steps=2", "schedule.min_lr_ratio=0.1", "optim.lr=1.0"]
    )
    total = recipe.total_steps
    values = [lr_at(s, total, recipe.optim, recipe.schedule) for s in range(1, total + 1)]
    assert (
        values[0] == pytest.approx(0.5)
        and values[1] == pytest.approx(1.0)
        and values[-1] == pytest.approx(0.1)
    )
    linear = recipe_from_dict(
        _valid(),
        [
            "schedule.warmup_steps=1",
            "schedule.decay='linear'",
            "optim.lr=1.0",
            "schedule.min_lr_ratio=0.0",
        ],
    )
    assert [lr_at(s, 4, linear.optim, linear.schedule) for s in (1, 2, 3, 4)] == pytest.approx(
        [1.0, 2 / 3, 1 / 3, 0.0]
    )


@pytest.mark.parametrize("decay", ["constant", "linear", "cosine", "wsd"])
def test_every_curve_is_continuous_at_the_stage_boundary(decay):
    """The recovery stage continues the curve: no re-warm and no jump at the switch (the step
    after the boundary moves by at most one step's decay)."""
    sets = [
        "schedule.warmup_steps=10",
        "optim.lr=1.0",
        "schedule.min_lr_ratio=0.1",
        "stages.0.steps=60",
        "stages.1.steps=40",
        f"schedule.decay='{decay}'",
    ] + (["schedule.decay_steps=40"] if decay == "wsd" else [])
    recipe = recipe_from_dict(_valid(), sets)
    values = [lr_at(s, recipe.total_steps, recipe.optim, recipe.schedule) for s in range(1, 101)]
    largest_step = max(abs(a - b) for a, b in zip(values[10:], values[11:]))
    assert abs(values[60] - values[59]) <= largest_step + 1e-12
    assert values[9] == pytest.approx(1.0) and values[0] == pytest.approx(
        0.1
    )  # warmup 1/10 .. 10/10
    if decay == "constant":
        assert values[10:] == [1.0] * 90
    if decay == "wsd":
        assert values[10:60] == [1.0] * 50  # stable through the whole Lighthouse stage
        assert values[60:] == pytest.approx(
            [1.0 - 0.9 * i / 40 for i in range(1, 41)]
        )  # linear inside recovery
        assert values[-1] == pytest.approx(0.1)


@pytest.mark.parametrize(
    "sets, rule",
    [
        (
            ["schedule.decay='wsd'"],
            r"schedule.decay_steps=0 must lie in \[1, total steps - warmup_steps\] = \[1, 4 - 1 = 3\]",
        ),
        (
            ["schedule.decay='wsd'", "schedule.decay_steps=4"],
            r"schedule.decay_steps=4 must lie in \[1, ",
        ),
        (
            ["schedule.decay_steps=2"],
            r"schedule.decay_steps=2 is used by schedule.decay='wsd' only",
        ),
        (
            ["schedule.decay='step'"],
            r"schedule.decay must be one of \('constant', 'linear', 'cosine', 'wsd'\), got 'step'",
        ),
    ],
)
def test_schedule_rules_name_the_numbers(sets, rule):
    errors = check_recipe(recipe_from_dict(_valid(), sets))
    assert any(__import__("re").search(rule, e) for e in errors), errors


def test_quickstart_recipe_plans(capsys):
    assert main(["plan", str(RECIPES / "quickstart.toml"), "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "tile T = " in out and "CPU processes: 2" in out


@pytest.mark.parametrize("name", sorted(LONG_RECIPES))
def test_long_recipes_plan_at_their_length_and_gpu_count(name, capsys):
    seq_len, gpus = LONG_RECIPES[name]
    recipe = load_recipe(RECIPES / name)
    assert check_recipe(recipe, world_size=gpus) == []
    numbers = plan_numbers(recipe)
    assert numbers.seq_len == seq_len and numbers.world_size == gpus
    assert 520e6 <= numbers.params <= 540e6, numbers.params  # "about 530M", as in the paper
    assert [s.attention for s in recipe.stages] == ["lighthouse", "dense"]
    assert recipe.data.source == "hf"
    assert numbers.memory_gib < 70, f"{name}: estimated {numbers.memory_gib:.1f} GiB per 80 GB GPU"
    assert main(["plan", str(RECIPES / name), "--world-size", str(gpus)]) == 0
    assert f"GPUs: {gpus}" in capsys.readouterr().out


def test_530m_parameter_count_is_what_the_readme_states():
    recipe = load_recipe(RECIPES / "128k.toml")
    assert count_parameters(recipe.model) == 530_117_632


@pytest.mark.parametrize("name", sorted(LONG_RECIPES) + ["paper_98k.toml"])
def test_long_recipes_follow_the_papers_model_and_schedule(name):
    """docs/LIGHTHOUSE.md s.9: dim 1024, 30 layers, 8/8 heads of 128, FFN 1536, dense layers
    0, 1, 28, 29; AdamW 2e-3 (0.9, 0.95), eps 1e-8, wd 0.1, clip 1; 2000 warmup steps, then
    constant; 10,000 Lighthouse + 6,000 dense steps."""
    recipe = load_recipe(RECIPES / name)
    m, opt, sched = recipe.model, recipe.optim, recipe.schedule
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim) == (
        1024,
        30,
        8,
        8,
        128,
        1536,
    )
    assert not m.tie_embeddings and m.vocab_size == 128256
    assert sorted(i % m.n_layers for i in recipe.lighthouse.dense_layers) == [0, 1, 28, 29]
    assert (opt.lr, opt.betas, opt.eps, opt.weight_decay, opt.grad_clip) == (
        2e-3,
        [0.9, 0.95],
        1e-8,
        0.1,
        1.0,
    )
    assert (sched.warmup_steps, sched.decay) == (2000, "constant")
    assert [(s.attention, s.steps) for s in recipe.stages] == [
        ("lighthouse", 10000),
        ("dense", 6000),
    ]


def test_paper_recipe_is_the_papers_run():
    recipe = load_recipe(RECIPES / "paper_98k.toml")
    lh, data = recipe.lighthouse, recipe.data
    assert (lh.pool, lh.levels, lh.topk, lh.tile_budget) == (4, 3, 1536, 128)
    assert recipe.lighthouse.config().tile_size(data.seq_len) == 8192
    assert (data.seq_len, data.tokenizer, recipe.model.rope_theta) == (98304, "bytes", 1e4)
    assert data.batch_size * recipe.parallel.dp == 32  # 32 windows = 3.1M tokens per step
    assert check_recipe(recipe, world_size=recipe.parallel.world_size) == []
    assert count_parameters(recipe.model) == 530_117_632


def test_every_unknown_key_and_wrong_type_is_reported_at_once():
    data = _valid()
    data["model"]["hidden"] = 3
    data["model"]["dim"] = "wide"
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict({**data, "optimizer": {}}, ["optim.lrr=1"])
    lines = str(caught.value).splitlines()
    assert len(lines) == 4, lines
    assert any("unknown recipe key 'model.hidden'" in x for x in lines)
    assert any("recipe key model.dim: expected int, got str 'wide'" in x for x in lines)
    assert any("unknown recipe key 'optimizer'" in x for x in lines)
    assert any("unknown recipe key 'optim.lrr'" in x for x in lines)


@pytest.mark.parametrize(
    "text", ["run.name='x", "run.name=two words", 'run.name="x', "data.path=[a"]
)
def test_a_set_value_that_is_not_toml_is_an_error_with_the_quoting_hint(text):
    with pytest.raises(RecipeError, match=r"is not a TOML value; quote strings in single quotes"):
        recipe_from_dict(_valid(), [text])


def test_bare_words_and_paths_still_set_strings():
    recipe = recipe_from_dict(
        _valid(), ["data.source=files", "data.path=/data/c4.en-1", "run.name='two words'"]
    )
    assert (recipe.data.source, recipe.data.path, recipe.run.name) == (
        "files",
        "/data/c4.en-1",
        "two words",
    )


def test_each_violated_rule_is_listed_once(capsys):
    """An invalid [lighthouse] is one line, not again under every sequence length that uses it."""
    assert (
        main(
            [
                "plan",
                str(RECIPES / "quickstart.toml"),
                "--set",
                "lighthouse.tile_budget=7",
                "--set",
                "eval.passkey.length=1024",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.splitlines()
    assert sum("tile_budget must be even" in line for line in err) == 1, err


def test_missing_cuda_is_one_line_for_demo_and_train(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["demo", "--device", "cuda"]) == 2
    assert (
        main(
            [
                "train",
                str(RECIPES / "quickstart.toml"),
                "--set",
                "run.device='cuda'",
                "--set",
                "parallel.cp=1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(
        "lh-cp demo: error: --device cuda: torch sees no CUDA device"
    ) and "Traceback" not in "\n".join(err)
    assert err[1] == "lh-cp train: error: the recipe is not valid:"
    assert err[2].strip() == "run.device='cuda' but torch sees no CUDA device (use 'auto' or 'cpu')"


def test_stage_containing_counts_steps_from_one_and_keeps_overrun_in_the_last_stage():
    from lh_cp.train.recipe import stage_containing

    assert [stage_containing(step, [3, 2]) for step in (1, 3, 4, 5, 9)] == [0, 0, 1, 1, 1]
    assert stage_containing(1, [1]) == 0


def test_a_negative_stage_length_is_one_problem_not_three():
    """Rules on the total step count (warmup, profile step) wait for valid stage lengths."""
    recipe = recipe_from_dict(
        {
            "stages": [{"name": "a", "attention": "dense", "steps": -5}],
            "schedule": {"warmup_steps": 2},
        }
    )
    assert check_recipe(recipe, 1) == ["stages.0.steps must be >= 1, got -5"]
