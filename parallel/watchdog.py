"""The watchdog: a job whose rank stops (SIGSTOP, a frozen host, a process stuck outside
Python's reach) ends with a message naming that rank, instead of waiting silently for the
collective timeout; a job whose launcher is gone ends too, with a message saying so.

Every rank runs a daemon thread that, every `period` seconds, bumps a counter under its own key
in the job's key-value store (torchrun's, at MASTER_ADDR:MASTER_PORT) together with the step it
is working on (published at once when a step starts), and reads the other ranks' counters. A
counter that has not moved for `limit` seconds of this rank's own monotonic clock (so clock skew
between hosts does not matter) means that rank has stopped: the watchdog prints which rank, the
step it was working on and how long, and ends this process with exit code 3, which makes
torchrun end the job. A rank that finishes marks itself done, so the ranks still shutting down
do not take it for stopped. A rank that is alive but blocked in a collective keeps beating; the
process-group timeout catches that case.

The store lives in the torchrun agent, the parent of this node's ranks. When the agent goes
(killed, crashed), nothing would end the job if a rank then hung or died, and nobody collects
the ranks' exit codes. The watchdog notices (this process's parent has changed, or a store
operation and a fresh connection fail for LOST_AFTER_PERIODS periods) without touching the
broken store again (whose client would print a stack trace per retry) and sets `lost`; the
trainer asks every rank after each step (`any_rank_lost`, one small all-reduce) so that all of
them save and stop at the same step with one line each (LauncherLost). If the main thread does
not get there within `limit` seconds (stuck in a collective with a rank that is gone), the
watchdog prints that line itself and ends the process with exit code 3.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time
from collections.abc import Callable

import torch.distributed as dist

DONE = "done"
EXIT_CODE = 3
LOST_AFTER_PERIODS = 2


class LauncherLost(RuntimeError):
    """The job's launcher (torchrun agent) and its store are gone; raised on every rank at the
    same step (Watchdog.any_rank_lost)."""


class Watchdog:
    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world: int,
        limit: float,
        period: float | None = None,
        label: str = "lh-cp",
        reconnect: Callable[[], dist.Store] | None = None,
        address: str = "the job's store",
        parent: int | None = None,
    ) -> None:
        if limit <= 0:
            raise ValueError(f"the watchdog limit must be > 0 seconds, got {limit}")
        self.store, self.rank, self.world, self.limit = store, rank, world, limit
        self.period = period or max(0.5, min(5.0, limit / 6))
        self.label, self.step = label, 0
        self.reconnect, self.address, self.parent = reconnect, address, parent
        self.lost: str | None = None  # why contact with the launcher is lost, once it is
        self._lost_at = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()  # a new step to publish, or stop
        self._thread = threading.Thread(target=self._run, name="lh-cp-watchdog", daemon=True)

    @classmethod
    def for_torchrun(cls, rank: int, world: int, limit: float) -> Watchdog | None:
        """A watchdog over a fresh client of the job's store, or None for a single process
        (nothing can stop behind its back) or a launcher that sets no MASTER_ADDR."""
        if world < 2 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            return None
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")

        def connect(timeout: float = max(limit, 30.0)) -> dist.Store:
            client = dist.TCPStore(
                host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout)
            )
            return dist.PrefixStore(f"lh_cp_watchdog/{run}/{restart}/", client)

        return cls(
            connect(),
            rank,
            world,
            limit,
            reconnect=lambda: connect(timeout=5.0),
            address=f"the job's rendezvous store at {host}:{port}",
            # Under torchrun the parent is the agent, which holds the store; other launchers'
            # workers may outlive a wrapper, so only their store is watched.
            parent=os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None,
        )

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def progress(self, step: int) -> None:
        """The step this rank starts working on: published with a beat right away, so a rank
        that stops during it is named with it."""
        self.step = step
        self._wake.set()

    def stop(self) -> None:
        """Mark this rank done and stop the thread (call before the process group ends)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=2 * self.period)
        if self.lost is None:
            try:
                self.store.set(f"beat/{self.rank}", DONE)
            except Exception:  # the store is gone: nobody is left to take this rank for stopped
                pass

    def any_rank_lost(self, group: dist.ProcessGroup, device) -> str | None:
        """Collective over `group` (every rank runs a watchdog, or none does): whether any
        rank's watchdog has lost the launcher; this rank's reason, or the group's word for it."""
        import torch

        flag = torch.tensor([int(self.lost is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if not int(flag.item()):
            return None
        return self.lost or "another rank lost contact with the job's launcher"

    def lost_line(self) -> str:
        return (
            f"rank {self.rank} lost contact with the job's launcher: {self.lost}; nothing would "
            f"end the job if a rank failed, so it stops"
        )

    def _run(self) -> None:
        beats = 0
        seen: dict[int, tuple[str, float]] = {}  # rank -> (value, local time it last changed)
        started = last_scan = time.monotonic()
        failing_since = None
        while not self._stop.is_set():
            now = time.monotonic()
            if self.lost is not None:  # the trainer stops every rank at the next step, or else:
                if now - self._lost_at > self.limit:
                    self._say(
                        f"{self.lost_line()} (step {self.step} did not finish in {self.limit:g} s)"
                    )
                    os._exit(EXIT_CODE)
            elif self.parent is not None and os.getppid() != self.parent:
                self._lose(f"its process (pid {self.parent}, this rank's parent) has ended")
            else:
                try:
                    beats += 1
                    self.store.set(f"beat/{self.rank}", f"{beats} {self.step}")
                    if now - last_scan >= self.period or beats == 1:
                        last_scan = now
                        for other, value in self._others():
                            if other not in seen or seen[other][0] != value:
                                seen[other] = (value, now)
                            silent = now - seen[other][1] if value else now - started
                            if silent > self.limit:
                                self._stalled(other, value, silent)
                    failing_since = None
                except Exception as err:  # the store's connection failed: try a fresh one
                    failing_since = failing_since or now
                    self._recover(err, failing_since)
            self._wake.wait(self.period)
            self._wake.clear()

    def _lose(self, reason: str) -> None:
        self.lost, self._lost_at = reason, time.monotonic()

    def _say(self, line: str) -> None:
        try:
            print(f"[{self.label}] {line}", file=sys.stderr, flush=True)
        except OSError:  # stderr was a pipe to the launcher that is gone
            pass

    def _others(self):
        """(rank, its last beat value or '') of every other rank not done."""
        for other in range(self.world):
            if other == self.rank:
                continue
            key = f"beat/{other}"
            value = self.store.get(key).decode() if self.store.check([key]) else ""
            if value != DONE:
                yield other, value

    def _recover(self, err: Exception, failing_since: float) -> None:
        """Reconnect after a failed store operation; the launcher is lost once the store has been
        unreachable for LOST_AFTER_PERIODS periods."""
        if self.reconnect is not None:
            try:
                self.store = self.reconnect()
                return
            except Exception as again:
                err = again
        if time.monotonic() - failing_since >= LOST_AFTER_PERIODS * self.period:
            reason = " ".join(str(err).split("\n")[0].split())[:160]
            self._lose(f"{self.address} is unreachable ({type(err).__name__}: {reason})")

    def _stalled(self, other: int, value: str, silent: float) -> None:
        step = value.split()[1] if value else None
        working = {None: "it never beat", "0": "it had not started step 1"}.get(
            step, f"it was working on step {step}"
        )
        self._say(
            f"rank {other} has sent no heartbeat for {silent:.0f} s ({working}); it has stopped "
            f"or hung, so rank {self.rank} ends the job (watchdog limit {self.limit:g} s = "
            f"parallel.timeout_s / 2)"
        )
        os._exit(EXIT_CODE)
