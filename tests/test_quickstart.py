"""The quickstart end to end, shortened: torchrun with 2 gloo processes (CP=2) runs both
stages and the passkey evaluation from recipes/quickstart.toml; the same run in one process
(CP=1) gives the same losses.

Tolerance of the CP=2 vs one-process comparison: the first step's loss is the same batch
through the same weights, so only float32 summation order differs (<= 1e-5 relative). Later
steps go through AdamW updates computed from gradients that differ at that level, which
AdamW's per-parameter normalisation can amplify; 1e-3 relative over 7 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_utils import free_port
from train_utils import logged_losses

from lh_cp.train.checkpoint import complete_checkpoints
from lh_cp.train.recipe import load_recipe
from lh_cp.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    "data.seq_len=512",
    "stages.0.steps=4",
    "stages.1.steps=3",
    "schedule.warmup_steps=2",
    "metrics.log_interval=1",
    "checkpoint.interval=0",
    "eval.val_interval=0",
    "eval.val_batches=1",
    "metrics.peak_tflops=1.0",
    "eval.passkey.depths=[0.5]",
    "eval.passkey.samples=1",
    "eval.passkey.digits=2",
    "eval.passkey.length=256",
]


@pytest.mark.timeout(300)
def test_short_quickstart_under_torchrun_then_cp_equals_one_process(tmp_path):
    out = tmp_path / "quickstart"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "lh_cp.cli",
        "train",
        str(ROOT / "recipes" / "quickstart.toml"),
        "--set",
        f"run.out_dir='{out}'",
    ] + [arg for item in SHORT for arg in ("--set", item)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=280,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    console = result.stdout
    assert (
        "stage 1/2 'lighthouse'" in console
        and "stage 2/2 'recovery': dense attention from step 5" in console
    )
    assert "passkey retrieval at 256 tokens (dense attention)" in console
    assert sorted(complete_checkpoints(out / "checkpoints")) == [4, 7]
    losses = logged_losses(out)
    assert sorted(losses) == list(range(1, 8)) and losses[7] < losses[1]
    assert sorted(logged_losses(out, "val")) == [4, 7]
    # Under CP too: both validation losses at every validation, the leak metric in the Lighthouse stage.
    assert sorted(logged_losses(out, "val", "val/loss_dense")) == [4, 7]
    assert sorted(logged_losses(out, "val", "val/leak_next_token_nats")) == [4]
    assert "dense-mode" in console and "leak: next token" in console
    assert json.loads((out / "passkey.json").read_text())["accuracy_by_depth"].keys() == {"0.5"}
    assert console.count("[quickstart] step ") >= 7  # rank 0 only: one line per logged step

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process has (OMP_NUM_THREADS=1)
    try:
        one_process = train(
            load_recipe(
                ROOT / "recipes" / "quickstart.toml",
                SHORT
                + [
                    "parallel.cp=1",
                    f"run.out_dir='{tmp_path / 'single'}'",
                    "eval.passkey.enabled=false",
                ],
            )
        )
    finally:
        torch.set_num_threads(threads)
    assert one_process.train_loss[1] == pytest.approx(losses[1], rel=1e-5)
    for step in range(2, 8):
        assert one_process.train_loss[step] == pytest.approx(losses[step], rel=1e-3), step
