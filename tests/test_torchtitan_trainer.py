"""torchtitan's own Trainer runs both stages of lighthouse_debugmodel (CPU, one process).

Stage 1 (Lighthouse) trains steps 1..3 and saves a full checkpoint; stage 2 (recovery)
resumes it at step 4 with every layer dense and trains to step 5 (the learning-rate schedule
spans both). The Trainer assumes an accelerator; torchtitan_trainer_run.py gives it a CPU
stand-in for the device module and nothing else (torch >= 2.14 has set_timeout, which 0.3.0 calls).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "torchtitan", reason="torchtitan is not installed (pip install 'lh-cp[torchtitan]')"
)
if not hasattr(__import__("torch.distributed").distributed, "set_timeout"):
    pytest.fail(
        "torchtitan 0.3.0's Trainer needs torch.distributed.set_timeout (torch >= 2.14, as lh-cp[torchtitan] "
        "requires); this torch lacks it",
        pytrace=False,
    )

from dist_utils import free_port  # noqa: E402

RUNNER = Path(__file__).resolve().parent / "torchtitan_trainer_run.py"
SCHEDULE = ["--lr_scheduler.total_steps", "5", "--checkpoint.interval", "3"]


def _run(stage: str, dump: Path, data: Path, *flags: str) -> dict:
    env = dict(
        os.environ,
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
    )
    done = subprocess.run(
        [sys.executable, str(RUNNER), stage, str(dump), str(data), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_lighthouse_stage_then_recovery_through_torchtitan_trainer(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(12):
        (data / f"doc{i}.txt").write_text(f"def f{i}(x):\n    return x * {i}\n" * 60)
    dump = tmp_path / "run"
    first = _run("lighthouse_debugmodel", dump, data, "--training.steps", "3", *SCHEDULE)
    assert first["step"] == 3 and first["finite"] and len(first["losses"]) == 3
    assert first["modes"] == ["dense", "dense", "lighthouse", "lighthouse", "dense", "dense"]
    assert (dump / "checkpoint" / "step-3").is_dir()
    second = _run(
        "lighthouse_debugmodel_recovery",
        dump,
        data,
        "--training.steps",
        "5",
        "--stage.resume_step",
        "3",
        *SCHEDULE,
    )
    assert (
        second["step"] == 5 and second["finite"] and len(second["losses"]) == 2
    )  # steps 4 and 5 only
    assert second["modes"] == ["dense"] * 6
