"""The watchdog: a job whose rank stops (SIGSTOP, a frozen host, a process stuck outside
Python's reach) ends with a message naming that rank, instead of waiting silently for the
collective timeout.

Every rank runs a daemon thread that, every `period` seconds, bumps a counter under its own key
in the job's key-value store (torchrun's, at MASTER_ADDR:MASTER_PORT) together with the last
training step it finished, and reads the other ranks' counters. A counter that has not moved
for `limit` seconds of this rank's own monotonic clock (so clock skew between hosts does not
matter) means that rank has stopped: the watchdog prints which rank, its last step and how long,
and ends this process with exit code 3, which makes torchrun end the job. A rank that finishes
marks itself done, so the ranks still shutting down do not take it for stopped. A rank that is
alive but blocked in a collective keeps beating; the process-group timeout catches that case.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time

import torch.distributed as dist

DONE = "done"
EXIT_CODE = 3


class Watchdog:
    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world: int,
        limit: float,
        period: float | None = None,
        label: str = "lh-cp",
    ) -> None:
        if limit <= 0:
            raise ValueError(f"the watchdog limit must be > 0 seconds, got {limit}")
        self.store, self.rank, self.world, self.limit = store, rank, world, limit
        self.period = period or max(0.5, min(5.0, limit / 6))
        self.label, self.step = label, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lh-cp-watchdog", daemon=True)

    @classmethod
    def for_torchrun(cls, rank: int, world: int, limit: float) -> Watchdog | None:
        """A watchdog over a fresh client of the job's store, or None for a single process
        (nothing can stop behind its back) or a launcher that sets no MASTER_ADDR."""
        if world < 2 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
            return None
        client = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=max(limit, 30.0)),
        )
        run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return cls(dist.PrefixStore(f"lh_cp_watchdog/{run}/{restart}/", client), rank, world, limit)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def progress(self, step: int) -> None:
        """The last training step this rank finished (reported with its heartbeat)."""
        self.step = step

    def stop(self) -> None:
        """Mark this rank done and stop the thread (call before the process group ends)."""
        self._stop.set()
        self._thread.join(timeout=2 * self.period)
        self.store.set(f"beat/{self.rank}", DONE)

    def _run(self) -> None:
        beats = 0
        seen: dict[int, tuple[str, float]] = {}  # rank -> (value, local time it last changed)
        started = time.monotonic()
        while not self._stop.wait(0 if beats == 0 else self.period):
            beats += 1
            self.store.set(f"beat/{self.rank}", f"{beats} {self.step}")
            now = time.monotonic()
            for other in range(self.world):
                if other == self.rank:
                    continue
                key = f"beat/{other}"
                value = self.store.get(key).decode() if self.store.check([key]) else ""
                if value == DONE:
                    continue
                if other not in seen or seen[other][0] != value:
                    seen[other] = (value, now)
                silent = now - seen[other][1] if value else now - started
                if silent > self.limit:
                    self._stalled(other, value, silent)

    def _stalled(self, other: int, value: str, silent: float) -> None:
        last_step = value.split()[1] if value else "none (it never beat)"
        print(
            f"[{self.label}] rank {other} has sent no heartbeat for {silent:.0f} s (its last finished step: "
            f"{last_step}); it has stopped or hung, so rank {self.rank} ends the job (watchdog limit "
            f"{self.limit:g} s = parallel.timeout_s / 2)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_CODE)
