"""launch/: two torchrun agents on 127.0.0.1 (--nnodes 2 --nproc-per-node 2, c10d rendezvous on
a free port) form a 4-rank gloo job through launch/multinode.sh; launch/cp_check.py runs CP
Lighthouse and dense attention forward/backward there and exits 0 only if every rank matches
the single-process result to 1e-9 (float64). The other launch scripts are syntax-checked."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_utils import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["launch/run.sh", "launch/multinode.sh", "launch/slurm.sbatch"])
def test_launch_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


def test_run_sh_requires_recipe():
    env = {k: v for k, v in os.environ.items() if k != "RECIPE"}
    proc = subprocess.run(["bash", str(REPO / "launch/run.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "set RECIPE" in proc.stderr


@pytest.mark.timeout(300)
def test_two_torchrun_agents_run_cp_check():
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        NNODES="2", NGPU="2", RDZV_HOST="127.0.0.1", RDZV_PORT=str(free_port()),
        RDZV_ID=f"lh-cp-test-{os.getpid()}", PROGRAM=str(REPO / "launch/cp_check.py"),
        OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
    )
    agents = [
        subprocess.Popen(
            ["bash", str(REPO / "launch/multinode.sh")], cwd=REPO, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + 240
    try:
        outputs = [agent.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    log = "\n".join(outputs)
    assert all(agent.returncode == 0 for agent in agents), log[-4000:]
    assert "cp_check passed: W=4" in log, log[-4000:]
