"""Faults: ranks that disagree, a rank that stops, inputs that are not finite.

- Every rank of a CP group must call attention with the same shapes, dtype, configuration
  and documents, and with finite inputs: on every call, a rank that does not makes every rank
  raise the same named error before the first collective (a mismatch would otherwise hang in
  the exchange or abort inside gloo naming nothing).
- Ranks that run different recipes stop at start, naming the first differing key.
- A rank stopped with SIGSTOP ends the job through the watchdog within about
  parallel.timeout_s / 2, with a message naming the rank and its last step (the collective
  timeout alone would wait the whole timeout and name nobody).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from train_utils import logged_losses, tiny_recipe_dict, torchrun_command, write_corpus, write_toml

from lh_cp.train.checkpoint import checkpoint_path, verify_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_ranks_agree_on_every_call_or_all_raise_the_same_named_error(tmp_path):
    """tests/agreement_calls.py under torchrun: after a successful call, one rank changes one
    thing per call (the shape, the dtype, the selection alone, topk alone, the exchange, the
    head count of a dense call, an empty batch, the documents' contents) or puts a NaN into q
    or v; every rank raises the same named error before any exchange, and a last good call
    still works (no gloo abort, no wait for the timeout)."""
    command = torchrun_command([str(Path(__file__).with_name("agreement_calls.py")), str(tmp_path)])
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=100,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1], ranks  # the same outcome, word for word, on every rank
    seen = ranks[0]
    assert seen["good"] == seen["good_again"] == "ok"
    expected = {
        "shape_after_success": "RanksDisagree: ",
        "dtype": "(q.dtype: rank 1 'torch.float64', rank 0 'torch.float32'",
        "selection_only": "(cfg.selection: rank 1 'causal', rank 0 'tile_topk');",
        "topk_only": "(cfg.topk: rank 1 16, rank 0 8);",
        "exchange_only": "(exchange: rank 1 'ring', rank 0 'allgather');",
        "nan_in_q": "NonFiniteInput: Lighthouse attention needs finite inputs: NaN or inf in q on rank 1 of the 2",
        "nan_in_v_causal_selection": "NaN or inf in v on rank 1 of the 2 ranks",
        "dense_heads": "call dense causal attention with different inputs (q.shape: rank 1 "
        "(1, 32, 1, 8), rank 0 (1, 32, 2, 8))",
        "empty_batch_one_rank": "(q.shape: rank 1 (0, 32, 2, 8), rank 0 (1, 32, 2, 8);",
        "empty_batch_every_rank": "EmptyInput: q has shape (0, 32, 2, 8) with B=0",
        "documents": "(documents (contents): rank 1 [0, 16, 64], rank 0 [0, 24, 64])",
    }
    for case, text in expected.items():
        assert text in seen[case], (case, seen[case])
    assert "q.shape: rank 1 (1, 16, 2, 8), rank 0 (1, 32, 2, 8)" in seen["shape_after_success"]


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults")
    corpus = write_corpus(folder / "corpus")
    data = tiny_recipe_dict(folder / "unused", corpus, lighthouse_steps=300, dense_steps=2)
    data["lighthouse"]["topk"] = 16  # CP=2: chunks of 32 tokens hold whole tiles
    data["parallel"] = {"cp": 2, "timeout_s": 20}
    data["data"]["max_epochs"] = 0.0  # this long run may pass over the tiny corpus several times
    path = folder / "tiny.toml"
    write_toml(path, data)
    return path


@pytest.mark.timeout(200)
def test_ranks_with_different_recipes_stop_at_start_naming_the_key(recipe_file, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(
        textwrap.dedent(f"""
        import os, sys
        from lh_cp.cli import main
        seq = "128" if os.environ["RANK"] == "0" else "256"
        sys.exit(main(["train", {str(recipe_file)!r}, "--set", "run.out_dir='{tmp_path / "out"}'",
                       "--set", "data.seq_len=" + seq]))
    """)
    )
    result = subprocess.run(
        torchrun_command([str(driver)]),
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    assert (
        "the ranks disagree on the run before it starts: rank 1 has data.seq_len=256, rank 0 has "
        "data.seq_len=128"
    ) in result.stderr, result.stderr[-3000:]
    # One line: rank 0 prints it, rank 1 (the same error) exits quietly; no rank's traceback.
    assert result.stderr.count("lh-cp train: error:") == 1, result.stderr[-3000:]
    assert "[rank0]:" not in result.stderr and "[rank1]:" not in result.stderr


def _worker_pid(tag: str, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` whose environment carries LH_CP_TEST_TAG=tag."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            f"LH_CP_TEST_TAG={tag}".encode() in environ
            and f"RANK={rank}".encode() in environ
            and b"LOCAL_RANK=" + str(rank).encode() in environ
        ):
            return int(entry.name)
    return None


@pytest.mark.timeout(240)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker through /proc")
def test_a_stopped_rank_ends_the_job_naming_it(recipe_file, tmp_path):
    out, tag = tmp_path / "run", uuid.uuid4().hex
    command = torchrun_command(
        ["-m", "lh_cp.cli", "train", str(recipe_file), "--set", f"run.out_dir='{out}'"]
    )
    job = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "LH_CP_TEST_TAG": tag},
    )
    stopped = None
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and job.poll() is None:
            if (out / "metrics.jsonl").is_file() and len(logged_losses(out)) >= 3:
                stopped = _worker_pid(tag, 1)
                if stopped:
                    os.kill(stopped, signal.SIGSTOP)
                    break
            time.sleep(0.2)
        assert stopped is not None, "rank 1 never trained 3 steps or was not found"
        began = time.monotonic()
        _, stderr = job.communicate(timeout=150)
        waited = time.monotonic() - began
    finally:
        if stopped:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(stopped, sig)
                except ProcessLookupError:
                    pass
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode != 0
    assert "rank 1 has sent no heartbeat for" in stderr and "it was working on step" in stderr, (
        stderr[-3000:]
    )
    assert "watchdog limit 10 s = parallel.timeout_s / 2" in stderr
    # The watchdog fired near its 10 s limit; torchrun's own teardown of the stopped rank adds
    # up to its 30 s grace period before SIGKILL.
    assert waited < 75, waited


def test_a_stale_deepspeed_build_lock_is_refused_with_its_path(tmp_path, monkeypatch):
    """Up to torch 2.13 a killed run leaves torch's extension build lock file behind, and
    DeepSpeed's CPU op build would wait on it forever; the trainer names the file instead. A
    fresh lock (a build running now) and no lock pass; where the file does not block (torch
    2.14's advisory lock leaves it on disk after every build) nothing is refused."""
    from torch.utils.cpp_extension import _get_build_directory

    import lh_cp.train.runtime as runtime

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(runtime, "LOCK_FILE_BLOCKS", True)
    op = runtime.DEEPSPEED_CPU_OP
    runtime.check_extension_lock(op)  # no lock
    lock = Path(_get_build_directory(op, verbose=False)) / "lock"
    lock.write_text("")
    runtime.check_extension_lock(op)  # a build running now
    stale = lock.stat().st_mtime + runtime.STALE_LOCK_S + 60
    with pytest.raises(RuntimeError, match=f"{lock} has existed for 11 min"):
        runtime.check_extension_lock(op, now=stale)
    monkeypatch.setattr(runtime, "LOCK_FILE_BLOCKS", False)
    runtime.check_extension_lock(op, now=stale)


def test_which_torch_versions_block_on_the_lock_file():
    """torch 2.13.0 waits on the file (torch.utils.file_baton), 2.14.1 on an advisory lock."""
    import inspect

    from torch.utils import cpp_extension

    from lh_cp.train.runtime import LOCK_FILE_BLOCKS

    source = inspect.getsource(cpp_extension._jit_compile)
    assert LOCK_FILE_BLOCKS == ("FileBaton(" in source), (torch.__version__, LOCK_FILE_BLOCKS)


def _start(command: list[str], tag: str) -> subprocess.Popen:
    """A torchrun job in its own session (so a signal can reach its whole process group), its
    workers tagged with LH_CP_TEST_TAG=tag."""
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "LH_CP_TEST_TAG": tag},
    )


