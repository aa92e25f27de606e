"""Shared pieces of the training tests: a small local corpus and a tiny two-stage recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lh_cp.train.recipe import Recipe, recipe_from_dict


def write_corpus(folder: Path, files: int = 24, lines: int = 60) -> Path:
    """Deterministic .txt documents (Python-like lines) under `folder`; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        body = "".join(
            f"def fn_{f}_{i}(x):\n    return x * {i} + {f}  # line {i}\n" for i in range(lines)
        )
        (folder / f"doc_{f:03d}.txt").write_text(body)
    return folder


def tiny_recipe_dict(
    out_dir: Path, corpus: Path, lighthouse_steps: int = 4, dense_steps: int = 2
) -> dict:
    """A two-stage recipe small enough to run a step in a fraction of a second on one CPU."""
    return {
        "run": {"name": "tiny", "out_dir": str(out_dir), "seed": 3, "device": "cpu"},
        "model": {
            "vocab_size": 258,
            "dim": 64,
            "n_layers": 5,
            "n_heads": 4,
            "n_kv_heads": 2,
            "ffn_dim": 128,
        },
        "lighthouse": {
            "pool": 2,
            "levels": 2,
            "topk": 8,
            "tile_budget": 4,
            "dense_layers": [0, -1],
        },
        "data": {
            "source": "files",
            "path": str(corpus),
            "format": "text",
            "seq_len": 128,
            "batch_size": 2,
            "validation_fraction": 0.3,
        },
        "optim": {"lr": 2e-3},
        "schedule": {"warmup_steps": 2, "decay": "cosine"},
        "stages": [
            {"name": "lighthouse", "attention": "lighthouse", "steps": lighthouse_steps},
            {"name": "recovery", "attention": "dense", "steps": dense_steps},
        ],
        "checkpoint": {"interval": 0, "keep_last": 2},
        "metrics": {"log_interval": 1, "peak_tflops": 1.0},
        "eval": {"val_batches": 1},
    }


def tiny_recipe(out_dir: Path, corpus: Path, overrides: list[str] = (), **kwargs) -> Recipe:
    return recipe_from_dict(tiny_recipe_dict(out_dir, corpus, **kwargs), list(overrides))


def logged_losses(out_dir: Path, kind: str = "train", key: str = "") -> dict[int, float]:
    """Step -> value of `key` from a run's metrics.jsonl lines of `kind` (the trainer keeps one
    line per step). Without `key`, '<kind>/loss', which every line of the kind must hold; an
    explicit key is read from the lines that hold it."""
    losses = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == kind and (not key or key in record):
            losses[record["step"]] = record[key or f"{kind}/loss"]
    return losses


def write_toml(path: Path, data: dict) -> None:
    """Enough TOML for the test recipes: tables, arrays of tables, scalars and lists."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = []
    for section, body in data.items():
        tables = body if isinstance(body, list) else [body]
        for table in tables:
            lines.append(f"[[{section}]]" if isinstance(body, list) else f"[{section}]")
            lines.extend(f"{k} = {value(v)}" for k, v in table.items())
    path.write_text("\n".join(lines) + "\n")


def torchrun_command(args: list[str], processes: int = 2) -> list[str]:
    """torchrun on 127.0.0.1 with a free port, `processes` ranks, running `args` (a module
    invocation such as ['-m', 'lh_cp.cli', 'train', ...] or a script path and its arguments)."""
    from dist_utils import free_port

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(processes),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        *args,
    ]


def torchrun_train(
    recipe_file: Path, out: Path, overrides: list[str], check: bool = True, timeout: float = 280
) -> subprocess.CompletedProcess:
    """`lh-cp train` on 2 torchrun processes (one intra-op thread each); with `check` the run
    must succeed (its output tail is the assertion message)."""
    command = torchrun_command(
        ["-m", "lh_cp.cli", "train", str(recipe_file), "--set", f"run.out_dir='{out}'"]
        + [arg for item in overrides for arg in ("--set", item)]
    )
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=out.parent,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result
