"""A liveness watchdog over torch.distributed's own store: a stopped or lost rank is
noticed by every other rank in ``train.heartbeat_timeout_s``, not at the collective
timeout.

The collective timeout (``train.dist_timeout_s``) bounds a wait *inside* a collective,
but it has to cover the longest legitimate gap between two collectives (a first-step
compile, an evaluation, a checkpoint of a large model), so it is minutes. A rank that
is stopped (SIGSTOP, a hung driver), or whose node or network went away, is found
faster by a heartbeat: each rank bumps a counter in the rendezvous TCPStore (the one
``init_process_group`` already serves from rank 0, through a client of our own with a
short timeout) every ``interval`` seconds from a daemon thread, and reads everyone
else's. A counter that has not moved for ``timeout_s``, a peer that said it failed,
or a store that does not answer (rank 0's process or host is gone) ends this rank:
the fault goes to ``<train.out>/failures.jsonl`` and the process exits with
:data:`EXIT_LOST_PEER`, so that ``srun --kill-on-bad-exit`` or the local launcher
ends the rest and the job is retried.

torch's own elastic agent (torchrun) has a heartbeat too, but between agents, and it
restarts workers in place; under Slurm, srun is the agent, so this is the piece the
pipeline lacks. It is a thread and two store keys per rank, nothing else.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys
import threading
import time

EXIT_LOST_PEER = 5
DONE, FAILED = "done", "failed"
_current: Watchdog | None = None


def stop_current(done: bool) -> None:
    """Stop this process's watchdog, if one runs (the trainer's exit paths)."""
    if _current is not None:
        _current.stop(done)


class Watchdog:
    """Start with :meth:`start` after the process group is up; :meth:`stop` before it
    is torn down (``done=True`` at a normal end, else this rank is reported failed)."""

    def __init__(self, rank: int, world: int, timeout_s: float, on_lost, interval_s: float | None = None):
        self.rank, self.world, self.timeout_s = rank, world, float(timeout_s)
        self.interval_s = interval_s or max(0.5, min(5.0, self.timeout_s / 10))
        self.on_lost = on_lost  # on_lost(message): record the fault; then the process exits
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.store = None

    def start(self) -> None:
        if self.world < 2 or self.timeout_s <= 0:
            return
        import torch.distributed as dist

        # a client of our own on the rendezvous store: its timeout bounds every heartbeat
        # read, whatever the process group's store uses
        self.store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=self.timeout_s),
            wait_for_workers=False,
        )
        self.store.set(f"watchdog/host/{self.rank}", socket.gethostname())
        self.store.set(f"watchdog/beat/{self.rank}", "0")
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()
        global _current
        _current = self

    def stop(self, done: bool) -> None:
        """``done``: this rank ends with the others (a normal end, an error every rank
        found, a requeue); else it failed alone and the others should end too."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=self.interval_s + self.timeout_s)
        self._thread = None
        try:
            self.store.set(f"watchdog/beat/{self.rank}", DONE if done else FAILED)
        except Exception:  # noqa: BLE001 - the store is gone with rank 0: nobody left to tell
            pass

    def _run(self) -> None:
        peers = [r for r in range(self.world) if r != self.rank]
        keys = [f"watchdog/beat/{r}" for r in peers]
        beat = 0
        seen = {r: (None, time.monotonic()) for r in peers}  # rank -> (last value, when it changed)
        while not self._stop.wait(self.interval_s):
            beat += 1
            try:
                self.store.set(f"watchdog/beat/{self.rank}", str(beat))
                values = self._read(keys)
            except Exception as exc:  # noqa: BLE001 - a store that does not answer is a lost rank 0
                self._lost(
                    f"the rendezvous store on rank 0 ({os.environ.get('MASTER_ADDR')}) did not answer in "
                    f"{self.timeout_s:.0f} s: rank 0's process, node or network is gone ({type(exc).__name__})"
                )
                return
            now = time.monotonic()
            for r, value in zip(peers, values):
                if value == FAILED:
                    self._lost(f"rank {r} ({self._host(r)}) failed")
                    return
                if value == DONE:
                    continue
                if value != seen[r][0]:
                    seen[r] = (value, now)
                elif now - seen[r][1] > self.timeout_s:
                    self._lost(
                        f"rank {r} ({self._host(r)}) sent no heartbeat for {now - seen[r][1]:.0f} s "
                        f"(stopped or hung, or its node or network is down)"
                    )
                    return

    def _read(self, keys: list[str]) -> list[str | None]:
        if not self.store.check(keys):  # a peer not yet started: wait for its first beat
            return [self.store.get(k).decode() if self.store.check([k]) else None for k in keys]
        return [v.decode() for v in self.store.multi_get(keys)]

    def _host(self, rank: int) -> str:
        try:
            return self.store.get(f"watchdog/host/{rank}").decode()
        except Exception:  # noqa: BLE001
            return "host unknown"

    def _lost(self, message: str) -> None:
        try:
            self.on_lost(message)
        finally:
            print(
                f"error: rank {self.rank}: lost a peer rank: {message}; exiting (status {EXIT_LOST_PEER})",
                file=sys.stderr,
                flush=True,
            )
            sys.stdout.flush()
            logging.shutdown()
            # the main thread may be blocked in a collective that would wait out its timeout
            os._exit(EXIT_LOST_PEER)
