"""One failing rank ends the whole job, quickly, with one line on rank 0.

Without a launcher agent (`srun`, `mpirun`, ranks started by hand) a rank that raises or
dies leaves the others blocked in their next collective until its timeout (tens of
minutes), holding their GPUs. `JobGuard` runs a daemon thread per rank that talks to the
rendezvous store (the TCPStore behind `env://` or `tcp://`) over its own connection:

* every `beat_s` each rank bumps its heartbeat counter `beat/{rank}`;
* rank 0 reads every counter; a rank whose counter has not moved for `lost_after_s`
  (killed, or frozen outside Python) is declared lost;
* a rank that raises publishes `"{rank}|{exit code}|{one line}"` under `failure` (first writer
  wins); every other rank sees it at its next poll, rank 0 logs and prints the line, and
  each process leaves with `os._exit(exit code)`: no rank waits on a collective;
* a store that stops answering means its host (rank 0, or the launcher) is gone: leave too.

So a fault anywhere ends every process within about `lost_after_s + beat_s` seconds.
Checkpoints are written to a temporary file and renamed (`utils.atomic_io`), so leaving
abruptly never leaves a half-written checkpoint.pth.
"""
import logging
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Dict, Optional

import torch.distributed as dist

BEAT_S = 1.0
LOST_AFTER_S = 20.0
_FAILURE, _COUNT, _LOGGED = "failure", "failures", "failure_logged"


class JobGuard:
    """The failure watcher of one rank (see the module docstring).

    Args:
        store: a connection to the rendezvous store of this job (not shared with the process group).
        rank, world_size: this process's place in the job.
        beat_s: heartbeat and poll period.
        lost_after_s: a rank silent for this long is declared lost (rank 0 decides).
        exit_fn: how a process leaves (`os._exit`; replaced in tests).
    """

    def __init__(self, store, rank: int, world_size: int, *, beat_s: float = BEAT_S,
                 lost_after_s: float = LOST_AFTER_S, exit_fn: Callable[[int], None] = os._exit):
        self.store = dist.PrefixStore("savit_job_guard/", store)
        self.rank, self.world_size = rank, world_size
        self.beat_s, self.lost_after_s = beat_s, lost_after_s
        self.exit_fn = exit_fn
        self.logger: Optional[logging.Logger] = None  # the run's logger, once it exists (rank 0 logs there)
        self._stop = threading.Event()
        self._finishing = False
        self._reporting = threading.Lock()  # one report per process: the main thread's or the watcher's
        self._seen: Dict[int, tuple] = {}  # rank -> (last beat count, local time it changed)
        self._thread = threading.Thread(target=self._watch, name="savit-job-guard", daemon=True)

    @classmethod
    def connect(cls, host: str, port: int, rank: int, world_size: int, **kwargs) -> "JobGuard":
        """A guard with its own client connection to the store at `host:port`."""
        store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30), wait_for_workers=False)
        return cls(store, rank, world_size, **kwargs)

    def start(self) -> "JobGuard":
        self.store.add(f"beat/{self.rank}", 1)
        self._thread.start()
        return self

    # -- this rank failed -------------------------------------------------------------------

    def fail(self, line: str, code: int) -> bool:
        """Publish this rank's failure (unless another rank's came first); False when this process
        is already being ended by the watcher (the caller should then only wait)."""
        if not self._reporting.acquire(blocking=False):
            return False
        try:
            if self.store.add(_COUNT, 1) == 1:
                self.store.set(_FAILURE, f"{self.rank}|{code}|{line}")
        except Exception:  # the store's host is gone already: nothing to tell
            pass
        return True

    def wait_until_logged(self, wait_s: float) -> None:
        """Wait (at most `wait_s`) until rank 0 has logged the failure this rank published: a launcher
        agent stops every process as soon as the first one exits."""
        try:
            self.store.wait([_LOGGED], timedelta(seconds=wait_s))
        except Exception:  # timed out, or the store is gone
            pass

    def first_failure(self, wait_s: float = 0.0):
        """(rank, code, line) of the first failure published, or None (waiting up to `wait_s`)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if self.store.add(_COUNT, 0) > 0:
                    rank, code, line = self.store.get(_FAILURE).decode().split("|", 2)
                    return int(rank), int(code), line
            except Exception:
                return None
            if time.monotonic() >= deadline:
                return None
            time.sleep(min(self.beat_s, 0.2))

    # -- the end of a run that went well ------------------------------------------------------

    def finishing(self) -> None:
        """This rank is done: from now on a store that stops answering means the others are done too."""
        self._finishing = True

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2 * self.beat_s + 1)

    # -- the watcher thread -------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self.store.add(f"beat/{self.rank}", 1)
                failure = self.first_failure()
                lost = self._lost_rank() if self.rank == 0 else None
            except Exception as err:  # the store's host is gone
                if self._finishing or self._stop.is_set():
                    return
                self._end(None, 1, f"lost the rendezvous store ({type(err).__name__}): rank 0 or the launcher "
                                   f"is gone; stopping")
                return
            if failure is not None and failure[0] != self.rank:
                self._end(*failure)
                return
            if lost is not None:
                line = (f"rank {lost} has not answered for {self.lost_after_s:.0f} s (killed, or frozen "
                        f"outside Python); stopping every rank")
                self.fail(line, 1)
                self._end(None, 1, line, reported=True)
                return

    def _lost_rank(self) -> Optional[int]:
        """Rank 0: the first rank whose heartbeat has not moved for `lost_after_s`, else None."""
        now = time.monotonic()
        for rank in range(1, self.world_size):
            count = self.store.add(f"beat/{rank}", 0)
            last, since = self._seen.get(rank, (None, now))
            if count != last:
                self._seen[rank] = (count, now)
            elif now - since > self.lost_after_s:
                return rank
        return None

    def _end(self, failed_rank: Optional[int], code: int, line: str, reported: bool = False) -> None:
        """Leave the process now; rank 0 first logs and prints which rank failed and why."""
        if not reported and not self._reporting.acquire(blocking=False):
            return  # the main thread is reporting this process's own error
        if self.rank == 0:
            who = f"rank {failed_rank} failed: " if failed_rank is not None else ""
            message = f"error: {who}{line}"
            if self.logger is not None:
                self.logger.error(message)
                for handler in self.logger.handlers:
                    handler.flush()
            print(message, file=sys.stderr, flush=True)
            try:
                self.store.set(_LOGGED, "1")
            except Exception:
                pass
        sys.stdout.flush()
        self.exit_fn(code)
