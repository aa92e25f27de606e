"""Faults: ranks that disagree, a rank that stops, inputs that are not finite.

- Every rank of a CP group must call attention with the same shapes and configuration: a
  rank that does not makes every rank raise the same error before the first collective (a
  mismatch would otherwise hang in the exchange or abort inside gloo naming nothing).
- Ranks that run different recipes stop at start, naming the first differing key.
- A rank stopped with SIGSTOP ends the job through the watchdog within about
  parallel.timeout_s / 2, with a message naming the rank and its last step (the collective
  timeout alone would wait the whole timeout and name nobody).
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from train_utils import logged_losses, tiny_recipe_dict, torchrun_command, write_corpus, write_toml

from lh_cp import LighthouseConfig, causal_attention, lighthouse_attention
from lh_cp.parallel import shard_sequence

REPO = Path(__file__).resolve().parents[1]


def _disagreeing_calls(rank: int, world: int) -> dict[str, str]:
    import torch.distributed as dist

    group = dist.group.WORLD
    cfg = LighthouseConfig(pool=2, levels=2, topk=8, tile_budget=2)
    messages = {}
    torch.manual_seed(0)
    q = torch.randn(1, 128, 2, 8)
    for case in ("length", "config", "dense_heads"):
        q_loc = shard_sequence(q, group)
        k_loc = v_loc = q_loc
        try:
            if case == "length" and rank == 1:
                q_loc, k_loc, v_loc = (x[:, :32] for x in (q_loc, k_loc, v_loc))
            if case == "dense_heads":
                heads = 2 if rank == 0 else 1
                causal_attention(
                    q_loc[:, :, :heads],
                    k_loc[:, :, :heads],
                    v_loc[:, :, :heads],
                    cp=group,
                    exchange="ring",
                )
            else:
                local_cfg = (
                    LighthouseConfig(pool=2, levels=2, topk=16, tile_budget=2)
                    if case == "config" and rank == 1
                    else cfg
                )
                lighthouse_attention(q_loc, k_loc, v_loc, local_cfg, cp=group, exchange="allgather")
            messages[case] = "no error"
        except ValueError as err:
            messages[case] = str(err)
    return messages


def test_ranks_passing_different_inputs_all_raise_before_any_exchange():
    results = run_distributed(_disagreeing_calls, 2, timeout=120)
    for rank, messages in enumerate(results):
        assert "q.shape[1]: rank 1 32, rank 0 64" in messages["length"], (rank, messages)
        assert "topk: rank 1 16, rank 0 8" in messages["config"], (rank, messages)
        assert "q.shape[2]: rank 1 1, rank 0 2" in messages["dense_heads"], (rank, messages)
    assert results[0] == results[1]  # the same error on every rank


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
    assert "rank 1 has sent no heartbeat for" in stderr and "its last finished step:" in stderr, (
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
