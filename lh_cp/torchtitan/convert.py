"""`python -m lh_cp.torchtitan.convert RECIPE [--set key=value ...] [--nproc N] [--json]`.

Converts an lh-cp recipe into torchtitan trainer configs, one per stage, checks each (the
same checks torchtitan's ConfigManager runs through LighthouseTrainer.Config), and prints the
command that runs each stage under torchtitan's own entry point, plus what the conversion
could not carry over. --json prints the stage configs (torchtitan's to_dict) instead.
`--set` overrides are recipe overrides (as for `lh-cp train`); the printed commands carry them
in LH_CP_SET.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from lh_cp.torchtitan.recipe_config import UNMAPPED, trainer_config_from_recipe
from lh_cp.train.recipe import load_recipe


def stage_command(recipe_path: str, stage_name: str, nproc: int, overrides: list[str] = ()) -> str:
    env = f"LH_CP_RECIPE={shlex.quote(recipe_path)} LH_CP_STAGE={shlex.quote(stage_name)}"
    if overrides:
        env += f" LH_CP_SET={shlex.quote(shlex.join(overrides))}"
    return (
        f"{env} torchrun --standalone --nproc-per-node {nproc} "
        f"-m torchtitan.train --module lh_cp.torchtitan --config from_recipe"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lh_cp.torchtitan.convert", description=__doc__.splitlines()[2]
    )
    parser.add_argument("recipe", help="lh-cp recipe TOML")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override (repeatable)",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=0,
        help="processes per node in the printed commands (default: the recipe's world size)",
    )
    parser.add_argument("--json", action="store_true", help="print the stage configs as JSON")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.set)
    configs = {
        stage.name: trainer_config_from_recipe(recipe, index)
        for index, stage in enumerate(recipe.stages)
    }
    if not configs:
        raise ValueError(f"{args.recipe} has no [[stages]]")
    if args.json:
        print(
            json.dumps(
                {name: cfg.to_dict() for name, cfg in configs.items()}, indent=2, default=str
            )
        )
        return 0
    nproc = args.nproc or recipe.parallel.world_size
    for name, cfg in configs.items():
        print(
            f"# stage {name!r}: {cfg.stage.attention} attention, global steps "
            f"{cfg.stage.resume_step + 1}..{cfg.training.steps}, dump_folder {cfg.dump_folder}"
        )
        print(stage_command(args.recipe, name, nproc, args.set))
    print("# not carried over: " + "; ".join(UNMAPPED))
    return 0


if __name__ == "__main__":
    sys.exit(main())
