"""Helpers for multi-process tests: free ports, spawned gloo jobs with a timeout.

`run_distributed(fn, world_size, *args)` starts `world_size` fresh processes (spawn), each of
which joins a gloo process group on a free local port and calls fn(rank, world_size, *args).
Each rank's return value comes back to the caller (through a file, so any picklable value
works); a rank that raises makes the whole job fail with that rank's traceback, and a job that
outlives its timeout is killed and reported. Process start-up dominates the cost of these
tests, so callers batch many checks into one job.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (bind to port 0, read, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, result_dir: str, fn, args: tuple) -> None:
    import torch.distributed as dist

    # 2 CPU cores shared by several ranks: more intra-op threads only oversubscribe them.
    torch.set_num_threads(1)
    path = os.path.join(result_dir, f"rank{rank}")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=120),
        )
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        with open(path + ".pkl", "wb") as f:
            pickle.dump(result, f)
    except BaseException:
        with open(path + ".err", "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1) from None


def run_distributed(fn, world_size: int, *args, timeout: float = 180.0) -> list:
    """Run fn(rank, world_size, *args) on `world_size` spawned gloo ranks; return their results.

    fn must be importable by the children (a module-level function). Raises RuntimeError with
    the failing rank's traceback, or TimeoutError after `timeout` seconds.
    """
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as result_dir:
        procs = [
            ctx.Process(
                target=_worker, args=(rank, world_size, port, result_dir, fn, args), daemon=True
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        failed = None
        while any(proc.is_alive() for proc in procs):
            failed = next((r for r, p in enumerate(procs) if p.exitcode not in (None, 0)), None)
            if failed is not None or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        timed_out = failed is None and any(proc.is_alive() for proc in procs)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
            proc.join()
        if failed is None:
            failed = next((r for r, p in enumerate(procs) if p.exitcode != 0), None)
        if timed_out:
            raise TimeoutError(f"distributed job of {world_size} ranks exceeded {timeout} s")
        if failed is not None:
            err = os.path.join(result_dir, f"rank{failed}.err")
            detail = (
                open(err).read() if os.path.exists(err) else f"exit code {procs[failed].exitcode}"
            )
            raise RuntimeError(f"rank {failed} of {world_size} failed:\n{detail}")
        results = []
        for rank in range(world_size):
            with open(os.path.join(result_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
