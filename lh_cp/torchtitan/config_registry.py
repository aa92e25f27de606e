"""Configs for torchtitan's entry point: `-m torchtitan.train --module lh_cp.torchtitan --config NAME`.

torchtitan's ConfigManager imports this module (`<module>.config_registry`) and calls the
function named by --config; command-line flags then override any field. Each named config is
one stage of a two-stage run (lh_cp.torchtitan.named_recipes): `<name>` trains with Lighthouse
and saves a full checkpoint at its last step; `<name>_recovery` resumes from it (same
dump_folder) with every layer dense, continuing the optimizer, schedule and data position.

`from_recipe` converts an lh-cp recipe: LH_CP_RECIPE names the TOML file, LH_CP_STAGE the
stage (name or index; default the first) and LH_CP_SET optional recipe overrides
(`section.key=value`, separated by spaces, shell-quoted as needed), e.g.
`LH_CP_RECIPE=recipes/quickstart.toml LH_CP_STAGE=recovery torchrun ... --config from_recipe`.
`python -m lh_cp.torchtitan.convert RECIPE` prints these commands for every stage.
"""

from __future__ import annotations

import dataclasses as _dataclasses
import os as _os
import shlex as _shlex

from lh_cp.torchtitan import named_recipes as _named
from lh_cp.torchtitan.recipe_config import trainer_config_from_recipe as _from_recipe
from lh_cp.torchtitan.trainer import LighthouseTrainer
from lh_cp.train.recipe import Recipe as _Recipe
from lh_cp.train.recipe import load_recipe as _load_recipe


def _any_world_size(config: LighthouseTrainer.Config) -> LighthouseTrainer.Config:
    """Data-parallel sharding fills whatever GPUs the launch has (torchtitan's -1)."""
    parallelism = _dataclasses.replace(config.parallelism, data_parallel_shard_degree=-1)
    return _dataclasses.replace(config, parallelism=parallelism)


def lighthouse_debugmodel() -> LighthouseTrainer.Config:
    return _from_recipe(_named.debugmodel(), "lighthouse")


def lighthouse_debugmodel_recovery() -> LighthouseTrainer.Config:
    return _from_recipe(_named.debugmodel(), "recovery")


def lighthouse_270m() -> LighthouseTrainer.Config:
    return _any_world_size(_from_recipe(_named.llama3_270m(), "lighthouse"))


def lighthouse_270m_recovery() -> LighthouseTrainer.Config:
    return _any_world_size(_from_recipe(_named.llama3_270m(), "recovery"))


def lighthouse_530m() -> LighthouseTrainer.Config:
    return _any_world_size(_from_recipe(_named.llama3_530m(), "lighthouse"))


def lighthouse_530m_recovery() -> LighthouseTrainer.Config:
    return _any_world_size(_from_recipe(_named.llama3_530m(), "recovery"))


def from_recipe() -> LighthouseTrainer.Config:
    path = _os.environ.get("LH_CP_RECIPE")
    if not path:
        raise ValueError(
            "--config from_recipe reads the lh-cp recipe named by LH_CP_RECIPE, which is not set"
        )
    recipe: _Recipe = _load_recipe(path, _shlex.split(_os.environ.get("LH_CP_SET", "")))
    stage = _os.environ.get("LH_CP_STAGE", "0")
    return _from_recipe(recipe, int(stage) if stage.isdigit() else stage)
