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
    proc = subprocess.run(
        ["bash", str(REPO / "launch/run.sh")], env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "set RECIPE" in proc.stderr


@pytest.mark.parametrize(
    "script, env",
    [
        ("launch/run.sh", {"NGPU": "3"}),
        ("launch/multinode.sh", {"NNODES": "2", "NGPU": "2", "RDZV_HOST": "127.0.0.1"}),
    ],
)
def test_a_bad_recipe_is_one_message_before_any_rank_starts(script, env):
    """The launchers run `lh-cp plan --world-size N` first: quickstart needs 2 processes, so 3
    (or 2 nodes x 2) is refused with one line per rule, exit 2, and torchrun never starts."""
    environment = {
        **os.environ,
        **env,
        "RECIPE": "recipes/quickstart.toml",
        "PATH": os.environ.get("PATH", ""),
    }
    proc = subprocess.run(
        ["bash", str(REPO / script)],
        env=environment,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("must equal the number of processes") == 1, proc.stderr
    assert "torch.distributed" not in proc.stderr and "Traceback" not in proc.stderr


def test_launchers_find_the_checkout_venv_and_honour_python(tmp_path):
    """launch/env.sh picks the checkout's .venv/bin/python, or PYTHON when set."""
    probe = 'source launch/env.sh; echo "$PYTHON"'
    found = subprocess.run(
        ["bash", "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    venv = REPO / ".venv" / "bin" / "python"
    assert found == (str(venv) if venv.exists() else "python3")
    chosen = subprocess.run(
        ["bash", "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHON": "/opt/my/python"},
    ).stdout.strip()
    assert chosen == "/opt/my/python"


def test_version():
    proc = subprocess.run(
        [sys.executable, "-m", "lh_cp.cli", "--version"], capture_output=True, text=True, check=True
    )
    import torch

    import lh_cp

    assert proc.stdout.strip() == f"lh-cp {lh_cp.__version__} (torch {torch.__version__})"


@pytest.mark.timeout(300)
def test_two_torchrun_agents_run_cp_check():
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        NNODES="2",
        NGPU="2",
        RDZV_HOST="127.0.0.1",
        RDZV_PORT=str(free_port()),
        RDZV_ID=f"lh-cp-test-{os.getpid()}",
        PROGRAM=str(REPO / "launch/cp_check.py"),
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
    )
    agents = [
        subprocess.Popen(
            ["bash", str(REPO / "launch/multinode.sh")],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + 240
    try:
        outputs = [
            agent.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for agent in agents
        ]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    log = "\n".join(outputs)
    assert all(agent.returncode == 0 for agent in agents), log[-4000:]
    assert "cp_check passed: W=4" in log, log[-4000:]
