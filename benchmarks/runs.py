"""`lh-cp train` in a fresh process, and the metrics it leaves: shared by the benchmarks that
train (train_h100.py, quality.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (one per logged step and validation), [] if none yet."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def train(
    recipe: str,
    run_dir: Path,
    sets: list[str],
    timeout: float,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> tuple[float, int, str]:
    """Run `lh-cp train RECIPE --set run.out_dir=RUN_DIR --set ...` from the repository root;
    returns (wall seconds, exit code, the output's tail). With `log`, the whole output is
    written there as it comes (the tail is read back from it)."""
    cmd = [
        sys.executable,
        "-m",
        "lh_cp.cli",
        "train",
        str(REPO / recipe),
        "--set",
        f"run.out_dir='{run_dir}'",
    ]
    for item in sets:
        cmd += ["--set", item]
    begin = time.perf_counter()
    environment = {**os.environ, **(env or {})}
    try:
        if log is None:
            done = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=environment
            )
            code, out = done.returncode, done.stdout + done.stderr
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a") as handle:
                code = subprocess.run(
                    cmd,
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    timeout=timeout,
                    cwd=REPO,
                    env=environment,
                ).returncode
            out = log.read_text()
    except subprocess.TimeoutExpired as err:
        code, out = 124, f"timeout after {timeout:.0f} s: {(err.stdout or b'')[-2000:]!r}"
    return time.perf_counter() - begin, code, out[-3000:]
