"""One job per run folder: the lock file `run.out_dir/lh-cp.lock`.

Two jobs writing one run folder overwrite each other's checkpoints and metrics (or one dies on
the other's half-written `.partial` folder). The first job to start owns the folder: before any
process group starts, the job's first rank (RANK 0, or the only process) creates the lock file
atomically (written beside it, then hard-linked into place: the link fails if the file exists),
holding the host, the pid and its start time, the job's start and the job id. A second job
stops with one line naming the owner and the two ways out. The owner refreshes the file's
modification time every REFRESH_S seconds and removes it when the job ends.

A lock left by a job that has ended is taken over, with a console line: on the same host when
its pid is gone (or belongs to a newer process: the pid's start time is kept beside it), on
another host when it has not been refreshed for STALE_AFTER_S seconds. The job id is the same
for every rank and restart of one torchrun job (its rendezvous id and store address), so a
restarted job keeps its own lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_NAME = "lh-cp.lock"
REFRESH_S = 60.0
STALE_AFTER_S = 600.0  # ten refreshes missed: the owner on another host has ended


class RunFolderLocked(RuntimeError):
    """Another job that is still running owns the run folder."""


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    pid_started: str  # the pid's start time (Linux /proc), to tell a reused pid apart
    started: str  # the job's start, local time
    job: str

    def describe(self) -> str:
        return f"job {self.job} (host {self.host}, pid {self.pid}, started {self.started})"


def job_id(environ=os.environ) -> str:
    """The same string on every rank and restart of one job: torchrun's rendezvous id and store
    address, or this process for a run without a launcher."""
    if "TORCHELASTIC_RUN_ID" in environ or "MASTER_PORT" in environ:
        run = environ.get("TORCHELASTIC_RUN_ID", "run")
        return f"torchrun {run}@{environ.get('MASTER_ADDR', '?')}:{environ.get('MASTER_PORT', '?')}"
    return f"process {os.getpid()}@{socket.gethostname()}"


def _pid_started(pid: int) -> str:
    """Start time of `pid` in clock ticks since boot (Linux), '' where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, counted after the command name


def _ended(owner: Owner) -> str | None:
    """How the owner's process (on this host) has ended, or None while it runs: its pid is
    gone, or now belongs to a process that started later than the lock says."""
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return f"pid {owner.pid} on this host has ended"
    except PermissionError:
        return None  # exists, another user's
    if owner.pid_started and _pid_started(owner.pid) not in ("", owner.pid_started):
        return f"pid {owner.pid} on this host has ended (the number is now another process's)"
    return None


def read_owner(lock: Path) -> Owner | None:
    """The owner recorded in `lock`, or None for a missing or unreadable file."""
    try:
        return Owner(**json.loads(lock.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _stale_reason(lock: Path, owner: Owner | None, now: float) -> str | None:
    """Why the lock's owner has ended (a console line's words), or None while it runs."""
    try:
        age = now - lock.stat().st_mtime
    except FileNotFoundError:
        return "it is gone"
    if owner is None:
        return "its file is unreadable" if age > REFRESH_S else None  # being written
    if owner.host == socket.gethostname():
        return _ended(owner)
    if age > STALE_AFTER_S:
        return f"not refreshed for {age / 60:.0f} min (more than {STALE_AFTER_S / 60:.0f} min)"
    return None


class RunLock:
    """The lock of one run folder held by this job (acquire_run_lock); `release` at the end."""

    def __init__(self, path: Path, owner: Owner) -> None:
        self.path, self.owner = path, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="lh-cp-run-lock", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a folder gone or unwritable shows up in the job's own writes

    def release(self) -> None:
        """Stop refreshing and remove the file if it is still this job's."""
        self._stop.set()
        if read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)


def acquire_run_lock(out_dir: Path, say=print, now: float | None = None) -> RunLock:
    """Own `out_dir` (created if missing) for this job or raise RunFolderLocked naming the
    owner. A lock of this same job (a restart) is kept; one of an ended job is taken over
    with a line through `say`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK_NAME
    pid = os.getpid()
    me = Owner(
        host=socket.gethostname(),
        pid=pid,
        pid_started=_pid_started(pid),
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
        job=job_id(),
    )
    for _ in range(3):  # a race with another starting job is settled in one more round
        mine = lock.with_name(f"{LOCK_NAME}.{me.host}.{pid}")
        mine.write_text(json.dumps(asdict(me)) + "\n")
        try:
            os.link(mine, lock)  # atomic: fails if a lock exists
            return RunLock(lock, me)
        except FileExistsError:
            pass
        finally:
            mine.unlink(missing_ok=True)
        owner = read_owner(lock)
        if owner is not None and owner.job == me.job:  # this job, restarted
            os.replace(_written(lock, me), lock)
            return RunLock(lock, me)
        reason = _stale_reason(lock, owner, time.time() if now is None else now)
        if reason is None:
            raise RunFolderLocked(
                f"run.out_dir {out_dir} is in use by {owner.describe()} (lock {lock}); "
                f"use another run.out_dir, or stop that job first"
            )
        # Only one of several jobs taking over moves the stale lock aside; the others see the
        # winner's lock in the next round.
        aside = lock.with_name(f"{LOCK_NAME}.ended.{me.host}.{pid}")
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            continue
        if read_owner(aside) != owner:  # another job took it over in between: put it back
            try:
                os.link(aside, lock)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            continue
        aside.unlink(missing_ok=True)
        whose = owner.describe() if owner is not None else "an unknown job"
        say(f"took over the run folder lock {lock} of {whose}: {reason}")
    raise RunFolderLocked(f"could not lock run.out_dir {out_dir}: other jobs keep taking {lock}")


def _written(lock: Path, me: Owner) -> Path:
    path = lock.with_name(f"{LOCK_NAME}.{me.host}.{me.pid}")
    path.write_text(json.dumps(asdict(me)) + "\n")
    return path