def _wait_for_steps(out: Path, steps: int, job: subprocess.Popen, limit: float = 150) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and job.poll() is None:
        if (out / "metrics.jsonl").is_file() and len(logged_losses(out)) >= steps:
            return
        time.sleep(0.2)
    job.kill()
    raise AssertionError(f"the job did not reach step {steps}: {job.communicate()[1][-3000:]}")


def _end(job: subprocess.Popen) -> None:
    if job.poll() is None:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()


@pytest.mark.timeout(300)
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers through /proc")
def test_one_job_per_run_folder_a_lost_launcher_then_resume_and_ctrl_c(recipe_file, tmp_path):
    """Job A (torchrun, 2 ranks) owns the run folder: its rank 0 holds the one lock. Job B on
    the same folder stops with one line naming A, and A's checkpoints and metrics stay its own.
    A's torchrun agent is killed: both ranks save, stop at the same step with one line each
    and release the lock. Job C finds a stale lock (a dead pid on this host) and an unfinished
    save: it takes the lock over, removes the .partial folder, resumes; Ctrl-C (SIGINT to the
    whole process group, as a terminal sends it) ends it with one line per rank naming the
    step it was on and the checkpoint to resume from."""
    out, tags = tmp_path / "run", (uuid.uuid4().hex, uuid.uuid4().hex)
    train = ["-m", "lh_cp.cli", "train", str(recipe_file), "--set", f"run.out_dir='{out}'"]
    train += ["--set", "checkpoint.interval=2"]
    first = _start(torchrun_command(train), tags[0])
    try:
        _wait_for_steps(out, 3, first)
        owner = json.loads((out / "lh-cp.lock").read_text())
        assert sorted(p.name for p in out.glob("lh-cp.lock*")) == ["lh-cp.lock"]  # one per job
        assert owner["pid"] == _worker_pid(tags[0], 0) and owner["job"].startswith("torchrun ")
        before = logged_losses(out)
        second = subprocess.run(
            torchrun_command(train),
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        assert second.returncode != 0
        refused = [line for line in second.stderr.splitlines() if line.startswith("lh-cp train")]
        assert refused == [
            f"lh-cp train: error: run.out_dir {out} is in use by job {owner['job']} (host "
            f"{owner['host']}, pid {owner['pid']}, started {owner['started']}) (lock "
            f"{out / 'lh-cp.lock'}); use another run.out_dir, or stop that job first"
        ], second.stderr[-3000:]
        assert all(logged_losses(out)[step] == loss for step, loss in before.items())
        os.kill(first.pid, signal.SIGKILL)  # the torchrun agent, which holds the job's store
        _, stderr = first.communicate(timeout=120)  # returns once both workers have exited
    finally:
        _end(first)
    lost = re.findall(r"lh-cp train: rank (\d) lost contact with the job's launcher: .*", stderr)
    assert sorted(lost) == ["0", "1"], stderr[-3000:]
    assert f"its process (pid {first.pid}, this rank's parent) has ended" in stderr
    saved = int(re.search(r"every rank saved step (\d+)", stderr).group(1))
    assert "Traceback" not in stderr and _worker_pid(tags[0], 0) is None
    checkpoints = out / "checkpoints"
    assert verify_checkpoint(checkpoint_path(checkpoints, saved)).ok
    assert sorted(logged_losses(out)) == list(range(1, saved + 1))
    assert not (out / "lh-cp.lock").exists()  # released on the way out

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = {"host": socket.gethostname(), "pid": dead.pid, "pid_started": "", "job": "torchrun x"}
    (out / "lh-cp.lock").write_text(json.dumps({**stale, "started": "earlier"}))
    partial = checkpoints / f"step_{saved + 1:08d}.partial"
    shutil.copytree(checkpoint_path(checkpoints, saved), partial)
    third = _start(torchrun_command(train), tags[1])
    try:
        _wait_for_steps(out, saved + 2, third)
        os.killpg(third.pid, signal.SIGINT)
        stdout, stderr = third.communicate(timeout=120)
    finally:
        _end(third)
    assert f"took over the run folder lock {out / 'lh-cp.lock'} of job torchrun x" in stdout
    assert f"pid {dead.pid} on this host has ended" in stdout
    assert f"removed {partial}, an unfinished save of an earlier invocation" in stdout
    assert f"resumed from step {saved}" in stdout and not partial.exists()
    interrupted = re.findall(
        r"lh-cp train: rank (\d): interrupted during step (\d+); the last saved checkpoint is "
        r"step (\d+) \(.*\); run the same command again to resume from step \3 \(each rank "
        r"ran: lh-cp train ",
        stderr,
    )
    assert sorted(rank for rank, _, _ in interrupted) == ["0", "1"], stderr[-3000:]
    assert all(int(step) > saved for _, step, _ in interrupted)
    assert "[rank0]:" not in stderr and "[rank1]:" not in stderr  # no worker traceback
    steps = sorted(logged_losses(out))
    assert steps == list(range(1, len(steps) + 1))  # each step once, the resumed ones redone


@pytest.mark.timeout(200)
def test_a_full_disk_fails_the_save_in_one_line_per_rank_keeping_older_checkpoints(
    recipe_file, tmp_path
):
    """Rank 1's disk is full when it writes step 4 (OSError ENOSPC from DCP's file writes,
    tests/full_disk_run.py: no small tmpfs can be mounted unprivileged everywhere CI runs).
    Every rank prints one line naming the cause and the size; the unfinished folder is gone,
    step 2 is kept and verifies."""
    out = tmp_path / "run"
    command = torchrun_command(
        [str(Path(__file__).with_name("full_disk_run.py")), "4", "1", "train", str(recipe_file)]
        + ["--set", f"run.out_dir='{out}'", "--set", "checkpoint.interval=2"]
    )
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("lh-cp train")]
    checkpoints = out / "checkpoints"
    expected = (
        f"lh-cp train: error: checkpoint of step 4 not saved (the write failed on rank 1): no "
        f"space left on {checkpoints}, need ~"
    )
    assert len(lines) == 2 and all(line.startswith(expected) for line in lines), result.stderr
    assert lines[0].endswith(
        "free when the write failed); its unfinished folder is removed, older checkpoints are kept"
    )
    assert "[rank0]:" not in result.stderr and "[rank1]:" not in result.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002"]
    assert verify_checkpoint(checkpoint_path(checkpoints, 2)).ok


def test_the_agreement_benchmark_runs_at_toy_sizes(tmp_path):
    """benchmarks/agreement_overhead.py --smoke (one CPU process): the table and the JSON of
    the per-call cost that the GPU run reports."""
    out = tmp_path / "agreement.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "agreement_overhead.py"), "--smoke"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| lighthouse |" in result.stdout and "| dense |" in result.stdout
    measured = json.loads(out.read_text())
    assert measured["world"] == 1 and set(measured["per_call"]) == {"lighthouse", "dense"}
    for row in measured["per_call"].values():
        assert min(row["agreement_alone_ms"], row["forward_ms"], row["forward_backward_ms"]) > 0
