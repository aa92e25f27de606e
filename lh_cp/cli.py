"""The `lh-cp` command line: a thin layer over the library (subcommands grow with it)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lh_cp.ops.config import LighthouseConfig

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="time one Lighthouse layer against dense attention and check it"
    )
    p.add_argument("--n", type=int, default=16384, help="sequence length in tokens")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--kv-heads", type=int, default=None, help="key/value heads (GQA); default = heads"
    )
    p.add_argument("--dim", type=int, default=64, help="head dimension")
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--topk", type=int, default=256)
    p.add_argument("--tile-budget", type=int, default=32)
    p.add_argument(
        "--selection",
        choices=("tile_topk", "causal"),
        default="tile_topk",
        help="tile_topk: the paper's; causal: no output reads a later token (docs/LIGHTHOUSE.md s.11)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)


def _run_demo(args) -> int:
    from lh_cp.demo import format_demo, run_demo

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {args.device}: torch sees no CUDA device here (torch {torch.__version__}); "
            f"use --device cpu"
        )
    cfg = LighthouseConfig(
        pool=args.pool,
        levels=args.levels,
        topk=args.topk,
        tile_budget=args.tile_budget,
        selection=args.selection,
    )
    cfg.tile_size(args.n)
    dtype = DTYPES[args.dtype]
    result = run_demo(
        args.n,
        args.heads,
        args.kv_heads or args.heads,
        args.dim,
        cfg,
        dtype,
        args.device,
        args.repeats,
        args.seed,
    )
    print(format_demo(result, cfg, dtype, args.device))
    return 0


def _add_recipe_command(subparsers, name: str, help_text: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=help_text)
    p.add_argument("recipe", help="recipe TOML file (see recipes/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one recipe value (TOML syntax; repeatable), "
        "e.g. --set data.seq_len=2048 --set stages.1.steps=10",
    )
    return p


def _run_plan(args) -> int:
    import os

    from lh_cp.train.plan import (
        check_recipe,
        format_plan,
        host_memory_problems,
        machine_memory_bytes,
        plan_numbers,
    )
    from lh_cp.train.recipe import load_recipe
    from lh_cp.train.storage import checkpoint_space, output_problems

    recipe = load_recipe(args.recipe, args.overrides)
    world = args.world_size or (
        int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    )
    errors = check_recipe(recipe, world) + output_problems(recipe)
    host_memory = (
        int(args.host_memory_gib * 2**30) if args.host_memory_gib else machine_memory_bytes()
    )
    ranks_per_node = args.ranks_per_node or int(
        os.environ.get("LOCAL_WORLD_SIZE", world or recipe.parallel.world_size)
    )
    errors += host_memory_problems(recipe, host_memory, ranks_per_node)
    if errors:
        print(f"recipe {args.recipe}: {len(errors)} problem(s)", file=sys.stderr)
        for error in errors:
            print(f"  - {error}", file=sys.stderr)
        return 2
    print(format_plan(recipe, plan_numbers(recipe)))
    space, short = checkpoint_space(recipe)
    print(f"  {'warning: too little space: ' if short else ''}{space}")
    return 0


def _run_train(args) -> int:
    from lh_cp.train.recipe import load_recipe
    from lh_cp.train.trainer import train

    train(load_recipe(args.recipe, args.overrides))
    return 0


def _run_plot(args) -> int:
    from lh_cp.train.plot import plot_losses

    print(f"wrote {plot_losses(args.logdir, args.output)}")
    return 0


def _add_export(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write the trained dense model as a Hugging Face folder (LlamaForCausalLM)"
    )
    p.add_argument(
        "checkpoint",
        help="a step folder, a checkpoints folder or a run folder (its newest verifying checkpoint)",
    )
    p.add_argument(
        "--hf",
        required=True,
        metavar="OUT_DIR",
        help="folder to write config.json, model.safetensors and the tokenizer to",
    )
    p.add_argument(
        "--recipe", default=None, help="the run's recipe, for checkpoints written before manifests"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="recipe overrides, with --recipe",
    )
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument(
        "--allow-lighthouse-stage",
        action="store_true",
        help="export a checkpoint from inside a Lighthouse stage (not a dense model: see docs/quality.md)",
    )


def _run_export(args) -> int:
    from lh_cp.export import export_hf
    from lh_cp.train.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides) if args.recipe else None
    folder = export_hf(
        Path(args.checkpoint), Path(args.hf), recipe, args.dtype, args.allow_lighthouse_stage
    )
    print(
        f"wrote {args.hf} from {folder} (transformers.AutoModelForCausalLM.from_pretrained({str(args.hf)!r}))"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    from lh_cp import __version__

    parser = argparse.ArgumentParser(prog="lh-cp", description=__doc__)
    parser.add_argument(
        "--version", action="version", version=f"lh-cp {__version__} (torch {torch.__version__})"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_demo(subparsers)
    _add_recipe_command(subparsers, "train", "train a recipe (alone, or one rank under torchrun)")
    plan = _add_recipe_command(
        subparsers, "plan", "check a recipe and print tile size, S, ranks, tokens and memory"
    )
    plan.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="check against this many processes (default: $WORLD_SIZE if set)",
    )
    plan.add_argument(
        "--host-memory-gib",
        type=float,
        default=None,
        help="host memory of the machine to plan for, for the pinned memory of "
        "parallel.offload_activations (default: this machine's, from /proc/meminfo)",
    )
    plan.add_argument(
        "--ranks-per-node",
        type=int,
        default=None,
        help="ranks sharing one machine's host memory (default: $LOCAL_WORLD_SIZE if set, "
        "else every rank of the run)",
    )
    plot = subparsers.add_parser(
        "plot", help="PNG of train/validation loss from a run's TensorBoard logs, stages marked"
    )
    plot.add_argument(
        "logdir", help="TensorBoard folder of a run (e.g. runs/quickstart/tensorboard)"
    )
    plot.add_argument("--output", default=None, help="PNG path (default: <logdir>/../loss.png)")
    _add_export(subparsers)
    args = parser.parse_args(argv)
    commands = {
        "demo": _run_demo,
        "plan": _run_plan,
        "train": _run_train,
        "plot": _run_plot,
        "export": _run_export,
    }
    # Errors in what the user gave (recipe, paths, data, missing packages) print one message;
    # any other exception during training keeps its traceback.
    if args.command == "train":
        return _train_with_errors(args, argv if argv is not None else sys.argv[1:])
    user_errors = (ValueError, FileNotFoundError, ImportError, KeyError)
    try:
        return commands[args.command](args)
    except user_errors as err:
        print(f"lh-cp {args.command}: error: {err}", file=sys.stderr)
        return 2


QUIET_RANK_WAIT_S = 2.0  # lets torchrun name the rank that printed as the root cause


def say(line: str) -> None:
    """One line to stderr in one write: every rank of a job may say its line at the same moment
    into the same pipe, and print's two writes (the text, then the newline) would interleave
    them ("...resumelh-cp train: rank 0 ..."); a write of under 4 KiB into a pipe is atomic."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _train_with_errors(args, argv: list[str]) -> int:
    """`lh-cp train` with its errors as one line each. Errors every rank of a node meets alike
    (the recipe, its data files, the run folder, missing packages, a checkpoint that does not
    fit) are printed by each node's first rank (LOCAL_RANK 0); the node's other ranks exit
    quietly with the same code, a moment later. Errors of one rank's own (a failed save, a
    non-finite step, an interruption) are printed by every rank that has them."""
    import os
    import shlex
    import time

    from lh_cp.data.corpus import DataError
    from lh_cp.parallel.watchdog import EXIT_CODE as LAUNCHER_LOST_EXIT
    from lh_cp.parallel.watchdog import LauncherLost
    from lh_cp.train.checkpoint import CheckpointWriteError
    from lh_cp.train.engines import NonFiniteStep
    from lh_cp.train.recipe import RecipeError
    from lh_cp.train.runlock import RunFolderLocked
    from lh_cp.train.trainer import TrainingInterrupted

    alike = (RecipeError, FileNotFoundError, ImportError, DataError, RunFolderLocked)
    try:
        return _run_train(args)
    except alike as err:
        if os.environ.get("LOCAL_RANK", "0") != "0":
            time.sleep(QUIET_RANK_WAIT_S)
            return 2
        say(f"lh-cp train: error: {err}")
        return 2
    except (NonFiniteStep, CheckpointWriteError) as err:
        say(f"lh-cp train: error: {err}")
        return 2
    except LauncherLost as err:
        say(f"lh-cp train: {err}")
        return LAUNCHER_LOST_EXIT
    except (TrainingInterrupted, KeyboardInterrupt) as err:
        what = err if isinstance(err, TrainingInterrupted) else "interrupted while starting"
        command = f"lh-cp {shlex.join(argv)}"
        under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        say(
            f"lh-cp train: {what}"
            + (f" (each rank ran: {command})" if under_torchrun else f": {command}")
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
